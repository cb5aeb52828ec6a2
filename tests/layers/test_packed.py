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


def _act_order_weight(spec, k=96, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    perm = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[perm] = torch.arange(k) // spec.group_size
    scale, zero = P.compute_qparams(w, spec, g_idx)
    return QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(4, 64, False), QuantSpec(8, 32), QuantSpec(3, 64, False)],
                         ids=str)
def test_forward_is_exactly_dequantize_then_linear_on_cpu(spec):
    """K=96 with g64: a partial last group; act-order permutes once, the CPU result is still bit-exact."""
    qw = _act_order_weight(spec)
    bias = torch.randn(24)
    layer = PackedLinear.from_quantized(qw, bias)
    assert layer.act_order and torch.equal(layer.g_idx.long(), qw.g_idx)
    x = torch.randn(2, 7, 96)
    expected = torch.nn.functional.linear(x, qw.dequantize(), bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x, force_reference=True), expected)
    xb = x.to(torch.bfloat16)
    assert torch.equal(layer(xb), torch.nn.functional.linear(xb, qw.dequantize(torch.bfloat16), bias.bfloat16()))


def test_act_order_state_dict_roundtrip_keeps_permutation():
    spec = QuantSpec(4, 32, symmetric=False)
    a = PackedLinear.from_quantized(_act_order_weight(spec), torch.randn(24))
    b = PackedLinear(96, 24, spec, bias=True, act_order=True)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"qweight", "scales", "qzeros", "perm", "g_idx", "bias"}
    x = torch.randn(3, 96)
    assert torch.equal(a(x), b(x)) and torch.equal(a.to_quantized().codes, b.to_quantized().codes)


def test_unequal_act_order_groups_are_rejected():
    spec = QuantSpec(4, 32)
    w = torch.randn(8, 64)
    g_idx = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(24, dtype=torch.long)])  # groups of 40 and 24
    scale, zero = P.compute_qparams(w, spec, g_idx)
    qw = QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)
    with pytest.raises(ValueError, match="PackedLinear needs act-order groups of equal size"):
        PackedLinear.from_quantized(qw)


def test_torch_compile_traces_a_model_with_packed_layers_without_graph_breaks():
    torch.manual_seed(0)
    spec = QuantSpec(4, 32, symmetric=False)
    model = torch.nn.Sequential(
        PackedLinear.from_quantized(_act_order_weight(spec, k=64, n=48), torch.randn(48)),
        torch.nn.GELU(),
        PackedLinear.from_quantized(rtn_quantize(torch.randn(16, 48), QuantSpec(8, -1)), None),
    )
    x = torch.randn(5, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph=True: a graph break raises
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")
@pytest.mark.parametrize("rows", [1, 9, 200])
def test_cuda_forward_uses_kernels_close_to_reference(rows):
    from lightning_quant.kernels.wq_gemv import GEMV_MAX_ROWS
    from tests.kernels._cases import pair_gamma

    spec = QuantSpec(4, 128, symmetric=False)
    qw = _act_order_weight(spec, k=1024, n=760).to("cuda")
    layer = PackedLinear.from_quantized(qw, torch.randn(760, device="cuda")).half()
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.float16)
    y, ref = layer(x), layer(x, force_reference=True)
    exact = x.float() @ qw.dequantize(torch.float16).float().t() + layer.bias.float()
    magnitude = x.float().abs() @ qw.dequantize().abs().t()
    bound = 2.0**-10 * (magnitude + layer.bias.float().abs())
    assert ((ref.float() - exact).abs() <= bound).all()
    if rows <= GEMV_MAX_ROWS:  # the GEMV sums a step (BLOCK_K <= 64, autotuned) in float16 pairs
        bound = bound + pair_gamma(spec, torch.float16, layer.scales.dtype, 64) * magnitude
    assert ((y.float() - exact).abs() <= bound).all()


@pytest.mark.slow
def test_packed_smollm2_equals_its_dequantized_float_twin(smollm2, heldout_windows):
    """Real model, hidden 576 = 4 x 128 + 64 (partial last group): packed logits == float-dequantized logits."""
    import copy

    from lightning_quant import quantize_model

    packed = copy.deepcopy(smollm2)
    twin = copy.deepcopy(smollm2)
    weights = quantize_model(packed, QuantSpec(4, 128, symmetric=False), "rtn")
    assert len(weights) == 30 * 7
    with torch.no_grad():
        for name, qw in weights.items():
            twin.get_submodule(name).weight.copy_(qw.dequantize())
        ids = heldout_windows[:1, :64]
        assert torch.equal(packed(ids).logits, twin(ids).logits)
