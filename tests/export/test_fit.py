"""Export at fit end: ExportConfig validation and export_after_fit inside a Trainer run."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant import export
from lightning_quant.export import ExportConfig, export_after_fit
from lightning_quant.spec import QuantSpec
from lightning_quant.testing import random_token_batches, tiny_llama
from tests.export.conftest import quantize_packed


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, _):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class ConvertAndExport(L.Callback):
    """Stands in for a PTQ callback: convert at fit end, then the shared export helper."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_fit_end(self, trainer, pl_module):
        quantize_packed(pl_module.model, QuantSpec(4, 32))
        self.out = export_after_fit(trainer, pl_module, self.cfg)


def _fit(tmp_path, callbacks):
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=callbacks)
    module = LM()
    trainer.fit(module, DataLoader(torch.cat(random_token_batches(1, 16, 2)), batch_size=2))
    return module


def test_export_after_fit_writes_loadable_export(tmp_path, ids):
    cb = ConvertAndExport({"format": "gptq", "path": str(tmp_path / "out"), "dtype": "float32"})
    module = _fit(tmp_path, [cb])
    assert cb.out == tmp_path / "out"
    assert torch.equal(export.load(tmp_path / "out")(ids).logits, module.model(ids).logits)


def test_qat_callback_exports_on_fit_end(tmp_path, ids):
    from lightning_quant.callbacks import QuantizationAwareTraining

    cb = QuantizationAwareTraining(QuantSpec(4, 32), export_on_fit_end={"format": "compressed-tensors",
                                                                        "path": str(tmp_path / "qat")})
    module = _fit(tmp_path, [cb])
    loaded = export.load(tmp_path / "qat")
    assert torch.equal(loaded(ids).logits, module.model(ids).logits)
    with pytest.raises(ValueError, match="export_on_fit_end needs convert_on_fit_end=True"):
        QuantizationAwareTraining(QuantSpec(4, 32), convert_on_fit_end=False,
                                  export_on_fit_end={"format": "gptq", "path": "x"})


def test_export_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"export format 'ggml' is unknown; use one of \['awq'"):
        ExportConfig("ggml", "out")
    with pytest.raises(ValueError, match="needs keys 'format' and 'path'"):
        ExportConfig.coerce({"format": "gptq"})
    with pytest.raises(ValueError, match="needs keys 'format' and 'path'"):
        ExportConfig.coerce({"format": "gptq", "path": "x", "bits": 4})
    with pytest.raises(TypeError, match="must be a dict like"):
        ExportConfig.coerce("gptq")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        ExportConfig("gptq", "out", overwrite="yes")
    with pytest.raises(ValueError, match="dtype='fp8' is not supported"):
        ExportConfig("gptq", "out", dtype="fp8")
    with pytest.raises(ValueError, match="non-empty str or path"):
        ExportConfig("gptq", "")
    (tmp_path / "exists").mkdir()
    cb = ConvertAndExport(ExportConfig("gptq", tmp_path / "exists"))
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        _fit(tmp_path, [cb])


def test_find_hf_model_requires_transformers_model():
    from lightning_quant.export.fit import find_hf_model

    with pytest.raises(ValueError, match="holds no transformers PreTrainedModel"):
        find_hf_model(torch.nn.Linear(2, 2))


def test_gptq_callback_exports_on_fit_end(tmp_path, ids):
    from lightning_quant.callbacks import GPTQ

    cb = GPTQ(QuantSpec(4, 32), num_samples=1, export_on_fit_end={"format": "gptq_v2", "path": str(tmp_path / "g")})
    module = _fit(tmp_path, [cb])
    assert torch.equal(export.load(tmp_path / "g")(ids).logits, module.model(ids).logits)
    with pytest.raises(ValueError, match="export_on_fit_end needs when='fit_end' or 'train_end'"):
        GPTQ(QuantSpec(4, 32), when="manual", export_on_fit_end={"format": "gptq", "path": "x"})


def test_onnx_export_on_fit_end_takes_options(tmp_path, ids):
    pytest.importorskip("onnxruntime")
    cfg = {"format": "onnx", "path": str(tmp_path / "edge"), "options": {"attention": "plain", "context_length": 64}}
    cb = ConvertAndExport(cfg)
    module = _fit(tmp_path, [cb])
    loaded = export.load(tmp_path / "edge")
    meta = loaded.config["lightning_quant_export"]
    assert (meta["graph"], meta["attention"], meta["context_length"]) == ("generation", "plain", 64)
    assert (tmp_path / "edge" / "genai_config.json").exists()
    torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['bits'\] for format 'onnx'; its options are"):
        ExportConfig("onnx", "out", options={"bits": 4})
    with pytest.raises(ValueError, match="Format 'gptq' takes no options"):
        ExportConfig.coerce({"format": "gptq", "path": "out", "options": {"accuracy_level": 4}})
