"""GPTQ export: save -> load gives identical logits; an independent decoder of the published layout
(AutoGPTQ qweight/qzeros/scales/g_idx) reproduces our dequantized weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from lightning_quant import export
from lightning_quant.layers.packed import PackedLinear
from tests.export.conftest import packed_tiny

CASES = [  # bits, group_size, symmetric, act_order
    (4, 32, True, False), (4, 64, False, False), (4, 32, True, True), (4, 64, False, True),
    (3, 32, True, False), (3, -1, False, False), (2, 32, False, True), (8, 64, True, False), (8, -1, False, False),
]


def _lsb_stream_decode(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Decode ``n`` values per column from int32 words packed along axis 0 as one LSB-first bit stream."""
    u = words.astype(np.uint32)
    bit = (u[:, None, :] >> np.arange(32, dtype=np.uint32)[None, :, None]) & 1  # [W, 32, C]
    stream = bit.reshape(-1, u.shape[1])[: n * bits]  # [n·b, C]
    weights = (1 << np.arange(bits, dtype=np.int64))[None, :, None]
    return (stream.reshape(n, bits, -1).astype(np.int64) * weights).sum(1)  # [n, C]


def gptq_reference_dequant(t: dict, prefix: str, bits: int, in_f: int, out_f: int, v1: bool) -> np.ndarray:
    """w[o, i] = (q[i, o] - z[g[i], o]) * s[g[i], o], following the AutoGPTQ layout (not our packing code)."""
    q = _lsb_stream_decode(t[prefix + ".qweight"], bits, in_f)  # [in, out]
    z = _lsb_stream_decode(t[prefix + ".qzeros"].T, bits, out_f).T + (1 if v1 else 0)  # [G, out]
    s = t[prefix + ".scales"].astype(np.float32)  # [G, out]
    g = t[prefix + ".g_idx"].astype(np.int64)  # [in]
    return ((q - z[g]) * s[g]).T.astype(np.float32)  # [out, in]


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", CASES)
def test_roundtrip_and_independent_decoder(tmp_path, ids, bits, group_size, symmetric, act_order):
    model = packed_tiny(bits, group_size, symmetric, act_order)
    ref = model(ids).logits
    for fmt in ("gptq", "gptq_v2"):
        export.save(model, tmp_path / fmt, fmt)
        loaded = export.load(tmp_path / fmt)
        assert torch.equal(loaded(ids).logits, ref), fmt
        q_proj = loaded.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, PackedLinear) and q_proj.spec == model.model.layers[0].self_attn.q_proj.spec
        cfg = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
        assert cfg["checkpoint_format"] == fmt and cfg["bits"] == bits and cfg["desc_act"] == act_order
        assert cfg["sym"] == symmetric and cfg["group_size"] == group_size
        assert json.loads((tmp_path / fmt / "quantize_config.json").read_text()) == cfg
        tensors = load_file(str(tmp_path / fmt / "model.safetensors"))
        for name, layer in model.named_modules():
            if isinstance(layer, PackedLinear):
                w = gptq_reference_dequant(tensors, name, bits, layer.in_features, layer.out_features, fmt == "gptq")
                np.testing.assert_array_equal(w, layer.dequantize().numpy())


def test_v1_symmetric_4bit_stores_seven(tmp_path):
    export.save(packed_tiny(4, 32, True), tmp_path / "m", "gptq")
    qzeros = load_file(str(tmp_path / "m" / "model.safetensors"))["model.layers.0.mlp.up_proj.qzeros"]
    assert (qzeros.view(np.uint32) == 0x77777777).all()


def test_v1_refuses_zero_point_zero(tmp_path):
    model = packed_tiny(4, 32, False)
    layer = model.model.layers[0].mlp.up_proj
    layer.qzeros.zero_()  # every zero point 0: representable in gptq_v2 only
    with pytest.raises(ValueError, match="gptq_v2"):
        export.save(model, tmp_path / "m", "gptq")
    export.save(model, tmp_path / "v2", "gptq_v2")
    assert torch.equal(export.load(tmp_path / "v2").model.layers[0].mlp.up_proj.dequantize(), layer.dequantize())


def test_mixed_specs_raise(tmp_path):
    model = packed_tiny(4, 32, True)
    other = packed_tiny(8, 32, True)
    model.model.layers[1].mlp.up_proj = other.model.layers[1].mlp.up_proj
    with pytest.raises(ValueError, match="same QuantSpec"):
        export.save(model, tmp_path / "m", "gptq")


def test_non_float16_scales_raise(tmp_path):
    from lightning_quant.spec import QuantSpec
    from lightning_quant.testing import tiny_llama
    from tests.export.conftest import quantize_packed

    model = quantize_packed(tiny_llama(), QuantSpec(4, 32, True, scale_dtype="float32"))
    with pytest.raises(ValueError, match="scale_dtype='float16'"):
        export.save(model, tmp_path / "m", "gptq")
