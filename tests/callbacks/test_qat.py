import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_quant import qat
from lightning_quant.callbacks import QuantizationAwareTraining
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import ActivationSpec, QuantSpec
from tests.qat.helpers import TinyCausalLM, token_loader, trainer

SPEC = QuantSpec(4, 32)


class _RecordLogits(Callback):
    """Logits of the still-fake-quantized model at fit end (runs before the QAT callback converts)."""

    def __init__(self, ids):
        self.ids, self.logits = ids, None

    def on_fit_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(self.ids)


def test_short_qat_run_reduces_loss_updates_observers_and_trains_scales():
    lm = TinyCausalLM(lr=0.1)
    cb = QuantizationAwareTraining(SPEC, ActivationSpec(), observer="lsq", convert_on_fit_end=False)
    ids = next(iter(token_loader()))[0]
    rec = _RecordLogits(ids)
    init = {}

    class _Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            init.update({n: fq.observer.scale.detach().clone() for n, fq in qat.fake_quant_modules(pl_module).items()})

    trainer(24, callbacks=[rec, cb, _Snapshot()]).fit(lm, token_loader())
    first, last = sum(lm.losses[:4]) / 4, sum(lm.losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    fqs = qat.fake_quant_modules(lm)
    assert len(fqs) == 14 and set(init) == set(fqs)
    for n, fq in fqs.items():
        assert fq.observer.scale.grad is not None
        assert not torch.equal(fq.observer.scale.detach(), init[n])  # the learnable scales moved


def test_moving_average_observer_updates_during_fit():
    lm = TinyCausalLM()
    cb = QuantizationAwareTraining(SPEC, observer="moving_average", convert_on_fit_end=False)
    fresh = TinyCausalLM()
    qat.inject(fresh, SPEC, observer="moving_average")
    trainer(4, callbacks=[cb]).fit(lm, token_loader())
    for n, fq in qat.fake_quant_modules(lm).items():
        assert not torch.equal(fq.observer.hi, fresh.get_submodule(n).observer.hi)


def test_observers_update_when_the_host_model_is_in_eval_mode():
    """transformers' from_pretrained returns eval models and Lightning keeps modes: the callback trains its layers."""
    lm = TinyCausalLM().eval()
    cb = QuantizationAwareTraining(SPEC, observer="moving_average", convert_on_fit_end=False)
    fresh = TinyCausalLM()
    qat.inject(fresh, SPEC, observer="moving_average")
    trainer(3, callbacks=[cb]).fit(lm, token_loader())
    for n, fq in qat.fake_quant_modules(lm).items():
        assert not torch.equal(fq.observer.hi, fresh.get_submodule(n).observer.hi), n


def test_start_step_warms_up_in_float():
    lm = TinyCausalLM()
    trainer(5, callbacks=[QuantizationAwareTraining(SPEC, start_step=3, convert_on_fit_end=False)]).fit(lm, token_loader())
    assert lm.enabled_log == [False, False, False, True, True]


def test_convert_on_fit_end_packs_with_learned_qparams():
    lm = TinyCausalLM()
    ids = next(iter(token_loader()))[0]
    rec = _RecordLogits(ids)
    cb = QuantizationAwareTraining(SPEC, ActivationSpec(), observer="lsq")
    trainer(3, callbacks=[rec, cb]).fit(lm, token_loader())
    assert not qat.fake_quant_modules(lm) and len(cb.quantized_weights) == 14
    for name, qw in cb.quantized_weights.items():
        layer = lm.get_submodule(name)
        assert isinstance(layer, PackedLinear) and layer.act_spec == ActivationSpec()
        assert torch.equal(layer.to_quantized().codes, qw.codes)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), rec.logits, atol=1e-6, rtol=1e-5)


def _run(tmp_path, max_epochs, observer, ckpt_path=None, save=False):
    torch.manual_seed(0)
    lm = TinyCausalLM()
    cbs = [QuantizationAwareTraining(SPEC, ActivationSpec(), observer=observer, start_step=2, convert_on_fit_end=False)]
    if save:
        cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    trainer(-1, max_epochs=max_epochs, callbacks=cbs, enable_checkpointing=save).fit(lm, token_loader(), ckpt_path=ckpt_path)
    return lm


@pytest.mark.parametrize("observer", ["moving_average", "lsq"])
def test_resume_mid_qat_equals_uninterrupted(tmp_path, observer):
    full = _run(tmp_path, 2, observer, save=True)  # 4 steps per epoch; epoch 0's checkpoint is mid-QAT
    resumed = _run(tmp_path, 2, observer, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    ref, got = full.state_dict(), resumed.state_dict()
    assert set(ref) == set(got) and any(".observer." in k for k in ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert len(resumed.losses) == 4 and resumed.enabled_log == [True] * 4  # only the second half ran, quantized
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    assert any(".observer." in k for k in ckpt["state_dict"])  # QAT state travels in the ordinary state_dict


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="start_step must be an int >= 0"):
        QuantizationAwareTraining(SPEC, start_step=-1)
    with pytest.raises(TypeError, match="convert_on_fit_end must be True or False"):
        QuantizationAwareTraining(SPEC, convert_on_fit_end="yes")
    with pytest.raises(ValueError, match="include pattern 'nope' matched no linear layer"):
        trainer(1, callbacks=[QuantizationAwareTraining(SPEC, include=["nope"])]).fit(TinyCausalLM(), token_loader())
    assert isinstance(QuantizationAwareTraining(SPEC), pl.Callback)


def test_unsupported_strategy_names_the_supported_ones():
    from types import SimpleNamespace

    from lightning_quant.callbacks import QuantizationAwareTraining
    from lightning_quant.spec import QuantSpec

    cb = QuantizationAwareTraining(QuantSpec(4, 32))
    with pytest.raises(TypeError, match="supports the strategies \\['SingleDeviceStrategy', 'DDPStrategy', "
                                        "'ModelParallelStrategy', 'FSDPStrategy'\\], not object"):
        cb.setup(SimpleNamespace(strategy=object()), None, "fit")
