"""AWQ GEMM export: round trip, an independent decoder of AutoAWQ's interleaved nibble order, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from lightning_quant import export
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import QuantSpec
from lightning_quant.testing import tiny_llama
from tests.export.conftest import packed_tiny, quantize_packed

#: published AutoAWQ order: nibble slot i of a word holds output column 8c + ORDER[i]
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_unpack(words: np.ndarray) -> np.ndarray:
    """int32 [R, C/8] -> [R, C] following the AWQ GEMM layout."""
    u = words.astype(np.uint32)
    out = np.zeros((u.shape[0], u.shape[1] * 8), dtype=np.int64)
    for slot in range(8):
        out[:, ORDER[slot]::8] = (u >> (4 * slot)) & 0xF
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 16])
def test_roundtrip_and_independent_decoder(tmp_path, ids, symmetric, group_size):
    model = packed_tiny(4, group_size, symmetric)
    ref = model(ids).logits
    export.save(model, tmp_path / "m", "awq")
    loaded = export.load(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, ref)
    assert loaded.model.layers[0].mlp.down_proj.spec == QuantSpec(4, group_size, symmetric)
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    for name, layer in model.named_modules():
        if isinstance(layer, PackedLinear):
            q, z = awq_unpack(t[name + ".qweight"]), awq_unpack(t[name + ".qzeros"])  # [in, out], [G, out]
            g = np.arange(layer.in_features) // group_size
            s = t[name + ".scales"].astype(np.float32)
            w = ((q - z[g]) * s[g]).T.astype(np.float32)
            np.testing.assert_array_equal(w, layer.dequantize().numpy())


def test_config_names_unconverted_modules(tmp_path):
    import json

    export.save(packed_tiny(4, 32, False), tmp_path / "m", "awq")
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}


def test_bits_other_than_4_raise(tmp_path):
    with pytest.raises(ValueError, match="4-bit weights only.*bits=8"):
        export.save(packed_tiny(8, 32, True), tmp_path / "m", "awq")
    assert not (tmp_path / "m").exists()


def test_act_order_raises(tmp_path):
    with pytest.raises(ValueError, match="act-order.*AWQ cannot store"):
        export.save(packed_tiny(4, 32, True, act_order=True), tmp_path / "m", "awq")


def test_partial_group_raises_with_valid_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"in_features=96 and group_size=64; use one of \[16, 32\]"):
        export.save(quantize_packed(tiny_llama(), QuantSpec(4, 64, True)), tmp_path / "m", "awq")


def test_real_awq_models(tmp_path, ids, monkeypatch):
    """AWQ-quantized OPT and GQA Llama (all scales folded, o_proj's tied into v_proj) round-trip through
    'awq'; a Llama whose o_proj keeps an explicit input scale is refused by 'awq' but exported exactly by 'onnx'."""
    from lightning_quant import quantize_model
    from lightning_quant.algorithms.awq import AWQConfig
    from lightning_quant.methods import awq_mapping
    from lightning_quant.testing import random_token_batches, tiny_opt

    calib, cfg = torch.cat(random_token_batches(2, 32, 2)), AWQConfig(n_grid=4, clip_grid=0)  # small grid: speed
    for name, model in (("opt", tiny_opt()), ("gqa", tiny_llama())):
        quantize_model(model, QuantSpec(4, 32), "awq", calibration=calib, config=cfg)
        export.save(model, tmp_path / name, "awq")
        assert torch.equal(export.load(tmp_path / name)(ids).logits, model(ids).logits), name
    monkeypatch.setitem(awq_mapping.INDIRECT_FOLDS, "llama", ())  # no indirect folds: o_proj explicit
    llama = tiny_llama()
    quantize_model(llama, QuantSpec(4, 32), "awq", calibration=calib,
                   config=AWQConfig(n_grid=4, clip_grid=0, unfoldable="explicit"))
    assert llama.model.layers[0].self_attn.o_proj.input_scale is not None
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.o_proj' has an explicit AWQ input_scale"):
        export.save(llama, tmp_path / "llama", "awq")
    unscaled = tiny_llama()  # the default leaves the unfoldable group unscaled: every format holds it
    quantize_model(unscaled, QuantSpec(4, 32), "awq", calibration=calib, config=cfg)
    assert unscaled.model.layers[0].self_attn.o_proj.input_scale is None
    export.save(unscaled, tmp_path / "unscaled", "awq")
    assert torch.equal(export.load(tmp_path / "unscaled")(ids).logits, unscaled(ids).logits)
    pytest.importorskip("onnxruntime")
    export.save(llama, tmp_path / "onnx", "onnx")
    torch.testing.assert_close(export.load(tmp_path / "onnx")(ids).logits, llama(ids).logits, rtol=0, atol=1e-4)
