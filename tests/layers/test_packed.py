import pytest
import torch

from lightning_quant import QuantSpec
from lightning_quant import primitives as P
from lightning_quant.algorithms import rtn_quantize
from lightning_quant.layers import PackedLinear
from lightning_quant.quantized import QuantizedWeight

SPECS = [QuantSpec(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32) for s in (True, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_packed_equals_dequantized_linear(spec, act_order):
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 80), torch.randn(24), torch.randn(5, 80)
    g_idx = None
    if act_order:
        perm = torch.randperm(80)
        g_idx = torch.empty(80, dtype=torch.long)
        g_idx[perm] = torch.arange(80) // spec.effective_group_size(80)
    scale, zero = P.compute_qparams(w, spec, g_idx)
    qw = QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)
    layer = PackedLinear.from_quantized(qw, b)
    assert layer.act_order == (act_order and spec.group_size != -1)  # per channel: one group
    assert torch.equal(layer.dequantize(), qw.dequantize())
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, qw.dequantize(), b))
    back = layer.to_quantized()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)


def test_state_dict_roundtrip():
    qw = rtn_quantize(torch.randn(16, 96), QuantSpec(4, 64, symmetric=False))
    a = PackedLinear.from_quantized(qw, torch.randn(16))
    b = PackedLinear(96, 16, QuantSpec(4, 64, symmetric=False), bias=True)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.bias, b.bias)
    assert a.qweight.dtype == torch.int32 and a.qweight.shape == (96 * 4 // 32, 16)


def test_input_scale_and_activation_quant():
    from lightning_quant.spec import ActivationSpec

    torch.manual_seed(0)
    w, x = torch.randn(8, 32), torch.randn(3, 32)
    s = torch.rand(32) + 0.5
    qw = rtn_quantize(w * s, QuantSpec(8, -1))  # fold s into the weight, undo it on the input
    layer = PackedLinear.from_quantized(qw, input_scale=s, act_spec=ActivationSpec())
    expected = torch.nn.functional.linear(P.fake_quantize_activation(x / s, ActivationSpec()), qw.dequantize())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), x @ w.t(), atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="input_scale must have shape \\[in\\] = \\(32,\\)"):
        PackedLinear.from_quantized(qw, input_scale=torch.ones(31))
