import csv

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QuantSpec, testing
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.callbacks import GPTQ
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.layers.packed import PackedLinear

SPEC = QuantSpec(4, 32)


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = testing.tiny_llama()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class DM(pl.LightningDataModule):
    def __init__(self, n=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, testing.TINY_VOCAB, (n, 17), generator=g)
        self.ds = TensorDataset(ids[:, :-1], ids[:, 1:])

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=2)


def _trainer(tmp_path, cb, **kw):
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), callbacks=[cb],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def _packed(module):
    return [n for n, m in module.named_modules() if isinstance(m, PackedLinear)]


def test_gptq_on_fit_end_with_datamodule_logs_layer_losses(tmp_path):
    cb = GPTQ(SPEC, GPTQConfig(act_order=True), num_samples=3)
    model, trainer = LM(), None
    trainer = _trainer(tmp_path, cb)
    trainer.fit(model, datamodule=DM())
    assert len(_packed(model)) == 14 and set(_packed(model)) == set(cb.quantized_weights)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {k for r in rows for k, v in r.items() if v}
    assert "gptq/model.model.layers.1.mlp.down_proj/gptq_loss" in keys
    assert cb.state_dict() == {"quantized": sorted(cb.quantized_weights)}
    # the (x, y) batches were used: 3 batches of 2 x 16 tokens
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8)))).all()


def test_explicit_dataloader_train_end_and_manual(tmp_path):
    loader = [torch.randint(0, 256, (2, 16)) for _ in range(2)]
    cb = GPTQ(SPEC, num_samples=2, dataloader=loader, when="train_end")
    model = LM()
    _trainer(tmp_path, cb).fit(model, datamodule=DM())
    assert len(_packed(model)) == 14
    manual = GPTQ(SPEC, num_samples=2, dataloader=loader, when="manual")
    model2 = LM()
    trainer = _trainer(tmp_path, manual)
    trainer.fit(model2, datamodule=DM())
    assert _packed(model2) == []
    manual.quantize(trainer, model2)
    assert len(_packed(model2)) == 14
    with pytest.raises(RuntimeError, match="already quantized"):
        manual.quantize(trainer, model2)
    restored = GPTQ(SPEC, num_samples=2, dataloader=loader, when="manual")  # a resumed run's callback
    restored.load_state_dict(manual.state_dict())
    assert restored.state_dict() == manual.state_dict() and len(restored.restored) == 14
    with pytest.raises(RuntimeError, match="restored from a checkpoint taken after it quantized 14 layer"):
        restored.quantize(trainer, LM())
    with pytest.raises(ValueError, match=r"expects \{'quantized': \[layer names\]\}"):
        restored.load_state_dict({"quantized": "all"})


def test_trainer_dataloader_is_used_without_a_datamodule(tmp_path):
    cb = GPTQ(SPEC, num_samples=2, include=["re:\\.mlp\\."])
    model = LM()
    _trainer(tmp_path, cb).fit(model, train_dataloaders=DM().train_dataloader())
    assert len(_packed(model)) == 6


def test_too_small_loader_and_bad_arguments(tmp_path):
    cb = GPTQ(SPEC, num_samples=50)
    with pytest.raises(ValueError, match="yielded only 4 batch\\(es\\), fewer than num_samples=50"):
        _trainer(tmp_path, cb).fit(LM(), datamodule=DM())
    with pytest.raises(ValueError, match=r"when='end' is not supported; use one of \('fit_end', 'train_end', 'manual'\)"):
        GPTQ(SPEC, when="end")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        GPTQ(SPEC, num_samples=0)
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        GPTQ(spec=4)
    with pytest.raises(TypeError, match="must be a GPTQConfig"):
        GPTQ(SPEC, config={"damp_percent": 0.1})
    with pytest.raises(TypeError, match="dataloader must be an iterable"):
        GPTQ(SPEC, dataloader="calib.txt")
    with pytest.raises(ValueError, match="include must be a list"):
        GPTQ(SPEC, include="q_proj")
    with pytest.raises(ValueError, match=r"Unknown quantization method 'nope'; available: \[.*'gptq'"):
        PostTrainingQuantization(SPEC, "nope")
    with pytest.raises(ValueError, match="found no calibration data"):
        GPTQ(SPEC, when="manual").calibration_batches(None)


def test_unsupported_strategy_is_rejected_in_setup():
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="supports single-device and DDP strategies, ModelParallelStrategy "
                                        "\\(FSDP2\\) and FSDPStrategy, not object"):
        GPTQ(SPEC).setup(SimpleNamespace(strategy=object()), LM(), "fit")


def test_awq_config_selects_awq_then_gptq(tmp_path):
    """GPTQ(config=GPTQConfig(awq=AWQConfig())) runs method='awq+gptq' at fit end."""
    from lightning_quant.algorithms.awq import AWQConfig

    cb = GPTQ(QuantSpec(4, 32, symmetric=False), GPTQConfig(awq=AWQConfig(n_grid=4, clip_grid=2)), num_samples=3)
    assert cb.method == "awq+gptq" and GPTQ(SPEC).method == "gptq"
    model = LM()
    _trainer(tmp_path, cb).fit(model, datamodule=DM())
    assert len(_packed(model)) == 14
    figures = cb.quantized_weights.figures
    assert set(figures) == set(cb.quantized_weights) and all("awq_ratio" in f and "gptq_loss" in f for f in figures.values())


def test_rotation_option_rotates_before_gptq_at_fit_end(tmp_path):
    """GPTQ(rotation=Rotation()): the residual stream is rotated (norm scales folded: exactly 1 afterwards, though
    training moved them) before GPTQ runs; the model stays a usable LM with packed layers."""
    from lightning_quant import Rotation

    cb = GPTQ(SPEC, num_samples=2, rotation=Rotation(kind="hadamard", seed=1))
    model = LM()
    _trainer(tmp_path, cb).fit(model, datamodule=DM())
    assert len(_packed(model)) == 14 and cb.rotation == Rotation(seed=1)
    for layer in model.model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones(96))
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8)))).all()


def test_rotation_option_refusals():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_quant import Rotation
    from lightning_quant.callbacks import AWQ
    from lightning_quant.methods.llm_int8 import INT8_METHOD_SPEC

    assert AWQ(SPEC, rotation=Rotation("random")).rotation == Rotation("random")
    with pytest.raises(ValueError, match=r"method='int8' does not take rotation=: LLM.int8\(\) keeps"):
        PostTrainingQuantization(INT8_METHOD_SPEC, "int8", rotation=Rotation())
    with pytest.raises(TypeError, match="rotation must be a lightning_quant.methods.rotation.Rotation"):
        GPTQ(SPEC, rotation="hadamard")
    with pytest.raises(TypeError, match=r"GPTQ\(rotation=...\) does not run under ModelParallelStrategy: the rotation "
                                        r"rewrites .* Use strategy='ddp'"):
        GPTQ(SPEC, rotation=Rotation()).setup(SimpleNamespace(strategy=ModelParallelStrategy()), LM(), "fit")
