import pytest
import torch

from lightning_quant import QuantizedWeight, QuantSpec
from lightning_quant.algorithms import rtn_quantize


def test_dequantize_dtype_and_bits_per_weight():
    w = torch.randn(16, 96, dtype=torch.bfloat16)
    qw = rtn_quantize(w, QuantSpec(4, 64))
    assert qw.dtype == torch.bfloat16 and qw.dequantize().dtype == torch.bfloat16
    assert qw.num_groups == 2  # 64 + a partial group of 32
    assert qw.bits_per_weight() == pytest.approx(4 + 2 * 16 / 96)


def test_validation_errors():
    spec = QuantSpec(4, 8)
    codes = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scales must be \\[out, G\\] = \\(2, 2\\)"):
        QuantizedWeight(codes, torch.ones(2, 3), None, spec)
    with pytest.raises(ValueError, match="zeros must be None exactly when the spec is symmetric"):
        QuantizedWeight(codes, torch.ones(2, 2), torch.zeros(2, 2), spec)
    with pytest.raises(ValueError, match="codes must be uint8"):
        QuantizedWeight(codes.int(), torch.ones(2, 2), None, spec)
    with pytest.raises(ValueError, match="codes exceed 15"):
        QuantizedWeight(codes + 16, torch.ones(2, 2), None, spec)
    with pytest.raises(ValueError, match="g_idx must have shape \\[in\\]"):
        QuantizedWeight(codes, torch.ones(2, 2), None, spec, g_idx=torch.zeros(3, dtype=torch.long))


def test_act_order_g_idx_dequantize():
    spec = QuantSpec(4, 4, scale_dtype="float32")
    w = torch.randn(3, 8)
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    from lightning_quant import primitives as P

    scale, zero = P.compute_qparams(w, spec, g_idx)
    qw = QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)
    assert not qw.has_trivial_groups
    s_full = scale[:, g_idx]
    assert ((qw.dequantize() - w).abs() <= s_full / 2 + 1e-6).all()


def test_quantized_weight_is_frozen():
    import dataclasses

    from lightning_quant.algorithms.rtn import rtn_quantize

    qw = rtn_quantize(torch.randn(4, 32), QuantSpec(4, 32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        qw.dtype = torch.float16
    assert dataclasses.replace(qw, dtype=torch.float16).dequantize().dtype == torch.float16


@pytest.mark.parametrize("symmetric", [True, False])
def test_zeros_or_midpoint_fills_the_implicit_symmetric_zero(symmetric):
    spec = QuantSpec(4, 32, symmetric=symmetric)
    qw = rtn_quantize(torch.randn(6, 96), spec)
    expected = torch.full((6, 3), 8.0) if symmetric else qw.zeros
    got = qw.zeros_or_midpoint()
    assert got.dtype == torch.float32 and torch.equal(got, expected)
