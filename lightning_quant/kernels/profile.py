"""Static profile of the packed kernels on a CPU-only machine: what the compiled code can reach.

``python -m lightning_quant.kernels.profile`` compiles every autotune config of each kernel
family for the goal shape (``sm_90a`` with the installed Triton's own ``ptxas``; read the SASS with
its ``nvdisasm``) and prints one line per family and shape::

    profile <family> <M>x<N>x<K> instr_per_weight=<x> launches=<n> spills=<bytes> smem_kib=<x> regs=<n> ...

* ``instr_per_weight``: warp-instructions issued per weight in the main loop, ``(SASS instructions
  in the loop body) · warps / (BLOCK_K · BLOCK_N)`` — the loop consumes a ``BLOCK_K x BLOCK_N``
  weight tile per iteration; the config with the fewest is shown (the autotuner picks by time on the
  GPU). A memory-bound kernel must issue few: at 4 warp-instructions per clock per SM, an H200
  (132 SMs, ~1.7 GHz, 4.8 TB/s) streams W4 weights at ~9.6e12 weights/s, so the issue budget is
  ``4 · 132 · 1.7e9 / 9.6e12 ≈ 0.09`` instructions per weight before issue, not HBM, is the limit.
* ``launches``: kernels one warm call launches, counted on the ``meta`` device from the Python path
  (:func:`count_launches`: Triton launches through :func:`~lightning_quant.kernels._runtime.launch`
  plus every non-view ATen op, which on CUDA is a kernel of its own).
* ``spills`` / ``smem_kib`` / ``regs``: of the shown config, from ``ptxas -v`` and Triton's metadata.
* ``prefill``: the figures are the dequantization kernel's (the weight written once per call); the
  GEMM that follows is cuBLAS, counted as one launch (``aten::mm`` / ``aten::addmm``) but not profiled.

Goals (issue 14): ``gemv`` (M=1, W4 g128) ≤ 0.10, the GEMM main loop ≤ 0.15, one launch per decode
call, no spills. These are properties of the compiled code, not speed: time on a GPU
(``benchmarks/kernels.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_quant.kernels import _runtime

__all__ = ["GOALS", "ProfileLine", "count_launches", "profile", "profile_lines"]

#: ``family -> instr_per_weight`` goal (``None``: reported, no goal set).
GOALS = {"gemv": 0.10, "splitk": None, "gemm": 0.15, "prefill": None, "int8": None}
#: The goal shape: ``K x N`` of a 4096 -> 14336 projection (``benchmarks/kernels.py``).
GOAL_K, GOAL_N = 4096, 14336
#: ``(family, M)`` rows of the profile: decode, mid-size, the fused GEMM at prefill sizes, the prefill path
#: (dequantize, then cuBLAS: the dequantization kernel's figures); the int8 layer at M = 512.
ROWS = (("gemv", 1), ("splitk", 16), ("splitk", 64), ("gemm", 128), ("gemm", 4096), ("prefill", 4096), ("int8", 512))
_ALLOC = {"empty", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}


class _CountOps(TorchDispatchMode):
    """Records every ATen op that would launch a CUDA kernel (not views, not allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "lightning_quant":  # a fused op: one launch (its fake impl runs on meta)
            self.ops.append(f"lightning_quant::{name}")
        elif not func.is_view and name not in _ALLOC:
            self.ops.append(f"aten::{name}")
        return func(*args, **(kwargs or {}))


def count_launches(fn) -> list[str]:
    """Names of the kernels the *second* call of ``fn()`` launches (the first may build workspaces).

    ``fn`` builds its inputs on the ``meta`` device; Triton launches are recorded, not run.
    """
    with _runtime.recording_launches():
        fn()
    with _runtime.recording_launches() as triton_launches, _CountOps() as ops:
        fn()
    return [f"triton::{k}" for k in triton_launches] + ops.ops


@dataclass(frozen=True)
class ProfileLine:
    family: str
    m: int
    n: int
    k: int
    instr_per_weight: float
    launches: int
    spills: int
    smem_kib: float
    regs: int
    config: str
    launched: tuple[str, ...]

    def describe(self) -> str:
        goal = GOALS.get(self.family)
        verdict = "" if goal is None else f" goal<={goal} {'PASS' if self.instr_per_weight <= goal else 'FAIL'}"
        return (f"profile {self.family} {self.m}x{self.n}x{self.k} instr_per_weight={self.instr_per_weight:.3f} "
                f"launches={self.launches} spills={self.spills} smem_kib={self.smem_kib:.1f} regs={self.regs} "
                f"config={self.config}{verdict} kernels={','.join(self.launched)}")


def _wq_operands(m: int, k: int, n: int, device: str = "meta"):
    """W4 g128 symmetric float16 operands of the goal shape (no bias, no act-order)."""
    from lightning_quant import packing

    x = torch.empty(m, k, dtype=torch.float16, device=device)
    qweight = torch.empty(packing.packed_len(k, 4), n, dtype=torch.int32, device=device)
    scales = torch.empty(k // 128, n, dtype=torch.float16, device=device)
    return x, qweight, scales


def wq_launches(m: int, k: int = GOAL_K, n: int = GOAL_N, path: str = "auto") -> list[str]:
    """Kernels of one warm ``wq_linear_triton`` call with W4 g128 float16 operands on ``meta``."""
    from lightning_quant.kernels.wq_matmul import wq_linear_triton

    x, qweight, scales = _wq_operands(m, k, n)
    return count_launches(lambda: wq_linear_triton(x, qweight, scales, None, None, None, 4, 128, path))


def int8_layer_launches(m: int, k: int = GOAL_K, n: int = GOAL_N) -> list[str]:
    """Kernels of one warm ``Int8OutlierLinear`` forward (threshold 6, float16 input, with bias) on ``meta``:
    the layer's forward is :func:`~lightning_quant.kernels.int8_matmul.int8_outlier_matmul` on the flat input."""
    from lightning_quant.kernels.int8_matmul import int8_outlier_matmul

    x = torch.empty(m, k, dtype=torch.float16, device="meta")
    codes = torch.empty(n, k, dtype=torch.int8, device="meta")
    scb = torch.empty(n, dtype=torch.float32, device="meta")
    bias = torch.empty(n, dtype=torch.float16, device="meta")
    return count_launches(lambda: int8_outlier_matmul(x, codes, scb, 6.0, bias=bias, out_dtype=x.dtype))


def _loop_ratio(build) -> float:
    c = build.constants
    return build.loop_instructions * build.num_warps / (c["BLOCK_K"] * c["BLOCK_N"])


def _best(builds: list):
    looped = [b for b in builds if b.loop_instructions]
    if not looped:
        raise RuntimeError(f"no main loop found in the SASS of {[b.describe() for b in builds]}")
    return min(looped, key=_loop_ratio)


def _family_builds(family: str, arch: int) -> list:
    from lightning_quant.kernels import aot

    if family == "int8":  # the layer's kernel: the fused rescale / residual / bias / cast epilogue
        return aot.int8_builds(arch, scaled=True)
    if family == "gemv":
        return aot.gemv_builds(arch, torch.float16, 4, 128, symmetric=True, bias=False)
    if family == "prefill":
        return aot.dequant_builds(arch, torch.float16, 4, 128, symmetric=True)
    return aot.wq_builds(arch, torch.float16, 4, 128, symmetric=True, bias=False, paths=(family,))


def profile_lines(arch: int = 90, rows=ROWS) -> list[ProfileLine]:
    """One :class:`ProfileLine` per ``(family, M)`` of ``rows`` at the goal shape."""
    from lightning_quant.kernels.wq_matmul import splitk_row_tile

    lines, builds, cache = [], {}, {}
    for family, m in rows:
        if family not in builds:
            builds[family] = _family_builds(family, arch)
        tile = splitk_row_tile(m) if family == "splitk" else None  # the row tile the autotuner keeps for M
        if (family, tile) not in cache:
            cache[family, tile] = _best([b for b in builds[family] if tile is None or b.constants["BLOCK_M"] == tile])
        b = cache[family, tile]
        launched = int8_layer_launches(m) if family == "int8" else wq_launches(m, path=family)
        c = b.constants
        cfg = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        cfg += f"/split{c['SPLIT_K']}" if "SPLIT_K" in c else ""
        lines.append(ProfileLine(family, m, GOAL_N, GOAL_K, _loop_ratio(b), len(launched), b.spill_bytes,
                                 b.shared_bytes / 1024, b.registers, f"{cfg}/w{b.num_warps}", tuple(launched)))
    return lines


def profile(arch: int = 90) -> None:
    """Print the profile lines and the goals (``python -m lightning_quant.kernels.profile``)."""
    import triton

    print(f"# static profile: triton {triton.__version__}, sm_{arch}{'a' if arch >= 90 else ''}, "
          f"W4 g128 sym float16 (int8: the Int8OutlierLinear layer), K x N = {GOAL_K} x {GOAL_N}")
    print("# goals: gemv instr_per_weight <= 0.10, gemm <= 0.15, launches == 1 per decode call, spills == 0")
    for line in profile_lines(arch):
        print(line.describe(), flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Static profile of the packed kernels at the goal shapes (sm_90a SASS).")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    profile(parser.parse_args().arch)
