import dataclasses

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.llm_int8 import int8_rowwise, int8_rowwise_quantize, outlier_columns
from lightning_quant.api import convert_to_int8
from lightning_quant.layers.int8 import Int8OutlierLinear
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.methods.llm_int8 import INT8_METHOD_SPEC, LLMInt8Config, outlier_statistics
from lightning_quant.methods.registry import Method, get_method
from lightning_quant.targets import select_linears
from lightning_quant.testing import random_token_batches


def test_rowwise_quantized_weight_is_the_project_convention():
    w = torch.randn(16, 40)
    qw = int8_rowwise_quantize(w)
    signed = qw.codes.int() - 128
    assert int(signed.abs().max()) == 127 and int(qw.codes.min()) >= 1
    torch.testing.assert_close(qw.dequantize(), w, atol=float(w.abs().max()) / 254 + 1e-7, rtol=0)
    codes, scb = int8_rowwise(w)
    assert torch.equal(scb, w.abs().amax(1)) and torch.equal(qw.codes.int() - 128, codes.int())
    torch.testing.assert_close(qw.scales[:, 0], scb / 127, atol=0, rtol=0)


def test_int8_method_keeps_the_exact_row_absmax_and_threshold(tiny_llama):
    from lightning_quant.methods.llm_int8 import Int8Layer

    w = tiny_llama.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = quantize_model(tiny_llama, method="int8", config=LLMInt8Config(threshold=2.5))
    data = result.layers["model.layers.0.mlp.up_proj"]
    assert isinstance(data, Int8Layer) and data.threshold == 2.5 and torch.equal(data.scb, w.abs().amax(1))
    assert torch.equal(tiny_llama.model.layers[0].mlp.up_proj.SCB, data.scb) and result.figures == {}


def test_outlier_columns_any_row():
    x = torch.zeros(3, 5)
    x[1, 2], x[2, 4], x[0, 0] = 7.0, -6.5, 6.0  # exactly 6.0 is not above the threshold
    assert outlier_columns(x, 6.0).tolist() == [False, False, True, False, True]
    assert not outlier_columns(x, 0.0).any()


def test_quantize_model_int8_swaps_in_outlier_layers(tiny_model):
    ids = random_token_batches(1)[0]
    with torch.no_grad():
        ref = tiny_model(ids).logits
    targets = list(select_linears(tiny_model))
    weights = quantize_model(tiny_model, INT8_METHOD_SPEC, "int8", config=LLMInt8Config(threshold=6.0))
    assert sorted(weights) == sorted(targets)
    assert all(isinstance(tiny_model.get_submodule(n), Int8OutlierLinear) for n in targets)
    with torch.no_grad():
        out = tiny_model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, rel


def test_other_methods_keep_packed_linear_swap(tiny_llama):
    assert get_method("rtn").swap is None and get_method("int8").swap is not None
    quantize_model(tiny_llama, QuantSpec(4, 32), "rtn")
    assert isinstance(tiny_llama.get_submodule("model.layers.0.mlp.up_proj"), PackedLinear)


def test_convert_to_int8_threshold_and_filters(tiny_llama):
    convert_to_int8(tiny_llama, threshold=0.0, include=["mlp.up_proj"])
    up = tiny_llama.get_submodule("model.layers.1.mlp.up_proj")
    assert isinstance(up, Int8OutlierLinear) and up.threshold == 0.0
    assert not isinstance(tiny_llama.get_submodule("model.layers.1.mlp.down_proj"), Int8OutlierLinear)


def test_outlier_statistics_counts_columns(tiny_llama):
    batches = random_token_batches(2)
    targets = {n: m for n, m in select_linears(tiny_llama).items() if n.endswith("down_proj")}
    inputs = {n: [] for n in targets}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in targets.items()]
    with torch.no_grad():
        for b in batches:
            tiny_llama(b)
    for h in hooks:
        h.remove()
    t = 0.05
    stats = outlier_statistics(tiny_llama, targets, batches, threshold=t)
    for n, xs in inputs.items():
        expected = sum(int((x.abs() > t).any(0).sum()) for x in xs) / len(xs)
        assert stats[n]["outlier_columns"] == expected
        assert stats[n]["max_abs"] == pytest.approx(max(float(x.abs().max()) for x in xs))
    assert all(s["outlier_columns"] == 0 for s in outlier_statistics(tiny_llama, targets, batches, 0.0).values())


