"""The ``lightning-quant`` format: every layer kind and setting round-trips; version-1 directories still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantSpec, export, testing
from lightning_quant.export import io
from lightning_quant.export.native import NativeOptions, read_metadata
from lightning_quant.export.registry import detect_format, get_format
from lightning_quant.layers.int8 import Int8OutlierLinear
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.layers.registry import layer_config, quantized_layers
from lightning_quant.spec import ActivationSpec
from tests.export.conftest import mixed_tiny, packed_tiny, quantize_packed


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_model_round_trips_every_layer_setting(tmp_path, ids):
    model = mixed_tiny()
    figures = {"model.layers.0.mlp.up_proj": {"gptq_loss": 0.25, "steps": 3}}
    out = export.save(model, tmp_path / "m", "lightning-quant", options={"method": "gptq", "figures": figures})
    assert {p.name for p in out.iterdir()} == {"config.json", "quantization.json", "model.safetensors"}
    loaded = export.load(out)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert {n: layer_config(m) for n, m in quantized_layers(loaded).items()} == \
           {n: layer_config(m) for n, m in quantized_layers(model).items()}
    up = loaded.model.layers[0].mlp.up_proj
    assert up.act_spec == ActivationSpec() and up.input_scale is not None and up.perm is not None
    down = loaded.model.layers[1].mlp.down_proj
    assert isinstance(down, Int8OutlierLinear) and down.threshold == 3.0
    meta = read_metadata(out)
    assert (meta["format"], meta["version"], meta["method"], meta["dtype"]) == ("lightning-quant", 2, "gptq", "float32")
    assert meta["spec"] is None  # packed and LLM.int8 layers: no one spec
    assert meta["layers"]["model.layers.0.mlp.up_proj"]["figures"] == {"gptq_loss": 0.25, "steps": 3.0}
    assert meta["layers"]["model.layers.0.mlp.gate_proj"]["figures"] == {}
    assert meta["layers"]["model.layers.1.mlp.down_proj"] == {**layer_config(model.model.layers[1].mlp.down_proj),
                                                               "figures": {}}
    config = json.loads((out / "config.json").read_text())
    assert config["lightning_quant_export"] == {"format": "lightning-quant", "file": "quantization.json"}
    assert detect_format(config) is get_format("lightning-quant")
    assert not hasattr(loaded.config, "lightning_quant_export")  # the marker is not carried into the model


def test_shared_spec_tied_conv1d_model_sharded(tmp_path, ids):
    spec = QuantSpec(bits=8, group_size=32, symmetric=True)
    model = quantize_packed(testing.tiny_gpt2(), spec).eval()  # GPT-2: Conv1D linears, tied lm_head
    out = export.save(model, tmp_path / "g", "lightning-quant", max_shard_bytes=64 * 1024, dtype=torch.float16)
    assert (out / io.INDEX_NAME).exists()
    meta = read_metadata(out)
    assert meta["spec"] == spec.to_dict() and meta["method"] is None and meta["dtype"] == "float16"
    loaded = export.load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert isinstance(loaded.transformer.h[0].attn.c_attn, PackedLinear)
    assert loaded.transformer.h[0].attn.c_attn.compute_dtype == torch.float32  # layers keep their own dtype
    ref = model.half()
    for layer in quantized_layers(ref).values():  # half() casts the layers' float buffers too
        layer.compute_dtype = torch.float16
    torch.testing.assert_close(_logits(loaded.float(), ids), _logits(ref.float(), ids), rtol=0, atol=0)


def test_peft_adapters_kept_separate_round_trip(tmp_path, ids):
    from peft import LoraConfig, get_peft_model

    from lightning_quant import quantize_model

    model = get_peft_model(testing.tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    quantize_model(model, QuantSpec(4, 32), "rtn", lora="separate")
    export.save(model.eval(), tmp_path / "a", "lightning-quant")
    loaded = export.load(tmp_path / "a")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert "base_layer" not in "".join(read_metadata(tmp_path / "a")["layers"])


# ---- version 1 -------------------------------------------------------------------------
def _save_v1(model, weights: dict, method: str, out: Path, tokenizer=None, method_figures=None) -> None:
    """``cli.save_quantized`` as it was before the format was registered (version 1), verbatim but for names."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    layers = {}
    for name, qw in weights.items():
        layer = model.get_submodule(name)
        figures = {k: float(v) for k, v in (method_figures or {}).get(name, {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        layers[name] = {"in_features": qw.in_features, "out_features": qw.out_features, "bias": layer.bias is not None,
                        "act_order": getattr(layer, "perm", None) is not None, "figures": figures,
                        "input_scale": getattr(layer, "input_scale", None) is not None,
                        "kind": type(layer).__name__}
    spec = next(iter(weights.values())).spec
    meta = {"format": "lightning-quant", "version": 1, "method": method, "spec": spec.to_dict(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "layers": layers}
    (out / "quantization.json").write_text(json.dumps(meta, indent=2))
    save_model(model, str(out / "model.safetensors"))


def _v1_packed(tmp_path) -> tuple[torch.nn.Module, Path]:
    from lightning_quant.targets import set_submodule

    model = packed_tiny(bits=4, group_size=32, symmetric=False, act_order=True).eval()
    o = model.model.layers[0].self_attn.o_proj  # an AWQ-style explicit input scale
    set_submodule(model, "model.layers.0.self_attn.o_proj",
                  PackedLinear.from_quantized(o.to_quantized(), input_scale=torch.rand(o.in_features) + 0.5))
    weights = {n: m.to_quantized() for n, m in quantized_layers(model).items()}
    figures = {"model.layers.0.mlp.up_proj": {"gptq_loss": 1.5, "gptq_fallback": False}}
    _save_v1(model, weights, "gptq", tmp_path / "v1", testing.byte_tokenizer(), figures)
    return model, tmp_path / "v1"


def test_version_1_packed_directory_loads(tmp_path, ids):
    from lightning_quant.cli import load_quantized

    model, v1 = _v1_packed(tmp_path)
    assert not json.loads((v1 / "config.json").read_text()).get("lightning_quant_export")  # a plain HF config
    for loaded in (export.load(v1), load_quantized(v1)):
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
        assert loaded.model.layers[0].self_attn.o_proj.input_scale is not None
    meta = read_metadata(v1)
    assert meta["version"] == 2 and meta["method"] == "gptq"
    up = meta["layers"]["model.layers.0.mlp.up_proj"]
    assert up == {**layer_config(model.model.layers[0].mlp.up_proj), "figures": {"gptq_loss": 1.5}}


def test_version_1_int8_directory_keeps_the_threshold(tmp_path, ids):
    from lightning_quant.api import convert_to_int8

    model = testing.tiny_llama().eval()
    weights = convert_to_int8(model, threshold=2.5)
    _save_v1(model, weights, "int8", tmp_path / "v1", method_figures={n: {"threshold": 2.5} for n in weights})  # v1: in extras
    loaded = export.load(tmp_path / "v1")
    layer = loaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, Int8OutlierLinear) and layer.threshold == 2.5
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    meta = read_metadata(tmp_path / "v1")
    assert meta["layers"]["model.layers.1.mlp.down_proj"]["kind"] == "int8"


def test_version_1_without_kinds_reads_as_packed(tmp_path, ids):
    """The first version-1 files had no per-layer ``kind`` (and no ``input_scale``)."""
    model = packed_tiny(bits=4, group_size=32).eval()
    _save_v1(model, {n: m.to_quantized() for n, m in quantized_layers(model).items()}, "rtn", tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / "quantization.json").read_text())
    for info in meta["layers"].values():
        del info["kind"], info["input_scale"]
    (tmp_path / "v1" / "quantization.json").write_text(json.dumps(meta))
    assert torch.equal(_logits(export.load(tmp_path / "v1"), ids), _logits(model, ids))


def test_cli_eval_reads_version_1_and_2_alike(tmp_path, capsys):
    from lightning_quant.cli import main, save_quantized
    from lightning_quant.data import stdlib_text

    model, v1 = _v1_packed(tmp_path)
    save_quantized(model, "gptq", tmp_path / "v2", testing.byte_tokenizer())
    (tmp_path / "text.txt").write_text(stdlib_text(2_000, split="heldout"))
    lines = []
    for d in (v1, tmp_path / "v2"):
        main(["eval", "--model", str(d), "--data", str(tmp_path / "text.txt"), "--seq-len", "32", "--max-windows", "2"])
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[0].startswith("ppl=") and lines[0] == lines[1]


# ---- errors ----------------------------------------------------------------------------
def test_options_are_validated():
    with pytest.raises(ValueError, match="NativeOptions.method must be a non-empty str"):
        NativeOptions(method="")
    with pytest.raises(TypeError, match=r"NativeOptions.figures must be a dict \{layer name: \{figure: float\}\}"):
        NativeOptions(figures=[1.0])
    with pytest.raises(TypeError, match="maps layer names to .* dicts; got 'a': float"):
        NativeOptions(figures={"a": 1.0})
    with pytest.raises(ValueError, match=r"figures\['a'\] holds non-numeric figures \{'fallback': True\}"):
        NativeOptions(figures={"a": {"fallback": True}})
    assert NativeOptions(figures={"a": {"n": 2}}).figures == {"a": {"n": 2.0}}


def test_save_refuses_what_it_cannot_record(tmp_path):
    with pytest.raises(ValueError, match="figures names \\['model.embed_tokens'\\], which are not quantized layers"):
        export.save(packed_tiny(), tmp_path / "a", "lightning-quant", options={"figures": {"model.embed_tokens": {}}})
    with pytest.raises(ValueError, match="no quantized layers to export as 'lightning-quant'; quantize it first"):
        export.save(testing.tiny_llama(), tmp_path / "b", "lightning-quant")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['graph'\] for format 'lightning-quant'"):
        export.save(packed_tiny(), tmp_path / "c", "lightning-quant", options={"graph": "logits"})
    assert not any(tmp_path.iterdir())


def _edit_meta(directory: Path, edit) -> None:
    meta = json.loads((directory / "quantization.json").read_text())
    edit(meta)
    (directory / "quantization.json").write_text(json.dumps(meta))


def test_load_names_what_is_wrong(tmp_path):
    export.save(packed_tiny(), tmp_path / "m", "lightning-quant")
    d = tmp_path / "m"
    _edit_meta(d, lambda m: m.update(version=3))
    with pytest.raises(ValueError, match=r"is lightning-quant version 3; this lightning_quant reads versions \[1, 2\]"):
        export.load(d)
    _edit_meta(d, lambda m: m.update(version=2, format="other"))
    with pytest.raises(ValueError, match="is not a lightning-quant file \\(format='other'\\)"):
        read_metadata(d)
    _edit_meta(d, lambda m: (m.update(format="lightning-quant"), m.pop("layers")))
    with pytest.raises(ValueError, match="lacks 'layers' \\(a dict\\) or 'dtype'"):
        export.load(d)


def test_load_refuses_layers_the_model_does_not_match(tmp_path):
    export.save(packed_tiny(), tmp_path / "m", "lightning-quant")
    d = tmp_path / "m"
    name = "model.layers.0.mlp.up_proj"
    meta = json.loads((d / "quantization.json").read_text())

    def layers(**changes):
        m = json.loads(json.dumps(meta))
        m["layers"][name].update(changes)
        (d / "quantization.json").write_text(json.dumps(m))

    layers(kind="nf4")
    with pytest.raises(ValueError, match=r"Unknown layer kind 'nf4'; known kinds: \[.*'int8', 'packed'"):
        export.load(d)
    layers(out_features=64)
    with pytest.raises(ValueError, match=r"gives layer 'model.layers.0.mlp.up_proj' \[out, in\] = \(64, 96\)"):
        export.load(d)
    m = json.loads(json.dumps(meta))
    m["layers"]["model.nope"] = m["layers"].pop(name)
    (d / "quantization.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="has a quantized layer 'model.nope' that LlamaForCausalLM lacks"):
        export.load(d)
    m["layers"] = {"model.norm": meta["layers"][name]}
    (d / "quantization.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="quantizes 'model.norm', but the model's 'model.norm' is a LlamaRMSNorm"):
        export.load(d)


def test_version_1_unknown_kind_or_missing_key_raises(tmp_path):
    _, v1 = _v1_packed(tmp_path)
    name = "model.layers.0.mlp.up_proj"
    _edit_meta(v1, lambda m: m["layers"][name].update(kind="NF4Linear"))
    with pytest.raises(ValueError, match=r"has kind 'NF4Linear'; version 1 knows \['Int8OutlierLinear', 'PackedLinear'\]"):
        read_metadata(v1)
    _edit_meta(v1, lambda m: (m["layers"][name].update(kind="PackedLinear"), m["layers"][name].pop("act_order")))
    with pytest.raises(ValueError, match=f"Layer '{name}' of a lightning-quant version-1 file lacks 'act_order'"):
        read_metadata(v1)


def test_cli_lists_the_format_once_from_the_registry():
    from lightning_quant.cli import build_parser

    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    fmt = next(a for a in quantize._actions if a.dest == "format")
    assert fmt.default == "lightning-quant" and fmt.choices == export.available_formats()
    assert fmt.choices.count("lightning-quant") == 1


def test_a_failed_save_leaves_the_previous_directory_intact(tmp_path, monkeypatch):
    from lightning_quant.cli import save_quantized
    from lightning_quant.export import native

    save_quantized(packed_tiny(), "rtn", tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(native.io, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(packed_tiny(bits=8), "rtn", tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
