"""Each recipe in callbacks/ loads through LightningCLI and runs one fast step on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import lightning_cli

RECIPES = sorted((ROOT / "callbacks").glob("*.yaml"))
FAST = ["--model.model", "tiny-llama", "--data.tokenizer", "bytes", "--data.seq_len", "32", "--data.train_windows", "4",
        "--data.val_windows", "2", "--data.batch_size", "2", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false"]


def test_all_recipes_present():
    names = {p.name for p in RECIPES}
    assert {"qat-w4a8.yaml", "qat-lora-w4g64.yaml", "gptq-w4g128.yaml", "awq-w4g128.yaml", "llm-int8.yaml",
            "packed-validation.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_one_step(recipe, tmp_path):
    # the tiny data has 2 training batches: calibrate on them (too few samples is an error, tested below)
    extra = ["--trainer.callbacks.init_args.num_samples", "2"] if ("gptq" in recipe.name or "awq" in recipe.name) else []
    cli = lightning_cli.main(["fit", "--config", str(recipe), *FAST, *extra, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    from lightning_quant.layers import PackedLinear

    packed = [m for m in cli.model.modules() if isinstance(m, PackedLinear)]
    converts = any(k in recipe.name for k in ("gptq", "awq", "qat"))
    assert bool(packed) == converts, f"{recipe.name}: packed layers after fit: {len(packed)}"


def test_misspelled_key_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "callbacks" / "qat-w4a8.yaml").read_text().replace("group_size", "group_sise"))
    with pytest.raises(SystemExit):
        lightning_cli.main(["fit", "--config", str(bad), *FAST])
    assert "group_sise" in capsys.readouterr().err


def test_too_little_calibration_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="yielded only 2 batch\\(es\\), fewer than num_samples=128"):
        lightning_cli.main(["fit", "--config", str(ROOT / "callbacks" / "gptq-w4g128.yaml"), *FAST,
                            "--trainer.default_root_dir", str(tmp_path)])
