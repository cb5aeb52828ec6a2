"""FakeQuantLinear: forward == converted packed forward, reversible surgery, enabled switch.

Tolerance: the fake-quant weight and the packed layer's dequantized weight are asserted *bitwise*
equal (same float32 ops in primitives), and so are the fake-quantized activations; the outputs then
differ only by the summation order two separate matmul calls may pick, so they are compared with
``atol=1e-6, rtol=1e-5`` (float32 rounding of a 96..160-term dot product).
"""

import copy

import pytest
import torch
from torch import nn

from lightning_quant import primitives as P
from lightning_quant import qat
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.qat import FakeQuantLinear
from lightning_quant.spec import ActivationSpec, QuantSpec

ATOL, RTOL = 1e-6, 1e-5
SCHEMES = {"w4g32": (QuantSpec(4, 32), None), "w4a8-asym": (QuantSpec(4, 64, symmetric=False), ActivationSpec()),
           "w8a8": (QuantSpec(8, -1), ActivationSpec(symmetric=True))}


def _ids(seed=0):
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("observer", ["minmax", "lsq"])
def test_fake_quant_model_equals_converted_model(tiny_model, scheme, observer):
    spec, act = SCHEMES[scheme]
    fqs = qat.inject(tiny_model, spec, act, observer=observer)
    ids = _ids()
    with torch.no_grad():
        fake = tiny_model(input_ids=ids).logits
    converted = copy.deepcopy(tiny_model)
    weights = qat.convert(converted)
    assert set(weights) == set(fqs) and not qat.fake_quant_modules(converted)
    for name, fq in fqs.items():
        packed = converted.get_submodule(name)
        assert isinstance(packed, PackedLinear) and packed.act_spec == act
        w = fq.effective_weight().detach()
        s, z = fq.observer.qparams(w)
        assert torch.equal(packed.dequantize(), P.fake_quantize(w, s, z, spec))  # bitwise
    with torch.no_grad():
        out = converted(input_ids=ids).logits
    torch.testing.assert_close(out, fake, atol=ATOL, rtol=RTOL)


def test_layer_forward_is_the_formula():
    lin = nn.Linear(96, 24)
    spec, act = QuantSpec(4, 32), ActivationSpec()
    fq = FakeQuantLinear.from_linear(lin, spec, act)
    x = torch.randn(3, 5, 96)
    s, z = P.compute_qparams(lin.weight, spec)
    ref = nn.functional.linear(P.fake_quantize_activation(x, act), P.fake_quantize(lin.weight, s, z, spec), lin.bias)
    assert torch.equal(fq(x), ref)
    fq.enabled.fill_(False)
    assert torch.equal(fq(x), lin(x))


def test_surgery_is_reversible(tiny_model):
    ids = _ids(1)
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    keys = set(tiny_model.state_dict())
    before = {n: type(m) for n, m in tiny_model.named_modules()}
    fqs = qat.inject(tiny_model, QuantSpec(4, 32))
    params = {n: fq.weight for n, fq in fqs.items()}
    assert keys < set(tiny_model.state_dict())  # same weight keys, plus observer / enabled state
    assert all(any(k.startswith(n + ".observer.") for k in tiny_model.state_dict()) for n in fqs)
    qat.remove(tiny_model)
    assert {n: type(m) for n, m in tiny_model.named_modules()} == before
    assert all(tiny_model.get_submodule(n).weight is p for n, p in params.items())
    assert set(tiny_model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids).logits, ref)


def test_gradients_reach_weights_and_learnable_scales(tiny_llama):
    fqs = qat.inject(tiny_llama, QuantSpec(4, 32), ActivationSpec(), observer="lsq")
    tiny_llama.train()
    tiny_llama(input_ids=_ids()).logits.logsumexp(-1).mean().backward()
    for fq in fqs.values():
        assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
        assert fq.observer.scale.grad is not None and fq.observer.scale.grad.abs().sum() > 0


