"""HF-directory exports: checkpoint size, config contents, the real SmolLM2 (slow)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_model

from lightning_quant import QuantSpec, export, quantize_model
from lightning_quant.export import io


def _linear_dominated_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_w4_g128_checkpoint_is_at_most_028_of_float16(tmp_path):
    model = _linear_dominated_llama()
    save_model(copy.deepcopy(model).half(), str(tmp_path / "fp16.safetensors"))
    fp16 = (tmp_path / "fp16.safetensors").stat().st_size
    quantize_model(model, QuantSpec(bits=4, group_size=128))
    for fmt in ("gptq", "awq", "compressed-tensors"):
        export.save(model, tmp_path / fmt, fmt, dtype=torch.float16)
        size = (tmp_path / fmt / io.SAFE_NAME).stat().st_size
        ratio = size / fp16
        print(f"{fmt}: {size} B / float16 {fp16} B = {ratio:.3f}")
        assert ratio <= 0.28, fmt
        cfg = json.loads((tmp_path / fmt / "config.json").read_text())
        assert cfg["dtype"] == "float16" and cfg["architectures"] == ["LlamaForCausalLM"]


def test_dtype_option_casts_plain_tensors_only(tmp_path):
    from safetensors.torch import load_file

    from tests.export.conftest import packed_tiny

    export.save(packed_tiny(), tmp_path / "m", "gptq", dtype=torch.bfloat16)
    t = load_file(str(tmp_path / "m" / io.SAFE_NAME))
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16
    assert export.load(tmp_path / "m").model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        export.save(packed_tiny(), tmp_path / "n", "gptq", dtype="half")


@pytest.mark.slow
def test_smollm2_compressed_tensors_real_client(tmp_path, smollm2, heldout_windows):
    """SmolLM2-135M (hidden 576): W4 g64 compressed-tensors read by transformers gives our logits.
    Two decoder blocks are quantized (all their 7 linear kinds) to keep the test within budget."""
    from transformers import AutoModelForCausalLM

    ids = heldout_windows[:1, :64]
    model = copy.deepcopy(smollm2)
    quantize_model(model, QuantSpec(bits=4, group_size=64), include=[r"re:layers\.(0|29)\."])
    ref = model(ids).logits
    export.save(model, tmp_path / "ct", "compressed-tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(client(ids).logits, ref, rtol=0, atol=1e-4)
