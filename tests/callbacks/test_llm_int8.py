import pytest
import torch

from lightning_quant.callbacks import LLMInt8
from lightning_quant.layers.int8 import Int8OutlierLinear
from tests.callbacks._ptq_helpers import DM, LM, logged_keys, trainer


def _int8(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, Int8OutlierLinear)}


def test_int8_on_fit_end_needs_no_data(tmp_path):
    cb = LLMInt8(threshold=4.0)
    model = LM("gpt2")
    trainer(tmp_path, cb).fit(model, datamodule=DM())
    layers = _int8(model)
    assert len(layers) == 8 and set(layers) == set(cb.quantized_weights)
    assert all(m.threshold == 4.0 for m in layers.values())
    assert cb.outlier_stats == {}
    # manual use without a Trainer or data
    manual, other = LLMInt8(when="manual"), LM()
    manual.quantize(None, other)
    assert len(_int8(other)) == 14


def test_int8_outlier_statistics_are_logged(tmp_path):
    loader = [torch.randint(0, 256, (2, 16)) for _ in range(3)]
    cb = LLMInt8(threshold=0.5, stats_batches=2, dataloader=loader)
    model = LM()
    t = trainer(tmp_path, cb)
    t.fit(model, datamodule=DM())
    assert set(cb.outlier_stats) == set(cb.quantized_weights)
    down = cb.outlier_stats["model.model.layers.0.mlp.down_proj"]
    assert 0 <= down["outlier_fraction"] <= 1 and down["max_abs"] > 0
    assert down["outlier_columns"] == pytest.approx(down["outlier_fraction"] * 160)
    assert "int8/model.model.layers.0.mlp.down_proj/outlier_fraction" in logged_keys(t)


def test_int8_callback_bad_arguments():
    with pytest.raises(ValueError, match="threshold=-2.0 is invalid"):
        LLMInt8(threshold=-2.0)
    with pytest.raises(ValueError, match="stats_batches must be an int >= 0"):
        LLMInt8(stats_batches=-1)
    with pytest.raises(ValueError, match="found no calibration data"):
        LLMInt8(stats_batches=2, when="manual").quantize(None, LM())
