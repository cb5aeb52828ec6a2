"""Ahead-of-time builds of the Triton kernels for a CUDA target, on a machine without a GPU.

Triton lowers a kernel to PTX and ``ptxas`` (shipped inside the ``triton`` wheel) assembles it to a
cubin without touching a driver, so every autotune configuration can be compiled for, say, the
H100/H200 (``sm_90``) on a CPU-only CI machine. That catches what the CPU interpreter cannot:
lowering errors, shared-memory footprints beyond the GPU's limit (a config the autotuner could
never launch) and register spills (local-memory traffic in the inner loop of a kernel whose whole
point is to stream weights at memory bandwidth).

* :func:`compile_kernel` compiles one specialisation and reads its resources: shared memory from
  Triton's metadata, registers and spill bytes from ``ptxas -v`` run with Triton's own flags,
  the MMA generation from the TTGIR (``3`` = Hopper ``wgmma``, ``2`` = ``mma.sync``);
* :func:`wq_builds` / :func:`int8_builds` compile every autotune config of a kernel family;
* ``python -m lightning_quant.kernels.aot`` prints the table (``--arch 80`` for A100).

The resources are properties of the compiled code only; speed still has to be measured on a GPU
(``benchmarks/kernels.py``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_quant.kernels import _runtime

__all__ = ["SHARED_MEMORY_LIMIT", "KernelBuild", "compile_kernel", "dequant_builds", "disassemble", "gemv_builds",
           "int8_builds", "main_loop_instructions", "rowquant_builds", "wq_builds"]

#: Largest dynamic shared memory one block may use, bytes, by compute capability (CUDA guide, table 21).
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelBuild:
    """Resources of one compiled specialisation (``constants`` = constexpr values incl. the block sizes)."""

    name: str
    arch: int
    constants: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    mma_version: int | None
    #: SASS instructions (one warp issue each) in the main loop's body, see :func:`main_loop_instructions`
    loop_instructions: int | None = None
    #: the loop body's opcode counts (``{"LDG": 2, "FFMA": 64, ...}``), for reading where issue slots go
    loop_opcodes: tuple = ()

    @property
    def fits_shared_memory(self) -> bool:
        """True when the block's shared memory fits the target (unknown targets count as ``sm_90``)."""
        return self.shared_bytes <= SHARED_MEMORY_LIMIT.get(self.arch, SHARED_MEMORY_LIMIT[90])

    def describe(self) -> str:
        blocks = "x".join(str(self.constants[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in self.constants)
        split = self.constants.get("SPLIT_K")
        return (f"{self.name:<13} {blocks:<12} {'' if split is None else f'split {split}':<9} "
                f"warps {self.num_warps} stages {self.num_stages}  smem {self.shared_bytes / 1024:6.1f} KiB  "
                f"regs {self.registers:3d}  spill {self.spill_bytes:5d} B  mma v{self.mma_version}  "
                f"loop {self.loop_instructions} instr")


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(arch).path
    except TypeError:  # older Triton: get_ptxas() takes no argument
        return nv.get_ptxas().path


def _ptxas_resources(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill-store bytes)`` of the PTX's kernel, from ``ptxas -v`` with Triton's flags."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        proc = subprocess.run([_ptxas(arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                               str(src), "-o", str(Path(tmp, "kernel.cubin"))],
                              capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    regs, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    if proc.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"ptxas failed for {gpu} (exit {proc.returncode}):\n{log[-2000:]}")
    return int(regs.group(1)), int(spills.group(1))


def compile_kernel(jit_fn, signature: dict[str, str], constants: dict, *, num_warps: int, num_stages: int,
                   arch: int = 90, aligned: tuple[str, ...] = (), name: str | None = None,
                   fp_fusion: bool = True) -> KernelBuild:
    """Compile ``jit_fn`` for ``sm_<arch>`` with runtime argument types ``signature`` (``"*fp16"``,
    ``"i32"``, ...) and constexpr ``constants``; returns its :class:`KernelBuild`.

    Like a launch, pointers are taken as 16-byte aligned; the integer arguments named in ``aligned``
    as multiples of 16 (what Triton's launcher specialises on for e.g. ``K = 4096``). Without those
    hints loads cannot be vectorised or pipelined and the build would not be the one a GPU runs.
    ``fp_fusion=False`` compiles as a launch with ``enable_fp_fusion=False`` (no FMA contraction).
    """
    triton, _ = _runtime.load_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = [a for a in jit_fn.arg_names if a not in signature and a not in constants]
    if missing:
        raise ValueError(f"compile_kernel: no type or constant given for arguments {missing} of {jit_fn.__name__}.")
    sig = {**signature, **{k: "constexpr" for k in constants}}
    divisible = [a for a, t in signature.items() if t.startswith("*") or a in aligned]
    src = ASTSource(fn=jit_fn, signature=sig, constexprs={(jit_fn.arg_names.index(k),): v for k, v in constants.items()},
                    attrs={(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": fp_fusion})
    regs, spills = _ptxas_resources(kernel.asm["ptx"], arch)
    mma = re.search(r"versionMajor = (\d)", kernel.asm["ttgir"])
    loop = main_loop_instructions(disassemble(kernel.asm["cubin"]))
    return KernelBuild(name or jit_fn.__name__, arch, dict(constants), num_warps, num_stages,
                       int(kernel.metadata.shared), regs, spills, int(mma.group(1)) if mma else None,
                       None if loop is None else sum(loop.values()), tuple(sorted(loop.items())) if loop else ())


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin, from the Triton wheel's own ``nvdisasm`` (``-c``: code only)."""
    from triton.backends.nvidia import compiler as nv

    tool = Path(nv.__file__).parent / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.cubin")
        src.write_bytes(cubin)
        proc = subprocess.run([str(tool), "-c", str(src)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)\)?")


def main_loop_instructions(sass: str) -> dict[str, int] | None:
    """Opcode counts of the kernel's main loop: the innermost backward branch whose body loads from
    global memory (``LDG``, or ``UTMALDG``/``LDGSTS`` when pipelined), the largest such when several.
    ``None`` when the kernel has no loop. Each SASS instruction is one warp-instruction issue."""
    lines = sass.splitlines()
    labels = {ln.rstrip(":").strip(): i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:", ln.strip())}
    loops = []
    for i, ln in enumerate(lines):
        m = _BRANCH.search(ln)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a < c < d <= b and (c, d) != (a, b) for c, d in loops)]
    best = None
    for a, b in inner:
        ops: dict[str, int] = {}
        for ln in lines[a:b + 1]:
            m = _SASS_LINE.match(ln)
            if m:
                ops[m.group(1)] = ops.get(m.group(1), 0) + 1
        if any(k in ops for k in ("LDG", "LDGSTS", "UTMALDG")) and (best is None or sum(ops.values()) > sum(best.values())):
            best = ops
    return best


def wq_builds(arch: int = 90, dtype: torch.dtype = torch.float16, bits: int = 4, group_size: int = 128,
              symmetric: bool = False, bias: bool = True, paths: tuple[str, ...] = ("gemm", "splitk"),
              act_order: bool = False) -> list[KernelBuild]:
    """Every autotune config of :mod:`~lightning_quant.kernels.wq_matmul` that the group-size pre-filter keeps
    (split-K: every row tile; ``act_order`` gathers the input in the split-K kernel)."""
    from lightning_quant.kernels import wq_matmul as wq

    triton, _ = _runtime.load_triton()
    jit = wq._build(False)["jit"]
    t = _TRITON_DTYPE[dtype]
    builds = []
    for path in paths:
        configs = wq._gemm_configs(triton) if path == "gemm" else wq._splitk_configs(triton)
        split = path == "splitk"
        sig = {"x_ptr": f"*{t}", "qw_ptr": "*i32", "s_ptr": f"*{t}", "z_ptr": "*i32", "b_ptr": f"*{t}",
               "p_ptr": "*i64" if split and act_order else f"*{t}", "out_ptr": f"*{t}",
               "ws_ptr": "*fp32" if split else f"*{t}", "cnt_ptr": "*i32" if split else f"*{t}",
               "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", "stride_zg": "i32"}
        launch = wq.kernel_constants(bits, not symmetric, bias, group_size, dtype, split and act_order, dtype)  # as wq_linear_triton
        for cfg in wq.prune_by_group(configs, {k: launch[k] for k in ("GROUP_SIZE", "HALF", "BITS")}):  # every row tile
            const = {**launch, **cfg.kwargs}
            builds.append(compile_kernel(jit, sig, const, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                         arch=arch, aligned=("N", "K", "stride_zg"), name=f"wq-{path}"))
    return builds


def gemv_builds(arch: int = 90, dtype: torch.dtype = torch.float16, bits: int = 4, group_size: int = 128,
                symmetric: bool = False, bias: bool = True, act_order: bool = False, rows: int = 1) -> list[KernelBuild]:
    """Every autotune config of :mod:`~lightning_quant.kernels.wq_gemv` that its group-size pre-filter keeps
    (scales in the activation dtype, as ``PackedLinear`` stores them for float16 models)."""
    from lightning_quant.kernels import wq_gemv as gv

    triton, _ = _runtime.load_triton()
    jit = gv._build(False)["jit"]
    t = _TRITON_DTYPE[dtype]
    sig = {"x_ptr": f"*{t}", "qw_ptr": "*i32", "s_ptr": f"*{t}", "z_ptr": "*i32", "b_ptr": f"*{t}", "p_ptr": "*i64",
           "out_ptr": f"*{t}", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "stride_zg": "i32"}
    launch = gv.gemv_constants(bits, not symmetric, bias, act_order, group_size, dtype, dtype, rows)
    return [compile_kernel(jit, sig, {**launch, **cfg.kwargs}, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           arch=arch, aligned=("N", "K", "stride_zg"), name="wq-gemv")
            for cfg in gv.prune_gemv(gv.gemv_configs(triton), {k: launch[k] for k in ("GROUP_SIZE", "BLOCK_M", "BITS", "HALF")})]


def dequant_builds(arch: int = 90, dtype: torch.dtype = torch.float16, bits: int = 4, group_size: int = 128,
                   symmetric: bool = False, act_order: bool = False) -> list[KernelBuild]:
    """Every autotune config of the prefill dequantization (:mod:`~lightning_quant.kernels.wq_dequant`) that
    its pre-filter keeps, writing ``dtype`` (scales in the activation dtype, as ``PackedLinear`` stores them)."""
    from lightning_quant.kernels import wq_dequant as dq

    triton, _ = _runtime.load_triton()
    jit = dq._build(False)["jit"]
    t = _TRITON_DTYPE[dtype]
    sig = {"qw_ptr": "*i32", "s_ptr": f"*{t}", "z_ptr": "*i32", "p_ptr": "*i64", "out_ptr": f"*{t}", "N": "i32",
           "K": "i32", "stride_zg": "i32"}
    launch = dq.dequant_constants(bits, not symmetric, act_order, group_size, dtype, dtype)
    return [compile_kernel(jit, sig, {**launch, **cfg.kwargs}, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           arch=arch, aligned=("N", "K", "stride_zg"), name="wq-dequant")
            for cfg in dq.prune_dequant(dq.dequant_configs(triton), {k: launch[k] for k in ("GROUP_SIZE", "BITS")})]


def int8_builds(arch: int = 90, scaled: bool = False, out_dtype: torch.dtype = torch.float16,
                bias: bool = True, residual: bool = True) -> list[KernelBuild]:
    """Every autotune config of :mod:`~lightning_quant.kernels.int8_matmul`: the int32 store, or (``scaled``)
    the fused epilogue of :func:`~lightning_quant.kernels.int8_matmul.int8_matmul_scaled` writing
    ``out_dtype`` (float16 bias; compiled, as launched, without FMA contraction)."""
    from lightning_quant.kernels import int8_matmul as i8

    triton, _ = _runtime.load_triton()
    jit = i8._build(False)["jit"]
    out = _TRITON_DTYPE[out_dtype] if scaled else "i32"
    sig = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": f"*{out}", "rs_ptr": "*fp32", "cs_ptr": "*fp32",
           "bias_ptr": "*fp16", "res_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
           "divisor": "fp32"}
    const = {"SCALED": scaled, "HAS_BIAS": scaled and bias, "HAS_RESIDUAL": scaled and residual}
    return [compile_kernel(jit, sig, {**const, **cfg.kwargs}, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           arch=arch, aligned=("N", "K"), name="int8-scaled" if scaled else "int8",
                           fp_fusion=not scaled) for cfg in i8._configs(triton, scaled)]


def rowquant_builds(arch: int = 90, dtype: torch.dtype = torch.float16, block_k: int = 1024) -> list[KernelBuild]:
    """The LLM.int8 activation-quantization kernel (:func:`~lightning_quant.kernels.int8_matmul.quantize_rows`)
    with a column mask, as launched (``BLOCK_K`` 1024, 4 warps, no FMA contraction)."""
    from lightning_quant.kernels import int8_matmul as i8

    jit = i8._build_rowquant(False)["jit"]
    sig = {"x_ptr": f"*{_TRITON_DTYPE[dtype]}", "m_ptr": "*i8", "q_ptr": "*i8", "a_ptr": "*fp32", "K": "i32",
           "tiny": "fp32"}
    return [compile_kernel(jit, sig, {"HAS_MASK": True, "BLOCK_K": block_k}, num_warps=4, num_stages=3, arch=arch,
                           aligned=("K",), name="int8-rowquant", fp_fusion=False)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Compile every autotune config for a CUDA target; print resources.")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--family", choices=["all", "wq", "gemv", "dequant", "int8"], default="all")
    args = p.parse_args(argv)
    builds = []
    if args.family in ("all", "wq"):
        builds += wq_builds(args.arch, getattr(torch, args.dtype), args.bits, args.group_size, args.symmetric)
    if args.family in ("all", "gemv"):
        builds += gemv_builds(args.arch, getattr(torch, args.dtype), args.bits, args.group_size, args.symmetric)
    if args.family in ("all", "dequant"):
        builds += dequant_builds(args.arch, getattr(torch, args.dtype), args.bits, args.group_size, args.symmetric)
    if args.family in ("all", "int8"):
        builds += int8_builds(args.arch) + int8_builds(args.arch, scaled=True) + rowquant_builds(args.arch)
    for b in builds:
        print(b.describe() + ("" if b.fits_shared_memory else "  EXCEEDS SHARED MEMORY"))


if __name__ == "__main__":
    main()
