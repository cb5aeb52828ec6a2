import pytest
import torch
from torch import nn

from lightning_quant.layers.int8 import Int8OutlierLinear


def _w8a8_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Independent W8A8 absmax reference: per-row weight codes, per-token activation codes, float32 scaling."""
    w_abs = w.abs().amax(1)
    wq = torch.round(w * 127.0 / w_abs[:, None]).clamp(-127, 127)
    x_abs = x.abs().amax(1)
    xq = torch.round(x * 127.0 / x_abs[:, None].clamp_min(torch.finfo(torch.float32).tiny)).clamp(-127, 127)
    acc = (xq.double() @ wq.double().t()).float()  # integers < 2^24: exact in float32
    y = acc * (x_abs / 127.0)[:, None] * (w_abs / 127.0)[None, :]
    return y if bias is None else y + bias


def _linear(in_f=96, out_f=40, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin


def test_buffers_follow_the_bitsandbytes_contract():
    lin = _linear()
    layer = Int8OutlierLinear.from_linear(lin)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (40, 96)
    assert layer.SCB.dtype == torch.float32 and layer.SCB.shape == (40,)
    w = lin.weight.detach()
    assert torch.equal(layer.SCB, w.abs().amax(1))
    assert torch.equal(layer.weight, torch.round(w * 127 / w.abs().amax(1, keepdim=True)).to(torch.int8))
    assert layer.threshold == 6.0 and (layer.in_features, layer.out_features) == (96, 40)
    # dequantize is within half a step of the float weight
    assert ((layer.dequantize() - w).abs() <= layer.SCB[:, None] / 254 + 1e-7).all()


def test_threshold_zero_equals_w8a8_reference_exactly():
    lin = _linear()
    layer = Int8OutlierLinear.from_linear(lin, threshold=0.0)
    x = torch.randn(2, 7, 96) * 3
    x[0, 3] = 0.0  # an all-zero token must not divide by zero
    y = layer(x)
    ref = _w8a8_reference(x.reshape(-1, 96), lin.weight.detach(), lin.bias.detach()).reshape(2, 7, 40)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert not layer.last_outliers.any()


def test_outlier_columns_take_the_float_path():
    lin = _linear(bias=False)
    layer = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    torch.manual_seed(1)
    x = torch.randn(12, 96).clamp(-3, 3)
    cols = [5, 17, 60]
    x[2, 5], x[7, 17], x[0, 60], x[11, 60] = 25.0, -40.0, 9.0, -7.5  # a single token suffices
    y = layer(x)
    expected_mask = torch.zeros(96, dtype=torch.bool)
    expected_mask[cols] = True
    assert torch.equal(layer.last_outliers, expected_mask)
    w_deq = layer.weight.float() * (layer.SCB / 127)[:, None]
    rest = x.clone()
    rest[:, cols] = 0
    ref = x[:, cols] @ w_deq[:, cols].t() + _w8a8_reference(rest, lin.weight.detach())
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)


def test_outlier_path_reduces_error_on_inputs_with_outliers():
    lin = _linear(in_f=256, out_f=64)
    x = torch.randn(32, 256)
    x[:, [10, 100, 200]] *= 60.0  # systematic outlier features, as in the paper
    ref = lin(x)
    err = {t: (Int8OutlierLinear.from_linear(lin, threshold=t)(x) - ref).pow(2).mean().item() for t in (0.0, 6.0)}
    assert err[6.0] * 20 < err[0.0], err


def test_conv1d_and_bf16_inputs():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 32)  # nx=32 in, nf=24 out; weight stored [in, out]
    layer = Int8OutlierLinear.from_linear(conv, threshold=0.0)
    assert layer.weight.shape == (24, 32)
    x = torch.randn(5, 32)
    ref = _w8a8_reference(x, conv.weight.detach().t(), conv.bias.detach())
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and yb.shape == (5, 24)


def test_state_dict_roundtrips_threshold_and_buffers():
    a = Int8OutlierLinear.from_linear(_linear(), threshold=3.5)
    b = Int8OutlierLinear(96, 40, bias=True)
    b.load_state_dict(a.state_dict())
    assert b.threshold == 3.5
    assert torch.equal(a.weight, b.weight) and torch.equal(a.SCB, b.SCB) and torch.equal(a.bias, b.bias)
    x = torch.randn(3, 96) * 4
    assert torch.equal(a(x), b(x))
    # tensors only (safetensors can store it): the threshold travels as a float32 scalar buffer
    from safetensors.torch import load, save

    sd = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and float(sd["outlier_threshold"]) == 3.5
    c = Int8OutlierLinear(96, 40, bias=True)
    c.load_state_dict(load(save(sd)))
    assert c.threshold == 3.5 and isinstance(c.threshold, float)


def test_from_quantized_matches_from_linear():
    from lightning_quant.algorithms.llm_int8 import int8_rowwise_quantize

    lin = _linear()
    qw = int8_rowwise_quantize(lin.weight.detach())
    a = Int8OutlierLinear.from_quantized(qw, lin.bias, threshold=6.0)
    b = Int8OutlierLinear.from_linear(lin)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.SCB, b.SCB)
    assert torch.equal(a.dequantize(), qw.dequantize())


def test_bad_inputs_raise():
    from lightning_quant import QuantSpec
    from lightning_quant.algorithms import rtn_quantize

    with pytest.raises(ValueError, match="threshold=-1.0 is invalid; use a finite value >= 0"):
        Int8OutlierLinear.from_linear(_linear(), threshold=-1.0)
    with pytest.raises(ValueError, match="threshold=nan is invalid"):
        Int8OutlierLinear(4, 4, threshold=float("nan"))
    with pytest.raises(TypeError, match="threshold must be a number"):
        Int8OutlierLinear(4, 4, threshold="6")
    lin = _linear()
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        Int8OutlierLinear.from_linear(lin)
    with pytest.raises(TypeError, match="takes a linear-like module"):
        Int8OutlierLinear.from_linear(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="Quantize with algorithms.llm_int8.int8_rowwise_quantize"):
        Int8OutlierLinear.from_quantized(rtn_quantize(torch.randn(8, 64), QuantSpec(4, 32)))
    layer = Int8OutlierLinear.from_linear(_linear())
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 96\]"):
        layer(torch.randn(2, 95))


def test_outlier_columns_beyond_the_static_width_stay_on_the_int8_path():
    """The float path has a static width (no host sync); the first ``max_outliers`` outlier columns
    take it, later ones are quantized with the rest."""
    from lightning_quant.kernels.int8_matmul import int8_outlier_matmul

    lin = _linear(bias=False)
    layer = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    torch.manual_seed(2)
    x = torch.randn(6, 96).clamp(-3, 3)
    x[1, 5], x[2, 17], x[4, 60] = 25.0, -40.0, 9.0
    y, outliers = int8_outlier_matmul(x, layer.weight, layer.SCB, 6.0, max_outliers=2)
    assert outliers.nonzero().squeeze(1).tolist() == [5, 17, 60]
    w_deq = layer.weight.float() * (layer.SCB / 127)[:, None]
    rest = x.clone()
    rest[:, [5, 17]] = 0  # column 60 is the third outlier: int8 path
    ref = x[:, [5, 17]] @ w_deq[:, [5, 17]].t() + _w8a8_reference(rest, lin.weight.detach())
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
    y_all, _ = int8_outlier_matmul(x, layer.weight, layer.SCB, 6.0)
    torch.testing.assert_close(y_all, layer(x), rtol=0, atol=0)


def test_forward_needs_no_host_sync():
    """On the ``meta`` device any ``bool(tensor)`` / ``.item()`` raises: the forward has none."""
    layer = Int8OutlierLinear(96, 40, bias=True, dtype=torch.float16, device="meta")
    y = layer(torch.empty(3, 96, dtype=torch.float16, device="meta"))
    assert y.shape == (3, 40) and y.dtype == torch.float16
