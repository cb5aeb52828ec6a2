"""Launch counts per call (counted on ``meta`` from the Python path) and the GEMV's compiled resources.

The instruction ratios are printed by ``python -m lightning_quant.kernels.profile`` (a
benchmark), not asserted here; launch counts, spills and shared memory are.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed on this platform")

from lightning_quant import packing
from lightning_quant.kernels import profile
from lightning_quant.kernels._runtime import interpreting

if interpreting():
    pytest.skip("TRITON_INTERPRET=1 is set: these tests compile for sm_90 (or count the compiled launch path) and "
                "need Triton's compiler, which the interpreter replaces; run them without TRITON_INTERPRET",
                allow_module_level=True)
from lightning_quant.kernels.wq_gemv import GEMV_MAX_ROWS
from lightning_quant.kernels.wq_matmul import wq_linear_triton


def _meta_operands(m, k, n, bits, group, asym, act_order, bias, dtype=torch.float16):
    meta = {"device": "meta"}
    groups = 1 if group == -1 else k // group
    return {"x": torch.empty(m, k, dtype=dtype, **meta),
                "qweight": torch.empty(packing.packed_len(k, bits), n, dtype=torch.int32, **meta),
                "scales": torch.empty(groups, n, dtype=dtype, **meta),
                "qzeros": torch.empty(groups, packing.packed_len(n, bits), dtype=torch.int32, **meta) if asym else None,
                "perm": torch.empty(k, dtype=torch.int64, **meta) if act_order else None,
                "bias": torch.empty(n, dtype=dtype, **meta) if bias else None}


@pytest.mark.parametrize("m", range(1, GEMV_MAX_ROWS + 1))
@pytest.mark.parametrize("bits,group,asym,act_order,bias", [(4, 128, False, False, False), (4, 128, True, True, True),
                                                            (8, -1, True, False, True), (2, 64, False, True, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_call_is_one_launch(m, bits, group, asym, act_order, bias, dtype):
    """No memset, cast or index_select around the GEMV: act-order, bias and the cast are in the kernel."""
    op = _meta_operands(m, 4096, 14336, bits, group, asym, act_order, bias, dtype)
    launched = profile.count_launches(lambda: wq_linear_triton(bits=bits, group_size=group, **op))
    assert launched == ["triton::_wq_gemv_kernel"]


@pytest.mark.parametrize("m", [9, 16, 33, 64])
@pytest.mark.parametrize("act_order,bias", [(False, False), (True, True)])
def test_split_k_call_is_one_launch(m, act_order, bias):
    """The tensor-core split-K path (M = 9..64): no memset, cast or index_select around it (the workspace,
    the bias, the cast and the act-order gather are in the kernel); the tiled GEMM keeps its one input
    gather with act-order, which the counter must see, or the figures mean nothing."""
    op = _meta_operands(m, 4096, 14336, 4, 128, False, act_order, bias)
    launched = profile.count_launches(lambda: wq_linear_triton(bits=4, group_size=128, **op))  # auto
    assert launched == ["triton::_wq_kernel"]
    op = _meta_operands(128, 4096, 14336, 4, 128, False, True, True)
    launched = profile.count_launches(lambda: wq_linear_triton(bits=4, group_size=128, **op))
    assert sorted(launched) == ["aten::index_select", "triton::_wq_kernel"]


@pytest.mark.parametrize("bits,group,asym,act_order,bias", [(4, 128, False, False, False), (4, 128, True, True, True),
                                                            (8, -1, True, False, True), (2, 64, False, True, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_prefill_call_is_two_launches(bits, group, asym, act_order, bias, dtype):
    """Dequantize once, then one cuBLAS GEMM (with the bias): act-order needs no input gather."""
    op = _meta_operands(4096, 4096, 14336, bits, group, asym, act_order, bias, dtype)
    launched = profile.count_launches(lambda: wq_linear_triton(bits=bits, group_size=group, **op))  # auto
    assert launched == ["triton::_wq_dequant_kernel", "aten::addmm" if bias else "aten::mm"]
    assert profile.wq_launches(4096, path="prefill") == ["triton::_wq_dequant_kernel", "aten::mm"]


#: Kernels of one Int8OutlierLinear forward (threshold 6, bias, float16 out): 37 before the fused epilogue
#: (int8 matmul, then 9 elementwise ops for the rescale, outlier product add, bias and cast), 28 with it,
#: 20 with the row-quantization kernel (masking, absmax, scale, round, clamp and int8 cast: 9 ops -> 1).
#: Lower it when more is fused; it must not go up.
INT8_LAYER_LAUNCHES = 20


def test_int8_layer_forward_has_no_host_sync_and_one_fused_int8_matmul():
    launched = profile.int8_layer_launches(512, 256, 384)
    assert launched.count("lightning_quant::int8_matmul_scaled") == 1
    assert launched.count("lightning_quant::int8_quantize_rows") == 1
    assert not {"aten::masked_fill", "aten::amax", "aten::round", "aten::clamp_"} & set(launched)
    assert "lightning_quant::int8_matmul" not in launched  # the unfused int32 product is gone
    assert len(launched) == INT8_LAYER_LAUNCHES, launched
    # nothing between the matmul and the output: rescale, residual, bias and cast are in its epilogue
    assert launched[-1] == "lightning_quant::int8_matmul_scaled"


def test_profile_line_format():
    line = profile.ProfileLine("gemv", 1, 14336, 4096, 0.0912, 1, 0, 0.1, 96, "1x128x64/split1/w1",
                               ("triton::_wq_gemv_kernel",))
    assert line.describe().startswith("profile gemv 1x14336x4096 instr_per_weight=0.091 launches=1 spills=0 "
                                      "smem_kib=0.1 regs=96")
    assert "goal<=0.1 PASS" in line.describe()
