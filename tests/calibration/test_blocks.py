import pytest
from torch import nn

from lightning_quant import testing
from lightning_quant.calibration import find_blocks

EXPECTED = {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_finds_decoder_blocks(arch):
    model = {"llama": testing.tiny_llama, "gpt2": testing.tiny_gpt2, "opt": testing.tiny_opt}[arch](layers=3)
    bl = find_blocks(model)
    assert bl.path == EXPECTED[arch]
    assert len(bl) == 3 and bl.blocks is model.get_submodule(EXPECTED[arch])
    assert bl.name(2) == EXPECTED[arch] + ".2"


def test_finds_blocks_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(testing.tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    bl = find_blocks(model)
    assert bl.path.endswith("model.layers") and bl.path != "model.layers"
    assert len(bl) == 2


def test_override_and_errors():
    model = testing.tiny_llama()
    assert find_blocks(model, "model.layers").path == "model.layers"
    with pytest.raises(ValueError, match="does not exist"):
        find_blocks(model, "model.blocks")
    with pytest.raises(ValueError, match="must name a non-empty"):
        find_blocks(model, "model.norm")
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Pass block_path="):
        find_blocks(flat)
