import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.integrations.peft import PackedLoraLinear, register_packed_lora
from lightning_quant.layers import PackedLinear
from lightning_quant.testing import random_token_batches


@pytest.fixture
def packed_llama(tiny_llama):
    quantize_model(tiny_llama, QuantSpec(4, 32, symmetric=False), "rtn")
    return tiny_llama


def _lora(model, **kw):
    cfg = register_packed_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kw))
    return get_peft_model(model, cfg)


def test_peft_wraps_packed_linear_and_starts_as_the_base(packed_llama):
    ids = random_token_batches(1, 16, 2)[0]
    base_logits = packed_llama(ids).logits
    model = _lora(packed_llama)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLoraLinear) and isinstance(q.get_base_layer(), PackedLinear)
    assert (q.in_features, q.out_features) == (96, 96)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)  # B = 0 at init


def test_lora_training_on_packed_base_reduces_loss_and_keeps_codes(packed_llama):
    torch.manual_seed(0)
    model = _lora(packed_llama)
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scales", "qzeros"))}
    ids = random_token_batches(1, 32, 4, seed=1)[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    layer0_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert layer0_a.grad is not None and layer0_a.grad.abs().sum() > 0  # gradient crossed packed layers
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)


def test_merge_is_refused_and_unload_restores_packed_base(packed_llama):
    ids = random_token_batches(1, 16, 2)[0]
    expected = packed_llama(ids).logits
    model = _lora(copy.deepcopy(packed_llama))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert not torch.equal(model(ids).logits, expected)
    with pytest.raises(NotImplementedError, match="Merging LoRA into a PackedLinear is refused"):
        model.merge_and_unload()
    plain = model.unload()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, PackedLinear)
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_bad_configs_are_rejected(packed_llama):
    with pytest.raises(TypeError, match="register_packed_lora takes a peft LoraConfig"):
        register_packed_lora({"r": 4})
    with pytest.raises(ValueError, match="DoRA needs a float base weight"):
        _lora(packed_llama, use_dora=True)