def test_inject_selects_with_filters_and_default_excludes_lm_head(tiny_llama):
    fqs = qat.inject(tiny_llama, QuantSpec(4, 32), include=["q_proj", "re:mlp\\.down"])
    assert sorted(fqs) == sorted([f"model.layers.{i}.{p}" for i in range(2)
                                  for p in ("self_attn.q_proj", "mlp.down_proj")])
    assert qat.fake_quant_modules(tiny_llama) == fqs
    qat.remove(tiny_llama)
    fqs = qat.inject(tiny_llama, QuantSpec(4, 32))
    assert "lm_head" not in fqs and len(fqs) == 14


def test_set_enabled_switches_every_layer(tiny_llama):
    ids = _ids()
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids).logits
        qat.inject(tiny_llama, QuantSpec(4, 32))
        assert not torch.equal(tiny_llama(input_ids=ids).logits, ref)
        qat.set_enabled(tiny_llama, False)
        assert torch.equal(tiny_llama(input_ids=ids).logits, ref)


def test_bad_input_raises_with_the_fix(tiny_llama):
    with pytest.raises(ValueError, match="include pattern 'qproj' matched no linear layer"):
        qat.inject(tiny_llama, QuantSpec(4, 32), include=["qproj"])
    with pytest.raises(ValueError, match="No linear layer left"):
        qat.inject(tiny_llama, QuantSpec(4, 32), exclude=["re:."])
    with pytest.raises(ValueError, match="W4A8 / W8A8 only.*bits=2"):
        qat.inject(tiny_llama, QuantSpec(2, 32), ActivationSpec())
    with pytest.raises(TypeError, match="takes nn.Linear or transformers Conv1D"):
        FakeQuantLinear.from_linear(nn.Conv2d(3, 3, 1), QuantSpec(4, -1), ActivationSpec())
    with pytest.raises(ValueError, match="group_size=128 is larger than the layer's in_features=96"):
        qat.inject(tiny_llama, QuantSpec(4, 128))
    qat.inject(tiny_llama, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="call lightning_quant.qat.remove"):
        qat.inject(tiny_llama, QuantSpec(4, 32))
    qat.remove(tiny_llama)
    with pytest.raises(ValueError, match="call lightning_quant.qat.inject"):
        qat.convert(tiny_llama)


def test_activation_quant_refuses_a_layer_kind_without_plain_activations():
    from lightning_quant import targets

    class Gated(nn.Module):  # a linear-like layer whose input is not a plain activation [..., in]
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 32))
            self.bias = None

    targets.register_linear_kind(Gated, targets.LinearKind("gated", lambda m: m.weight, lambda m: m.bias,
                                                           plain_input=False))
    try:
        with pytest.raises(TypeError, match="act_spec needs a layer whose input is a plain activation.*kind 'gated'"):
            FakeQuantLinear.from_linear(Gated(), QuantSpec(4, 32), ActivationSpec())
        fq = FakeQuantLinear.from_linear(Gated(), QuantSpec(4, 32))
        assert fq.kind == "gated"  # weight-only is fine
        with pytest.raises(TypeError, match="register its linear kind with build="):
            fq.to_linear()  # the kind says nothing about how to rebuild a Gated
    finally:
        targets._KINDS.pop(Gated)


@pytest.mark.slow
def test_smollm2_fake_quant_equals_converted_with_partial_groups(smollm2, heldout_windows):
    """Real model, hidden 576 = 4 x 128 + 64: the partial last group goes through QAT and conversion."""
    model = copy.deepcopy(smollm2)
    fqs = qat.inject(model, QuantSpec(4, 128), ActivationSpec(), include=["re:layers\\.(0|29)\\."], observer="mse")
    assert len(fqs) == 14 and all(fq.observer.clip.shape[1] in (5, 12) for fq in fqs.values())  # 576/128, 1536/128
    ids = heldout_windows[:1, :64]
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    qat.convert(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fake, atol=1e-4, rtol=1e-5)
