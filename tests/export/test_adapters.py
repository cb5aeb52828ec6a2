"""A quantized base with LoRA adapters kept separate: base in the format, adapters in peft's own files."""

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from lightning_quant import QuantSpec, export, quantize_model, testing
from lightning_quant.export.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lightning_quant.integrations.peft import PackedLoraLinear


def _separate(model=None):
    model = get_peft_model(model or testing.tiny_llama(),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    quantize_model(model, QuantSpec(4, 32), "rtn", lora="separate")
    return model.eval()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_separate_adapters_round_trip_and_the_model_is_unchanged(fmt, tmp_path):
    model = _separate()
    ids = testing.random_token_batches(1, 12, 2)[0]
    modules = dict(model.named_modules())
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    export.save(model, tmp_path / "out", fmt)
    assert dict(model.named_modules()) == modules  # hosts put back after the write
    assert (tmp_path / "out" / ADAPTER_WEIGHTS).exists() and (tmp_path / "out" / ADAPTER_CONFIG).exists()
    loaded = export.load(tmp_path / "out")
    q = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_adapter_layers_outside_a_peft_model_and_several_adapters_raise(tmp_path):
    plain = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"]), testing.tiny_llama())
    quantize_model(plain, QuantSpec(4, 32), "rtn", lora="separate")
    with pytest.raises(ValueError, match="is not a PeftModel; export the PeftModel"):
        export.save(plain, tmp_path / "a", "gptq")
    two = _separate()
    two.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="supports one adapter, the model has \\['default', 'other'\\]"):
        export.save(two, tmp_path / "b", "gptq")
    assert not (tmp_path / "b").exists()  # atomic: nothing half-written
