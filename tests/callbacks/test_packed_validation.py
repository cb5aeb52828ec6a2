import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_quant import QuantSpec, qat
from lightning_quant import primitives as P
from lightning_quant.callbacks import PackedValidation, QuantizationAwareTraining
from lightning_quant.layers import PackedLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.targets import select_linears, set_submodule
from lightning_quant.testing import random_token_batches, tiny_llama

SPEC = QuantSpec(4, 32)


class _LM(pl.LightningModule):
    def __init__(self, model=None):
        super().__init__()
        self.model = (model if model is not None else tiny_llama()).train()
        self.losses, self.val_losses = [], []

    def forward(self, ids):
        return self.model(ids, labels=ids)

    def training_step(self, batch, _):
        loss = self(batch).loss
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, _):
        loss = self(batch).loss
        self.val_losses.append(loss.detach().clone())
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class _FakeQuant(nn.Module):
    """A real fake-quant layer (primitives.fake_quantize, straight-through) implementing the protocol.

    ``packed_spec`` (test knob): the spec its ``quantized_weight()`` reports, so packed != fake on purpose.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, packed_spec: QuantSpec | None = None):
        super().__init__()
        self.weight, self.bias, self.spec, self.act_spec = linear.weight, linear.bias, spec, None
        self.packed_spec = packed_spec or spec

    def forward(self, x):
        scale, zero = P.compute_qparams(self.weight, self.spec)
        return nn.functional.linear(x, P.fake_quantize(self.weight, scale, zero, self.spec), self.bias)

    def quantized_weight(self) -> QuantizedWeight:
        w = self.weight.detach()
        scale, zero = P.compute_qparams(w, self.packed_spec)
        return QuantizedWeight.from_float(w, self.packed_spec, scale, zero)

    def to_packed(self):
        qw = self.quantized_weight()
        return PackedLinear.from_quantized(qw, None if self.bias is None else self.bias.detach()), qw


def _with_fake_quant(lm, packed_spec=None):
    for name, m in select_linears(lm).items():
        set_submodule(lm, name, _FakeQuant(m, SPEC, packed_spec))
    return lm


def _fit(lm, callbacks, epochs=2):
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks)
    trainer.fit(lm, _loader(4, 1), _loader(2, 2))
    return trainer


def _loader(n, seed):
    return torch.utils.data.DataLoader(torch.cat(random_token_batches(n, 16, 2, seed=seed)), batch_size=2)


def test_training_is_bit_identical_and_modules_come_back():
    ref, lm = _with_fake_quant(_LM()), _with_fake_quant(_LM())
    lm.load_state_dict(ref.state_dict())
    params_before = {n: p for n, p in lm.named_parameters()}
    modules_before = dict(lm.named_modules())
    _fit(ref, [])
    trainer = _fit(lm, [PackedValidation()])
    assert len(ref.losses) == len(lm.losses) == 8
    assert all(torch.equal(a, b) for a, b in zip(ref.losses, lm.losses))
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), lm.parameters()))
    assert dict(lm.named_parameters()) == params_before  # same Parameter objects
    assert dict(lm.named_modules()) == modules_before  # training modules swapped back
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert all(any(p is q for q in params_before.values()) for p in opt_params)
    assert not any(isinstance(m, PackedLinear) for m in lm.modules())


def test_validation_metrics_come_from_the_packed_model():
    # packed layers report 2-bit codes while the training forward simulates 4 bits: they differ on purpose
    lm = _with_fake_quant(_LM(), packed_spec=QuantSpec(2, 32))
    cb = PackedValidation()
    trainer = _fit(lm, [cb], epochs=1)
    val = random_token_batches(2, 16, 2, seed=2)
    packed_model = copy.deepcopy(lm)
    for name, m in [(n, m) for n, m in packed_model.named_modules() if isinstance(m, _FakeQuant)]:
        set_submodule(packed_model, name, PackedLinear.from_quantized(m.quantized_weight(), m.bias.detach()
                                                                      if m.bias is not None else None))
    with torch.no_grad():
        packed_losses = [packed_model(ids).loss for ids in val]
        fake_losses = [lm(ids).loss for ids in val]
    expected = torch.stack(packed_losses).mean()
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], expected, rtol=0, atol=1e-6)
    gap = expected - torch.stack(fake_losses).mean()
    assert gap.abs() > 1e-2  # the deliberate 2-bit vs 4-bit difference is visible
    torch.testing.assert_close(trainer.callback_metrics["packed/loss_gap"], gap, rtol=0, atol=1e-5)
    torch.testing.assert_close(trainer.callback_metrics["packed/loss"], expected, rtol=0, atol=1e-5)
    assert trainer.callback_metrics["packed/kl_to_fake"] > 1e-3
    assert trainer.callback_metrics["packed/output_rel_err"] > 1e-2


def test_with_qat_callback_packed_equals_fake_quant():
    lm = _LM()
    trainer = _fit(lm, [QuantizationAwareTraining(SPEC, convert_on_fit_end=False), PackedValidation()])
    assert len(qat.fake_quant_modules(lm)) == 14 and not any(isinstance(m, PackedLinear) for m in lm.modules())
    # same codes, and the CPU packed path is the exact dequantize-then-matmul: no gap at all
    assert trainer.callback_metrics["packed/output_rel_err"] == 0
    assert trainer.callback_metrics["packed/kl_to_fake"] == 0
    assert trainer.callback_metrics["packed/loss_gap"] == 0


def test_spec_mode_rtn_packs_a_float_model_and_every_n_epochs():
    lm = _LM()
    cb = PackedValidation(spec=QuantSpec(2, 32), every_n_epochs=2)
    _fit(lm, [cb], epochs=2)
    ref = _LM()
    ref.load_state_dict(lm.state_dict())
    # epoch 0 validated packed (2-bit RTN: a big gap), epoch 1 the float model
    assert cb.last_metrics["packed/output_rel_err"] > 0.05
    with torch.no_grad():
        float_losses = torch.stack([ref(ids).loss for ids in random_token_batches(2, 16, 2, seed=2)])
    torch.testing.assert_close(torch.stack(lm.val_losses[2:]), float_losses, rtol=0, atol=0)
    assert not torch.allclose(torch.stack(lm.val_losses[:2]), float_losses, atol=1e-3)


def test_bad_arguments_and_setups_raise():
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int"):
        PackedValidation(every_n_epochs=0)
    with pytest.raises(TypeError, match="spec must be a QuantSpec or None"):
        PackedValidation(spec={"bits": 4})
    with pytest.raises(TypeError, match="compare must be True or False"):
        PackedValidation(compare=1)
    with pytest.raises(ValueError, match=r"no fake-quant layer .* and no PackedLinear; .* PackedValidation\(spec="):
        _fit(_LM(), [PackedValidation()], epochs=1)
    with pytest.raises(ValueError, match="drop spec="):
        _fit(_with_fake_quant(_LM()), [PackedValidation(spec=SPEC)], epochs=1)
    with pytest.raises(ValueError, match="compare_module='nope' is not a submodule"):
        _fit(_with_fake_quant(_LM()), [PackedValidation(compare_module="nope")], epochs=1)


@pytest.mark.parametrize("lora", ["merged", "separate"])
def test_qat_with_peft_lora_packs_hosts_or_bases(lora):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a non-zero adapter, so merging matters
    qat.inject(model, SPEC, lora=lora)
    lm = _LM(model)
    cb = PackedValidation()
    seen = {}

    class _Spy(pl.Callback):  # runs after PackedValidation's on_validation_start
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx):
            q = pl_module.model.base_model.model.model.layers[0].self_attn.q_proj
            seen["q"] = type(q).__name__, type(getattr(q, "base_layer", q)).__name__

    trainer = _fit(lm, [cb, _Spy()], epochs=1)
    # merged: the packed layer holds W + s·BA and replaces the peft host; separate: only the base is packed
    assert seen["q"] == (("PackedLinear", "PackedLinear") if lora == "merged" else ("Linear", "PackedLinear"))
    assert trainer.callback_metrics["packed/output_rel_err"] < 1e-5  # same codes; float reassociation only
    assert not any(isinstance(m, PackedLinear) for m in lm.modules())


def test_an_already_converted_model_validates_as_is():
    lm = _with_fake_quant(_LM())
    qat_free = {n: m for n, m in lm.named_modules() if isinstance(m, _FakeQuant)}
    for name, m in qat_free.items():
        set_submodule(lm, name, PackedLinear.from_quantized(m.quantized_weight(), m.bias.detach()
                                                            if m.bias is not None else None))
    packed_before = dict(lm.named_modules())
    cb = PackedValidation()
    trainer = _fit(lm, [cb], epochs=1)
    assert dict(lm.named_modules()) == packed_before and "packed/output_rel_err" not in trainer.callback_metrics
