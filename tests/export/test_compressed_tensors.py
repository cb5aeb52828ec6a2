"""compressed-tensors export: round trip, and the real client (transformers' integration and the
compressed-tensors compressor) decompresses our files to the same weights / logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lightning_quant import export
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import ActivationSpec, QuantSpec
from tests.export.conftest import packed_tiny

CASES = [(4, 32, True, False), (4, 64, False, False), (4, 32, False, True), (3, 32, True, False),
         (8, -1, True, False), (2, 16, False, True)]


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", CASES)
def test_roundtrip(tmp_path, ids, bits, group_size, symmetric, act_order):
    model = packed_tiny(bits, group_size, symmetric, act_order)
    ref = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        export.save(model, tmp_path / "m", "compressed-tensors")
    assert torch.equal(export.load(tmp_path / "m")(ids).logits, ref)
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["actorder"]) == (bits, symmetric, "group" if act_order else None)
    assert w["strategy"] == ("channel" if group_size == -1 else "group") and qc["ignore"] == ["lm_head"]


def test_activation_spec_roundtrip(tmp_path, ids):
    model = packed_tiny(4, 32, True)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.act_spec = ActivationSpec(bits=8, symmetric=False)
    ref = model(ids).logits
    export.save(model, tmp_path / "m", "compressed-tensors")
    loaded = export.load(tmp_path / "m")
    assert loaded.model.layers[0].mlp.up_proj.act_spec == ActivationSpec(bits=8, symmetric=False)
    assert torch.equal(loaded(ids).logits, ref)


def test_partial_group_warns(tmp_path):
    with pytest.warns(UserWarning, match="partial last group"):
        export.save(packed_tiny(4, 64, True), tmp_path / "m", "compressed-tensors")


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1), (4, 16)])
def test_transformers_real_client_logits(tmp_path, ids, bits, group_size):
    """transformers' compressed-tensors integration decompresses to float on CPU: logits agree (atol 1e-5)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = packed_tiny(bits, group_size, True)
    ref = model(ids).logits
    export.save(model, tmp_path / "m", "compressed-tensors")
    client = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert isinstance(client.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(client(ids).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (2, True)])
def test_compressor_decompresses_to_our_weights(tmp_path, bits, symmetric):
    """compressed-tensors' own PackedQuantizationCompressor reads our tensors back to our float weights."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model = packed_tiny(bits, 32, symmetric)
    export.save(model, tmp_path / "m", "compressed-tensors")
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**qc["config_groups"]["group_0"]["weights"]))
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, layer in model.named_modules():
        if isinstance(layer, PackedLinear):
            local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
            w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(w.float(), layer.dequantize()), name


def test_wrong_scale_spec_is_inferred_exactly(tmp_path, ids):
    from lightning_quant.testing import tiny_llama
    from tests.export.conftest import quantize_packed

    model = quantize_packed(tiny_llama(), QuantSpec(4, 32, True, scale_dtype="bfloat16"))
    export.save(model, tmp_path / "m", "compressed-tensors")
    loaded = export.load(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, model(ids).logits)