def test_int8_method_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match=r"QuantSpec.bits=4 cannot be honoured.*QuantSpec.group_size=32 cannot be "
                                         r"honoured.*Pass spec=INT8_METHOD_SPEC .* or omit the spec"):
        quantize_model(tiny_llama, QuantSpec(4, 32), "int8")
    with pytest.raises(ValueError, match="method='int8' uses no calibration data"):
        quantize_model(tiny_llama, INT8_METHOD_SPEC, "int8", calibration=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold=-0.5 is invalid"):
        LLMInt8Config(threshold=-0.5)
    targets = select_linears(tiny_llama)
    with pytest.raises(ValueError, match="no batches"):
        outlier_statistics(tiny_llama, targets, [], 6.0)
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        outlier_statistics(tiny_llama, targets, random_token_batches(1), 6.0)


@pytest.mark.parametrize("field, value, why", [
    ("bits", 4, "8-bit codes"),
    ("group_size", 64, r"one scale per output row \(group_size=-1\)"),
    ("symmetric", False, r"no zero point \(symmetric=True\)"),
    ("scale_dtype", "bfloat16", r"float32 row absmax \(SCB\)"),
    ("scale_dtype", "float16", r"float32 row absmax \(SCB\)"),  # QuantSpec's default is not silently replaced
])
def test_int8_rejects_every_spec_field_it_cannot_honour(tiny_llama, field, value, why):
    spec = dataclasses.replace(INT8_METHOD_SPEC, **{field: value})
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}={value!r} cannot be honoured: .*{why}.*"
                                         r"Pass spec=INT8_METHOD_SPEC .* or omit the spec"):
        quantize_model(tiny_llama, spec, "int8")
    assert not any(isinstance(m, Int8OutlierLinear) for m in tiny_llama.modules())  # raised before any layer was swapped


def test_every_spec_field_has_a_reason_in_the_int8_error():
    from lightning_quant.methods.llm_int8 import _FIXED_BECAUSE

    assert set(_FIXED_BECAUSE) == {f.name for f in dataclasses.fields(QuantSpec)}


def test_int8_takes_its_fixed_spec_when_none_is_given(tiny_llama):
    import copy

    assert get_method("int8").fixed_spec == INT8_METHOD_SPEC == QuantSpec(8, -1, symmetric=True, scale_dtype="float32")
    explicit = copy.deepcopy(tiny_llama)
    ids = random_token_batches(1)[0]
    implicit_w = quantize_model(tiny_llama, method="int8")
    explicit_w = quantize_model(explicit, INT8_METHOD_SPEC, "int8")
    assert implicit_w.keys() == explicit_w.keys()
    for name, qw in implicit_w.items():
        assert qw.spec == explicit_w[name].spec == INT8_METHOD_SPEC
        assert torch.equal(qw.codes, explicit_w[name].codes) and torch.equal(qw.scales, explicit_w[name].scales)
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, explicit(ids).logits)


def test_method_without_fixed_spec_needs_a_spec(tiny_llama):
    assert get_method("rtn").fixed_spec is None and get_method("gptq").fixed_spec is None
    with pytest.raises(ValueError, match=r"method='rtn' needs a QuantSpec, e.g. quantize_model\(model, "
                                         r"QuantSpec\(bits=4, group_size=128\), method='rtn'\)"):
        quantize_model(tiny_llama)
    with pytest.raises(ValueError, match="method='gptq' needs a QuantSpec"):
        quantize_model(tiny_llama, None, "gptq", calibration=random_token_batches(1))
    assert not any(isinstance(m, PackedLinear) for m in tiny_llama.modules())


def test_registered_fixed_spec_must_be_a_quantspec():
    with pytest.raises(TypeError, match="Method 'x': fixed_spec must be a QuantSpec or None, got dict"):
        Method("x", lambda *a: {}, needs_calibration=False, fixed_spec={"bits": 8})


@pytest.mark.slow
def test_smollm2_int8_perplexity_within_one_percent(smollm2, heldout_windows):
    import copy

    from lightning_quant.evaluation import perplexity

    windows = heldout_windows[:4]
    ppl_float = perplexity(smollm2, windows)
    model = copy.deepcopy(smollm2)
    convert_to_int8(model, threshold=6.0)
    ppl_int8 = perplexity(model, windows)
    print(f"SmolLM2 held-out ppl float={ppl_float:.4f} int8(t=6)={ppl_int8:.4f} ({ppl_int8 / ppl_float - 1:+.3%})")
    assert abs(ppl_int8 / ppl_float - 1) < 0.01


def test_cli_format_roundtrips_int8_layers(tiny_llama, tmp_path):
    from lightning_quant.cli import load_quantized, save_quantized

    ids = random_token_batches(1)[0]
    convert_to_int8(tiny_llama, threshold=2.5)
    save_quantized(tiny_llama, "int8", tmp_path)
    back = load_quantized(tmp_path)
    layer = back.model.layers[1].mlp.down_proj
    assert isinstance(layer, Int8OutlierLinear) and layer.threshold == 2.5
    with torch.no_grad():
        assert torch.equal(back(ids).logits, tiny_llama(ids).logits)
