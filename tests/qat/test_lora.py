"""QAT composed with HF peft LoRA, merged and separate modes.

Tolerance (outputs): weights are compared bitwise; the merged-mode fake-quant forward computes
``y − B(A(x))·s`` and peft adds ``B(A(x))·s`` back, one extra float32 subtract/add of the adapter term, so
outputs agree to ``atol=1e-5, rtol=1e-5`` rather than to the last bit.
"""

import copy

import pytest
import torch

from lightning_quant import qat
from lightning_quant.api import swap_in_packed
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.testing import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
ATOL = RTOL = 1e-5
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def _lora(model, targets, **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kw)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # peft initialises B = 0; a non-zero delta makes the tests meaningful
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def _ids(seed=0):
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for i in range(steps):
        ids = _ids(10 + i)
        logits = model(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("build, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("act", [None, ActivationSpec()], ids=["w4", "w4a8"])
def test_merged_mode_trained_fake_quant_equals_merge_then_quantize(build, targets, act):
    pm = _lora(build(), targets)
    fqs = qat.inject(pm, QuantSpec(4, 32), act, include=targets, observer="lsq", lora="merged")
    assert all(n.endswith(".base_layer") and fq.lora_mode == "merged" for n, fq in fqs.items())
    _train(pm)
    ids = _ids()
    fake = _logits(pm, ids)
    learned = {n[: -len(".base_layer")]: fq.quantized_weight() for n, fq in fqs.items()}

    # (a) the library conversion: merged + packed, adapters folded in
    converted = copy.deepcopy(pm)
    weights = qat.convert(converted)
    assert set(weights) == set(learned)
    assert all(isinstance(converted.get_submodule(n), PackedLinear) for n in weights)
    torch.testing.assert_close(_logits(converted, ids), fake, atol=ATOL, rtol=RTOL)

    # (b) by hand: back to float, peft's own merge_and_unload, then quantize with the learned qparams
    merged = copy.deepcopy(pm)
    qat.remove(merged)
    plain = merged.merge_and_unload()
    by_hand = {}
    for name, qw in learned.items():
        short = name[len("base_model.model."):]
        w = plain.get_submodule(short).weight
        w = w.t() if w.shape != qw.shape else w  # Conv1D stores [in, out]
        by_hand[short] = QuantizedWeight.from_float(w.detach(), qw.spec, qw.scales, qw.zeros)
        assert torch.equal(by_hand[short].codes, qw.codes)
    swap_in_packed(plain, by_hand)
    for name in by_hand:
        plain.get_submodule(name).act_spec = act
    torch.testing.assert_close(_logits(plain, ids), fake, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("act", [None, ActivationSpec()], ids=["w4", "w4a8"])
def test_separate_mode_packed_base_plus_float_adapters(act):
    pm = _lora(tiny_llama(), LLAMA_TARGETS)
    fqs = qat.inject(pm, QuantSpec(4, 32), act, include=LLAMA_TARGETS, lora="separate")
    _train(pm)
    ids = _ids()
    fake = _logits(pm, ids)
    for fq in fqs.values():  # only the frozen base weight is quantized
        assert torch.equal(fq.effective_weight(), fq.weight) and not fq.weight.requires_grad
    weights = qat.convert(pm)
    assert all(n.endswith(".base_layer") and isinstance(pm.get_submodule(n), PackedLinear) for n in weights)
    assert isinstance(pm.get_submodule(next(iter(weights))[: -len(".base_layer")]), peft.tuners.lora.Linear)
    torch.testing.assert_close(_logits(pm, ids), fake, atol=ATOL, rtol=RTOL)


def test_merged_mode_trains_the_adapters_through_the_quantizer():
    pm = _lora(tiny_llama(), ["q_proj"])
    fqs = qat.inject(pm, QuantSpec(4, 32), include=["q_proj"], lora="merged")
    pm.train()
    pm(input_ids=_ids()).logits.logsumexp(-1).mean().backward()
    for name, fq in fqs.items():
        host = pm.get_submodule(name[: -len(".base_layer")])
        assert fq.weight.grad is None  # frozen base
        assert host.lora_A["default"].weight.grad.abs().sum() > 0
        assert host.lora_B["default"].weight.grad.abs().sum() > 0
        delta = host.lora_B["default"].weight @ host.lora_A["default"].weight * host.scaling["default"]
        assert torch.equal(fq.effective_weight(), fq.weight + delta)


def test_filters_use_the_adapter_name_and_skip_adapter_internals():
    pm = _lora(tiny_llama(), LLAMA_TARGETS)
    fqs = qat.inject(pm, QuantSpec(4, 32))
    assert not any("lora_" in n for n in fqs)
    assert sum(fq.lora_mode == "merged" for fq in fqs.values()) == 6 and len(fqs) == 14


def test_unsupported_adapters_raise_naming_what_is_supported():
    dora = _lora(tiny_llama(), ["q_proj"], use_dora=True)
    with pytest.raises(NotImplementedError, match="LoRA variants \\(DoRA, ...\\) are not supported.*supported: peft LoRA"):
        qat.inject(dora, QuantSpec(4, 32))
    bias = _lora(tiny_llama(), ["q_proj"], lora_bias=True)
    with pytest.raises(NotImplementedError, match="lora_bias=True is not supported"):
        qat.inject(bias, QuantSpec(4, 32))
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(NotImplementedError, match="adapter type .*ia3.*Linear is not supported by QAT; supported: peft LoRA"):
        qat.inject(ia3, QuantSpec(4, 32))
    assert not qat.fake_quant_modules(ia3)  # nothing half-injected
    merged = _lora(tiny_llama(), ["q_proj"])
    merged.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").merge()
    with pytest.raises(ValueError, match="call unmerge\\(\\) before QAT"):
        qat.inject(merged, QuantSpec(4, 32))
