import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import qat_lora_finetune


def test_demo_pipeline_on_tiny_model(tmp_path):
    rows = qat_lora_finetune.main(["--model", "tiny-llama", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
                                   "--group-size", "32", "--lora-r", "4", "--eval-windows", "2", "--calib-windows", "4",
                                   "--out", str(tmp_path)])
    names = [r[0] for r in rows]
    assert names == ["float", "RTN W4g32", "GPTQ W4g32", "QAT-LoRA W4g32 (packed)"]
    float_mb = rows[0][3]
    assert all(r[3] < float_mb for r in rows[1:])  # packed models are smaller
    assert rows[0][2] < 1e-3 and all(r[2] > rows[0][2] for r in rows[1:])  # KL: float ~0, quantized > 0
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "export" / "config.json").exists()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_missing_model_path_names_the_path(capsys):
    with pytest.raises(SystemExit):
        qat_lora_finetune.main(["--model", "/nonexistent/model-dir"])
    assert "/nonexistent/model-dir" in capsys.readouterr().err
