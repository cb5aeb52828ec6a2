import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.callbacks import QuantizationReport
from lightning_quant.lit import byte_text_loaders, make_lightning_module
from lightning_quant.testing import tiny_llama
from tests.integrations.wandb_reader import offline_run_dir, read_history


class _RTNAtFitEnd(pl.Callback):
    """Test double for a conversion callback: real RTN conversion at on_fit_end."""

    def on_fit_end(self, trainer, pl_module):
        quantize_model(pl_module.model, QuantSpec(4, 32))


def _fit(tmp_path, loggers, report):
    train, val = byte_text_loaders(seq_len=32, n_train=8, n_val=4)
    module = make_lightning_module(tiny_llama())
    # report listed *before* the converter: it must not depend on callback order
    trainer = pl.Trainer(max_steps=2, logger=loggers, callbacks=[report, _RTNAtFitEnd()], default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train, val)
    return trainer


def test_report_files_and_wandb_offline_run(tmp_path):
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="lq-test")
    report = QuantizationReport(output_dir=str(tmp_path / "report"), num_batches=1)
    _fit(tmp_path, [wb, CSVLogger(tmp_path)], report)
    wb.experiment.finish()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "quant/ppl_after" in md and "model.layers.0.self_attn.q_proj" in md
    for name in ("layer_errors.png", "worst_layers.png", "bits_per_weight.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = report.data.summary()
    # an almost untrained tiny model: 4-bit moves perplexity, but not in a predictable direction
    assert summary["quant/ppl_after"] != summary["quant/ppl_before"]
    assert 1 < summary["quant/ppl_before"] < 300 and abs(summary["quant/ppl_after"] / summary["quant/ppl_before"] - 1) < 0.2
    assert 0.1 < summary["quant/size_ratio"] < 1
    hist = read_history(offline_run_dir(tmp_path))
    merged = {k: v for row in hist for k, v in row.items()}
    assert "quant/bits_per_weight" in merged, sorted(merged)
    assert merged["quant/bits_per_weight"] == pytest.approx(summary["quant/bits_per_weight"])
    assert merged["quant/ppl_before"] == pytest.approx(summary["quant/ppl_before"])
    assert merged["quant/layers.nrows"] == 14 and merged["quant/layers._type"] == "table-file"
    assert any(k.startswith("quant/report") for k in merged)  # the images


def test_report_without_wandb_logs_same_figures_to_csv(tmp_path):
    report = QuantizationReport(num_batches=1)
    trainer = _fit(tmp_path, [CSVLogger(tmp_path, name="csv")], report)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "quant/ppl_after" in text and "quant/layers/model.model.layers.1.mlp.down_proj/relative_error" in text
    assert (tmp_path / "quant_report" / "report.md").exists()
    assert trainer.state.finished


def test_report_images_and_scalars_reach_tensorboard(tmp_path):
    """TensorBoard gets the plots as images (read back from the event file) and the same scalars."""
    pytest.importorskip("tensorboard", reason="tensorboard is a dev dependency")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = QuantizationReport(output_dir=str(tmp_path / "report"), num_batches=1)
    _fit(tmp_path, [TensorBoardLogger(tmp_path, name="tb")], report)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    images = events.Tags()["images"]
    assert {"quant/report/layer_errors", "quant/report/worst_layers", "quant/report/bits_per_weight"} <= set(images)
    png = events.Images("quant/report/layer_errors")[0]
    assert png.width > 300 and png.height > 200 and png.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    after = events.Scalars("quant/ppl_after")[0].value
    assert after == pytest.approx(report.data.summary()["quant/ppl_after"])


def test_report_bad_args_and_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        QuantizationReport(num_batches=0)
    with pytest.raises(ValueError, match="worst_k must be a positive int"):
        QuantizationReport(worst_k=-1)
    train, val = byte_text_loaders(seq_len=32, n_train=4, n_val=2)
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[QuantizationReport()], default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="no quantized layers.*convert it before reporting"):
        trainer.fit(make_lightning_module(tiny_llama()), train, val)


def test_unpadded_windows_measure_real_tokens_only():
    import torch

    from lightning_quant.calibration.data import CalibrationBatch
    from lightning_quant.callbacks.report import unpadded_windows

    ids = torch.arange(12).reshape(2, 6)
    right = CalibrationBatch(ids, torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))
    left = CalibrationBatch(ids + 100, torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    a, b = unpadded_windows([right, left])
    assert torch.equal(a, ids[:, :3]) and torch.equal(b, ids[:, -3:] + 100)  # one length: the shortest real row
    holes = CalibrationBatch(ids, torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="neither right- nor left-padding"):
        unpadded_windows([holes])
    with pytest.raises(ValueError, match="shortest validation sequence has 1 token"):
        unpadded_windows([CalibrationBatch(ids, torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]))])
