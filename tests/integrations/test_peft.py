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
    with pytest.raises(NotImplementedError, match="peft's merge cannot fold LoRA into a PackedLinear.*merge_packed_lora"):
        model.merge_and_unload()
    plain = model.unload()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, PackedLinear)
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_bad_configs_are_rejected(packed_llama):
    with pytest.raises(TypeError, match="register_packed_lora takes a peft LoraConfig"):
        register_packed_lora({"r": 4})
    with pytest.raises(ValueError, match="DoRA needs a float base weight"):
        _lora(packed_llama, use_dora=True)


def _trained_adapters(packed, steps=12):
    torch.manual_seed(0)
    model = _lora(copy.deepcopy(packed))
    ids = random_token_batches(1, 32, 4, seed=1)[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_merge_back_rtn_on_the_base_grid_and_gptq(packed_llama):
    """QLoRA merge-back: RTN keeps each base's qparams and re-rounds W_deq + s·B@A (exact formula);
    untrained adapters (B = 0) give back the very same codes; GPTQ re-solves on calibration data.
    Both are measured against keeping the adapters separate."""
    from lightning_quant import primitives as P
    from lightning_quant.integrations.peft import merge_packed_lora
    from lightning_quant.qat.lora import lora_delta

    untouched = _lora(copy.deepcopy(packed_llama))
    before = {n: m.get_base_layer().qweight.clone() for n, m in untouched.named_modules() if isinstance(m, PackedLoraLinear)}
    merge_packed_lora(untouched)
    assert all(torch.equal(untouched.get_submodule(n).qweight, q) for n, q in before.items())

    separate = _trained_adapters(packed_llama)
    ids = random_token_batches(2, 32, 2, seed=5)
    with torch.no_grad():
        ref = [separate(x).logits for x in ids]
    rtn, gptq = copy.deepcopy(separate), copy.deepcopy(separate)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    host = separate.get_submodule(name)
    base = host.get_base_layer().to_quantized()
    expected = P.quantize(base.dequantize(torch.float32) + lora_delta(host).detach(), base.scales, base.zeros, base.spec)
    w_rtn = merge_packed_lora(rtn)
    assert torch.equal(w_rtn[name].codes, expected) and torch.equal(w_rtn[name].scales, base.scales)
    assert not torch.equal(w_rtn[name].codes, base.codes)  # the trained adapter moved some codes
    calib = random_token_batches(4, 32, 2, seed=3)
    w_gptq = merge_packed_lora(gptq, "gptq", calibration=calib)
    assert set(w_gptq) == set(w_rtn) == set(before)
    for m in (rtn, gptq):
        assert isinstance(m.get_submodule(name), PackedLinear)
        assert not any(isinstance(x, PackedLoraLinear) for x in m.modules())
    with torch.no_grad():
        err_rtn = sum(_rel(rtn(x).logits, r) for x, r in zip(ids, ref)) / len(ids)
        err_gptq = sum(_rel(gptq(x).logits, r) for x, r in zip(ids, ref)) / len(ids)
        err_drop = sum(_rel(packed_llama(x).logits, r) for x, r in zip(ids, ref)) / len(ids)
    print(f"merge-back logits rel. error vs separate adapters: rtn {err_rtn:.4f} gptq {err_gptq:.4f} "
          f"(dropping the adapters: {err_drop:.4f})")
    assert err_gptq < err_rtn < err_drop


def test_merge_back_bad_input(packed_llama):
    from lightning_quant.integrations.peft import merge_packed_lora

    with pytest.raises(ValueError, match="found no LoRA adapter on a PackedLinear"):
        merge_packed_lora(copy.deepcopy(packed_llama))
    model = _lora(copy.deepcopy(packed_llama))
    with pytest.raises(ValueError, match="method='awq' is not supported; use one of"):
        merge_packed_lora(model, "awq")
    with pytest.raises(ValueError, match="takes no calibration"):
        merge_packed_lora(model, "rtn", calibration=random_token_batches(1, 8, 1))
    with pytest.raises(ValueError, match="needs calibration"):
        merge_packed_lora(model, "gptq")
    from lightning_quant.testing import tiny_llama

    int8 = tiny_llama()
    quantize_model(int8, method="int8")
    with pytest.raises(TypeError, match="re-quantizes PackedLinear bases; this one is a Int8OutlierLinear"):
        merge_packed_lora(_lora(int8))
