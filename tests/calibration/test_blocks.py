import pytest
import torch
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


def test_forward_owner_finds_the_model_attribute_of_a_module_without_forward():
    import lightning.pytorch as pl

    from lightning_quant.calibration import forward_owner, forward_owner_path

    class NoForward(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = testing.tiny_llama()

    class WithForward(NoForward):
        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits

    lm = NoForward()
    assert forward_owner(lm) is lm.model and forward_owner_path(lm) == "model"
    with_fwd = WithForward()
    assert forward_owner(with_fwd) is with_fwd.model  # the transformers model's signature is known: preferred
    assert forward_owner(lm.model) is lm.model

    class Backbone(torch.nn.Module):  # no transformers model: the root's own forward is called
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return x

    class Root(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Backbone()

        def forward(self, ids):
            return self.net(ids)

    root = Root()
    assert forward_owner(root) is root and forward_owner(NoForwardHolder(root.net)) is root.net


class NoForwardHolder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net


def test_forward_owner_names_the_override_when_nothing_runs_the_blocks():
    from lightning_quant.calibration import forward_owner

    class Holder(torch.nn.Module):  # no forward anywhere above the blocks
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(ValueError, match="defines no forward.*Pass model='<attribute path"):
        forward_owner(Holder())


def test_token_ids_outside_the_vocabulary_name_its_size():
    from lightning_quant import QuantSpec, quantize_model

    bad = torch.full((1, 8), testing.TINY_VOCAB, dtype=torch.long)
    with pytest.raises(ValueError, match=f"vocabulary size is {testing.TINY_VOCAB}.*got ids from 256 to 256"):
        quantize_model(testing.tiny_llama(), QuantSpec(4, 32), "gptq", calibration=bad)
    with pytest.raises(ValueError, match="must lie in \\[0, 256\\)"):
        quantize_model(testing.tiny_llama(), QuantSpec(4, 32), "gptq", calibration=torch.full((1, 8), -100))
