import copy

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant import primitives as P
from lightning_quant.algorithms import rtn_quantize
from lightning_quant.layers import PackedLinear
from lightning_quant.targets import linear_weight


def test_rtn_formula_exact():
    spec = QuantSpec(4, 32, symmetric=False)
    w = torch.randn(8, 80)
    qw = rtn_quantize(w, spec)
    lo, hi = P.group_minmax(w, spec)
    scale, zero = P.qparams_from_minmax(lo, hi, spec)
    assert torch.equal(qw.scales, scale) and torch.equal(qw.zeros, zero)
    g = torch.arange(80) // 32
    expected = torch.clamp(torch.round(w / scale[:, g]) + zero[:, g], 0, 15)
    assert torch.equal(qw.codes.float(), expected)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, -1), QuantSpec(3, 32, symmetric=False), QuantSpec(2, 16)])
def test_quantize_model_converts_every_target(tiny_model, spec):
    x = torch.randint(0, 256, (2, 12))
    ref_model = copy.deepcopy(tiny_model)
    lm_head = tiny_model.lm_head
    weights = quantize_model(tiny_model, spec)
    targets = {n for n, m in ref_model.named_modules() if n and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}
    assert set(weights) == targets - {"lm_head"}
    for name in weights:
        layer = tiny_model.get_submodule(name)
        assert isinstance(layer, PackedLinear)
        w = linear_weight(ref_model.get_submodule(name)).detach()
        # the layer's error is the RTN formula's error, element for element
        assert torch.equal(layer.dequantize(), rtn_quantize(w, spec).dequantize())
    assert tiny_model.lm_head is lm_head
    assert torch.isfinite(tiny_model(x).logits).all()


def test_conv1d_weight_is_transposed(tmp_path):
    from lightning_quant.testing import tiny_gpt2

    m = tiny_gpt2()
    x = torch.randn(3, 96)
    c_fc = m.transformer.h[0].mlp.c_fc  # Conv1D, weight [in=96, out=384]
    quantize_model(m, QuantSpec(8, -1), include=["transformer.h.0.mlp.c_fc"])
    packed = m.transformer.h[0].mlp.c_fc
    assert (packed.in_features, packed.out_features) == (96, 384)
    torch.testing.assert_close(packed(x), c_fc(x), atol=0.05, rtol=0.05)


def test_filters(tiny_llama):
    w = quantize_model(tiny_llama, QuantSpec(4, 32), include=["q_proj", "re:mlp\\.down"], exclude=["layers.1.self_attn.q_proj"])
    assert sorted(w) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_filter_matching_nothing_raises(tiny_llama):
    with pytest.raises(ValueError, match="include pattern 'qkv_proj' matched no linear layer.*q_proj"):
        quantize_model(tiny_llama, QuantSpec(), include=["qkv_proj"])
    with pytest.raises(ValueError, match="No linear layer left to quantize.*Loosen the filters"):
        quantize_model(tiny_llama, QuantSpec(4, 32), exclude=["re:.*"])


def test_nan_weights_raise_naming_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj contains 1 NaN/Inf"):
        quantize_model(tiny_llama, QuantSpec(4, 32))


def test_group_size_that_cannot_work(tiny_llama):
    with pytest.raises(ValueError, match="group_size=128 is larger than the layer's in_features=96"):
        quantize_model(tiny_llama, QuantSpec(4, 128))


def test_unknown_method_and_calibration_errors(tiny_llama):
    with pytest.raises(ValueError, match="Unknown quantization method 'foo'; available:"):
        quantize_model(tiny_llama, QuantSpec(4, 32), method="foo")
    with pytest.raises(ValueError, match="method='rtn' uses no calibration data"):
        quantize_model(tiny_llama, QuantSpec(4, 32), calibration=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        quantize_model(tiny_llama, {"bits": 4})


@pytest.mark.slow
def test_rtn_on_smollm2_quality(smollm2, heldout_windows):
    """Real model: 8-bit is near-lossless; 4-bit g64 asymmetric beats symmetric on KL."""
    from lightning_quant.evaluation import evaluate_against, reference_logits

    ref = reference_logits(smollm2, heldout_windows)
    results = {}
    for spec in (QuantSpec(8, -1), QuantSpec(4, 64), QuantSpec(4, 64, symmetric=False)):
        m = copy.deepcopy(smollm2)
        quantize_model(m, spec)
        results[str(spec)] = evaluate_against(m, ref, heldout_windows)
    base = evaluate_against(smollm2, ref, heldout_windows)["ppl"]
    assert abs(results["W8ch"]["ppl"] / base - 1) < 0.01
    assert results["W4g64"]["ppl"] > results["W8ch"]["ppl"]
    assert results["W4g64-asym"]["kl"] < results["W4g64"]["kl"]
