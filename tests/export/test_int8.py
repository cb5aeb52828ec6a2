"""int8 (LLM.int8) export with bitsandbytes names: round trip and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_quant import export
from lightning_quant.layers.int8 import Int8OutlierLinear
from lightning_quant.targets import select_linears, set_submodule
from lightning_quant.testing import tiny_opt


def int8_model(threshold: float = 6.0):
    model = tiny_opt()  # OPT linears carry biases
    for name, m in select_linears(model).items():
        set_submodule(model, name, Int8OutlierLinear.from_linear(m, threshold=threshold))
    return model


def test_roundtrip_with_bnb_names(tmp_path, ids):
    model = int8_model(threshold=4.0)
    x = ids
    ref = model(x).logits
    export.save(model, tmp_path / "m", "int8")
    loaded = export.load(tmp_path / "m")
    layer = loaded.model.decoder.layers[0].fc1
    assert isinstance(layer, Int8OutlierLinear) and layer.threshold == 4.0
    assert torch.equal(loaded(x).logits, ref)
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    name = "model.decoder.layers.0.fc1"
    assert t[name + ".weight"].dtype == torch.int8 and t[name + ".SCB"].dtype == torch.float32
    assert int(t[name + ".weight_format"]) == 0
    w_bnb = t[name + ".weight"].float() * t[name + ".SCB"].unsqueeze(1) / 127  # bitsandbytes' row-wise dequant
    torch.testing.assert_close(w_bnb, model.model.decoder.layers[0].fc1.dequantize(), rtol=1e-6, atol=0)
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and qc["llm_int8_threshold"] == 4.0


def test_packed_layers_refused_by_int8_and_vice_versa(tmp_path):
    from tests.export.conftest import packed_tiny

    with pytest.raises(ValueError, match="use format='int8' for LLM.int8 layers"):
        export.save(packed_tiny(), tmp_path / "a", "int8")
    with pytest.raises(ValueError, match="use format='int8' for LLM.int8 layers"):
        export.save(int8_model(), tmp_path / "b", "gptq")


def test_wrong_weight_dtype_refused(tmp_path):
    from safetensors.torch import save_file

    export.save(int8_model(), tmp_path / "m", "int8")
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    t["model.decoder.layers.0.fc1.weight"] = t["model.decoder.layers.0.fc1.weight"].float()
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.decoder.layers.0.fc1.weight' has dtype torch.float32.*torch.int8"):
        export.load(tmp_path / "m")
