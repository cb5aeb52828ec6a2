"""Export I/O: atomic writes, sharding, safetensors-only reading, and load-time validation."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_quant import export
from lightning_quant.export import io
from tests.export.conftest import packed_tiny


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_previous_export(tmp_path, ids, monkeypatch, exc):
    old = packed_tiny(4, 32, True, seed=0)
    export.save(old, tmp_path / "m", "gptq")
    before = _snapshot(tmp_path / "m")
    real_save = save_file

    def crash_after_partial_write(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # a truncated file...
        raise exc  # ...then the crash / Ctrl-C

    monkeypatch.setattr("safetensors.torch.save_file", crash_after_partial_write)
    with pytest.raises(type(exc)):
        export.save(packed_tiny(4, 32, True, seed=1), tmp_path / "m", "gptq", overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path / "m") == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind
    assert torch.equal(export.load(tmp_path / "m")(ids).logits, old(ids).logits)


def test_overwrite_replaces_and_existing_path_raises(tmp_path, ids):
    export.save(packed_tiny(seed=0), tmp_path / "m", "gptq")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        export.save(packed_tiny(seed=1), tmp_path / "m", "gptq")
    new = packed_tiny(seed=1)
    export.save(new, tmp_path / "m", "awq", overwrite=True)
    assert torch.equal(export.load(tmp_path / "m")(ids).logits, new(ids).logits)
    assert not (tmp_path / "m" / "quantize_config.json").exists()  # nothing left from the old export


def test_sharded_checkpoint_roundtrip(tmp_path, ids):
    model = packed_tiny()
    export.save(model, tmp_path / "m", "compressed-tensors", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "m" / io.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "m" / io.SAFE_NAME).exists()
    assert all(len(load_file(str(tmp_path / "m" / s))) for s in shards)
    assert torch.equal(export.load(tmp_path / "m")(ids).logits, model(ids).logits)


def test_tokenizer_files_written(tmp_path):
    class Tok:
        def save_pretrained(self, d):
            (tmp_path / "seen").write_text(d)
            (tmp_path.__class__(d) / "tokenizer.json").write_text("{}")

    export.save(packed_tiny(), tmp_path / "m", "gptq", tokenizer=Tok())
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_pickle_payload_refused(tmp_path):
    export.save(packed_tiny(), tmp_path / "m", "gptq")

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "m" / io.SAFE_NAME).write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ValueError, match="not a valid safetensors file.*pickled checkpoints are refused"):
        export.load(tmp_path / "m")
    (tmp_path / "m" / io.SAFE_NAME).unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        export.load(tmp_path / "m")


def _rewrite(path, fn):
    t = load_file(str(path / io.SAFE_NAME))
    fn(t)
    save_file(t, str(path / io.SAFE_NAME))


def test_load_validation_errors(tmp_path):
    export.save(packed_tiny(), tmp_path / "m", "gptq")
    name = "model.layers.0.mlp.up_proj"
    _rewrite(tmp_path / "m", lambda t: t.__setitem__(name + ".scales", t[name + ".scales"].float()))
    with pytest.raises(ValueError, match=rf"'{name}.scales' has dtype torch.float32.*torch.float16"):
        export.load(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda t: t.__setitem__(name + ".scales", t[name + ".scales"][:2].half()))
    with pytest.raises(ValueError, match=rf"'{name}.scales' has shape \(2, 160\) but the model's layer needs \(3, 160\)"):
        export.load(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda t: t.pop(name + ".scales"))
    with pytest.raises(ValueError, match=rf"'{name}.scales' is missing"):
        export.load(tmp_path / "m")
    export.save(packed_tiny(), tmp_path / "m", "gptq", overwrite=True)
    _rewrite(tmp_path / "m", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match="missing from the checkpoint: \\['model.norm.weight'\\]"):
        export.load(tmp_path / "m")


def test_unknown_format_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown export format 'exl2'; available: \['awq', 'compressed-tensors'"):
        export.save(packed_tiny(), tmp_path / "m", "exl2")
    export.save(packed_tiny(), tmp_path / "m", "gptq")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "exl2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="matches no known export format"):
        export.load(tmp_path / "m")


def test_unquantized_model_and_bad_bits_in_config(tmp_path):
    from lightning_quant.testing import tiny_llama

    with pytest.raises(ValueError, match="no quantized layers to export as 'gptq'; quantize it first"):
        export.save(tiny_llama(), tmp_path / "a", "gptq")
    export.save(packed_tiny(), tmp_path / "m", "gptq")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gptq quantization_config is not supported.*bits=5"):
        export.load(tmp_path / "m")


def test_tied_embeddings_written_once(tmp_path, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_quant.spec import QuantSpec
    from tests.export.conftest import quantize_packed

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = quantize_packed(LlamaForCausalLM(cfg).eval(), QuantSpec(4, 32, True))
    export.save(model, tmp_path / "m", "gptq")
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / io.SAFE_NAME))
    loaded = export.load(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_read_json_refuses_a_non_object(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        io.read_json(p)
