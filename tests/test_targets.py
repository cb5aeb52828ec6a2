"""One target selection for every method: logical names under peft, Conv1D always known, patterns checked once."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_quant import QuantSpec, quantize_model, testing
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.targets import check_patterns, get_layer, select_linears, select_targets


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **kw))


def test_peft_layers_are_named_by_their_host_and_adapters_are_never_targets():
    plain = select_targets(testing.tiny_llama())
    wrapped = select_targets(_peft(testing.tiny_llama()))
    prefix = "base_model.model."
    assert {prefix + n for n in plain} == set(wrapped)
    q = wrapped[prefix + "model.layers.0.self_attn.q_proj"]
    assert q.path.endswith("q_proj.base_layer") and q.host is not None and isinstance(q.module, nn.Linear)
    assert not any("lora_" in n or "lora_" in t.path for n, t in wrapped.items())
    # include / exclude mean the same with and without peft
    assert len(select_linears(_peft(testing.tiny_llama()), include=["q_proj"])) == 2
    assert len(select_linears(testing.tiny_llama(), include=["q_proj"])) == 2


def test_registering_a_kind_keeps_gpt2_conv1d():
    """A user's register_linear_kind before the first selection must not hide transformers' Conv1D."""
    code = (
        "from torch import nn\n"
        "from lightning_quant import targets, testing\n"
        "class Mine(nn.Module):\n"
        "    pass\n"
        "targets.register_linear_kind(Mine, targets.LinearKind('mine', lambda m: m.weight, lambda m: None))\n"
        "names = targets.select_linears(testing.tiny_gpt2())\n"
        "assert any(n.endswith('attn.c_attn') for n in names), names\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8"


@pytest.mark.parametrize(("patterns", "match"), [
    ("q_proj", "must be a list of module-name patterns.*write \\['q_proj'\\]"),
    ([""], "non-empty strings"),
    (["re:("], "not a valid regular expression"),
    ([3], "non-empty strings"),
])
def test_patterns_are_validated_once_with_one_error_type(patterns, match):
    with pytest.raises(ValueError, match=match):
        check_patterns(patterns, "include")
    with pytest.raises(ValueError, match=match):
        select_linears(testing.tiny_llama(), include=patterns)
    from lightning_quant.callbacks import GPTQ, QuantizationAwareTraining

    with pytest.raises(ValueError, match=match):
        GPTQ(QuantSpec(4, 32), include=patterns)
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(QuantSpec(4, 32), include=patterns)


def test_ptq_merges_lora_by_default_and_keeps_it_separate_on_request():
    ids = testing.random_token_batches(2, 16, 2)
    merged_ref = _peft(testing.tiny_llama(), init_lora_weights=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in merged_ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    separate = _peft(testing.tiny_llama(), init_lora_weights=False)
    separate.load_state_dict(merged_ref.state_dict())
    quantize_model(merged_ref, QuantSpec(4, 32), "gptq", calibration=ids)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert isinstance(merged_ref.get_submodule(name), PackedLinear)  # the host became one packed layer
    assert not any("lora_" in n for n, _ in merged_ref.named_modules())
    quantize_model(separate, QuantSpec(4, 32), "gptq", calibration=ids, lora="separate")
    host = separate.get_submodule(name)
    assert isinstance(get_layer(separate, name), PackedLinear) and host.lora_B["default"].weight.abs().sum() > 0
    with torch.no_grad():
        assert torch.isfinite(separate(ids[0]).logits).all()
    with pytest.raises(ValueError, match="lora='bogus' is not supported; use one of"):
        quantize_model(_peft(testing.tiny_llama()), QuantSpec(4, 32), "rtn", lora="bogus")


def test_unsupported_adapter_type_names_the_supported_ones():
    model = _peft(testing.tiny_llama(), use_dora=True)
    with pytest.raises(NotImplementedError, match="LoRA variants .* not supported by method='rtn'.*supported: peft LoRA"):
        quantize_model(model, QuantSpec(4, 32), "rtn")


def test_a_spec_the_method_cannot_honour_is_refused_before_adapters_are_merged():
    model = _peft(testing.tiny_llama())
    with pytest.raises(ValueError, match="method='int8' got"):
        quantize_model(model, QuantSpec(bits=4, group_size=32), "int8")
    assert any("lora_A" in n for n, _ in model.named_modules())  # nothing was merged


def test_modules_to_save_copies_are_one_layer_under_the_wrapper_name():
    """peft's modules_to_save keeps a trainable copy of lm_head next to the original: one logical layer
    'lm_head' (excluded by default like a plain head); included, its active copy is quantized."""
    model = _peft(testing.tiny_llama(), modules_to_save=["lm_head"])
    assert not [n for n in select_targets(model) if "lm_head" in n]
    head = select_targets(model, include=["lm_head"], exclude=None)
    (name, t), = head.items()
    assert name == "base_model.model.lm_head" and t.path.endswith("modules_to_save.default")
    quantize_model(model, QuantSpec(4, 32), "rtn", include=["lm_head"], exclude=None)
    assert isinstance(model.get_submodule(name), PackedLinear)
