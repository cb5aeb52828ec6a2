"""Every autotune config of every kernel compiles for the H100/H200 (``sm_90``) on this CPU machine,
fits in shared memory and does not spill registers; Hopper tiles use ``wgmma``."""

from __future__ import annotations

import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed on this platform")
pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton build has no CUDA backend (ptxas)")

from lightning_quant.kernels import aot
from lightning_quant.kernels._runtime import interpreting

if interpreting():
    pytest.skip("TRITON_INTERPRET=1 is set: these tests compile for sm_90 (or count the compiled launch path) and "
                "need Triton's compiler, which the interpreter replaces; run them without TRITON_INTERPRET",
                allow_module_level=True)

# (dtype, bits, group_size, symmetric): the group branches of the kernel — one scale row per K block
# (128, -1), whole groups broadcast inside a block (32) — in both activation dtypes, both code widths;
# the float16 pair operand (W4 g128) and the float32 dequantization (W8, g32); bfloat16's pairs below.
WQ_CASES = [(torch.float16, 4, 128, False), (torch.float16, 4, 32, False), (torch.bfloat16, 8, -1, True)]


def _check(builds: list[aot.KernelBuild]) -> None:
    assert builds
    bad = [b.describe() for b in builds if not b.fits_shared_memory or b.spill_bytes > 0]
    assert not bad, "configs that cannot launch or that spill:\n" + "\n".join(bad)


@pytest.mark.parametrize("case", WQ_CASES, ids=lambda c: f"{str(c[0])[6:]}-W{c[1]}g{c[2]}{'' if c[3] else 'a'}")
def test_wq_kernel_configs_compile_for_sm90_without_spills(case):
    dtype, bits, group, sym = case
    builds = aot.wq_builds(90, dtype, bits, group, sym)
    _check(builds)
    gemm = [b for b in builds if b.name == "wq-gemm" and b.constants["BLOCK_M"] >= 64]
    assert gemm and all(b.mma_version == 3 for b in gemm)  # Hopper warp-group MMA, not mma.sync


def test_bfloat16_pair_operand_configs_compile_for_sm90_without_spills():
    """The tensor-core GEMM's bfloat16 pair operand (W4 g128 asymmetric, incl. the 64x256x64 tile kept for it)."""
    builds = aot.wq_builds(90, torch.bfloat16, 4, 128, False, paths=("gemm",))
    _check(builds)
    assert any(b.constants["BLOCK_N"] == 256 and b.constants["BLOCK_M"] == 64 for b in builds)


def test_int8_kernel_configs_compile_for_sm90_without_spills():
    builds = aot.int8_builds(90)
    _check(builds)
    assert any(b.mma_version == 3 for b in builds)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_int8_scaled_epilogue_configs_compile_for_sm90_without_spills(out_dtype):
    """The fused epilogue (scales, residual, bias, cast) of every config: fits, no spills, IMMA via wgmma."""
    builds = aot.int8_builds(90, scaled=True, out_dtype=out_dtype)
    _check(builds)
    assert any(b.mma_version == 3 for b in builds)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int8_row_quantization_kernel_compiles_for_sm90_without_spills(dtype):
    _check(aot.rowquant_builds(90, dtype))


def test_a100_builds_fit_its_shared_memory():
    builds = aot.wq_builds(80, torch.float16, 4, 128, False, paths=("splitk",))
    assert all(b.arch == 80 and b.fits_shared_memory and b.mma_version == 2 for b in builds)


def test_compile_kernel_names_missing_arguments():
    from lightning_quant.kernels import int8_matmul

    jit = int8_matmul._build(False)["jit"]
    with pytest.raises(ValueError, match=r"no type or constant given for arguments \['M_BUCKET'"):
        aot.compile_kernel(jit, {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*i32", "rs_ptr": "*fp32", "cs_ptr": "*fp32",
                                 "bias_ptr": "*fp16", "res_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                                 "divisor": "fp32"},
                           {"SCALED": False, "HAS_BIAS": False, "HAS_RESIDUAL": False, "BLOCK_M": 16, "BLOCK_N": 64,
                            "BLOCK_K": 64}, num_warps=4, num_stages=2)


def test_command_line_prints_one_row_per_config(capsys):
    import triton

    from lightning_quant.kernels import int8_matmul

    aot.main(["--family", "int8", "--arch", "80"])
    rows = capsys.readouterr().out.strip().splitlines()
    # the int32 store, the fused epilogue and the activation-quantization kernel
    assert len(rows) == len(int8_matmul._configs(triton)) + len(int8_matmul._configs(triton, scaled=True)) + 1
    assert sum(r.startswith("int8-rowquant") for r in rows) == 1
    assert all(r.startswith("int8") and "smem" in r and "spill" in r for r in rows)
    assert sum(r.startswith("int8-scaled") for r in rows) == len(int8_matmul._configs(triton, scaled=True))


def test_ptxas_failure_names_the_target():
    with pytest.raises(RuntimeError, match=r"ptxas failed for sm_90a \(exit [1-9]"):
        aot._ptxas_resources("this is not PTX", 90)


@pytest.mark.parametrize("dtype,rows", [(torch.float16, 1), (torch.float16, 8), (torch.bfloat16, 1)], ids=str)
def test_gemv_configs_compile_for_sm90_without_spills(dtype, rows):
    """W4 g128 asymmetric act-order with bias (the heaviest variant) at 1 and 8 rows; bfloat16's pairs too."""
    builds = aot.gemv_builds(90, dtype, 4, 128, symmetric=False, bias=True, act_order=True, rows=rows)
    _check(builds)
    assert all(b.mma_version is None and b.loop_instructions for b in builds)  # no tensor cores; a main loop


@pytest.mark.parametrize("case", [(torch.float16, 4, 128, False, False), (torch.float16, 4, 32, False, True),
                                  (torch.bfloat16, 8, -1, True, False), (torch.float16, 2, 64, True, True),
                                  (torch.float32, 4, 128, False, False)],
                         ids=lambda c: f"{str(c[0])[6:]}-W{c[1]}g{c[2]}{'' if c[3] else 'a'}{'-ao' if c[4] else ''}")
def test_prefill_dequant_configs_compile_for_sm90_without_spills(case):
    """The prefill path's dequantization kernel: float16 magic (HALF), float32 magic to bfloat16/float32,
    act-order's row scatter; no tensor cores, a main loop."""
    dtype, bits, group, sym, act_order = case
    builds = aot.dequant_builds(90, dtype, bits, group, sym, act_order)
    _check(builds)
    assert all(b.mma_version is None and b.loop_instructions for b in builds)


def test_main_loop_is_the_innermost_loop_that_loads():
    sass = textwrap.dedent("""\
                /*0000*/                   MOV R1, R2 ;
        .L_x_0:
                /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
                /*0020*/                   FFMA R5, R4, R4, R5 ;
                /*0030*/              @!P0 BRA `(.L_x_0) ;
        .L_x_1:
                /*0040*/                   IADD3 R1, R1, 0x1, RZ ;
                /*0050*/               @P1 BRA `(.L_x_1) ;
        """)
    assert aot.main_loop_instructions(sass) == {"LDG": 1, "FFMA": 1, "BRA": 1}
    assert aot.main_loop_instructions("        /*0000*/                   EXIT ;") is None
