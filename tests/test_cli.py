import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model, testing
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.cli import load_quantized, main
from lightning_quant.data import stdlib_text, token_windows
from lightning_quant.evaluation import perplexity
from lightning_quant.layers.packed import PackedLinear


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    testing.tiny_llama().save_pretrained(d / "model")
    testing.byte_tokenizer().save_pretrained(d / "model")
    (d / "calib.txt").write_text(stdlib_text(20_000, split="train"))
    (d / "heldout.txt").write_text(stdlib_text(8_000, split="heldout"))
    return d


def _last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_quantize_then_eval_matches_in_memory(model_dir, capsys, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir / "model"), "--method", "gptq", "--bits", "4", "--group-size",
                 "32", "--act-order", "--calib", str(model_dir / "calib.txt"), "--num-samples", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    assert {"config.json", "quantization.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    main(["eval", "--model", str(out), "--data", str(model_dir / "heldout.txt"), "--seq-len", "64", "--max-windows", "6"])
    line = _last_line(capsys)
    assert line.startswith("ppl=")
    # the same quantization in memory gives the same model, hence the same figure
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(model_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(model_dir / "model")
    calib = token_windows(tok((model_dir / "calib.txt").read_text(), return_tensors="pt").input_ids, 64, 4)
    quantize_model(ref, QuantSpec(4, 32, symmetric=False), "gptq", calibration=calib, config=GPTQConfig(act_order=True))
    held = token_windows(tok((model_dir / "heldout.txt").read_text(), return_tensors="pt").input_ids, 64, 6)
    loaded = load_quantized(out)
    assert sum(isinstance(m, PackedLinear) for m in loaded.modules()) == 14
    assert torch.equal(loaded(input_ids=held).logits, ref(input_ids=held).logits)
    assert line == f"ppl={perplexity(ref, held):.4f}"


def test_rtn_and_float_eval_as_a_console_script(model_dir, tmp_path):
    out = tmp_path / "rtn"
    main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--bits", "8", "--group-size", "-1",
          "--sym", "--out", str(out)])
    cmd = [sys.executable, "-m", "lightning_quant.cli", "eval", "--data", str(model_dir / "heldout.txt"),
           "--seq-len", "64", "--max-windows", "4"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    figures = []
    for model in (out, model_dir / "model"):
        res = subprocess.run(cmd + ["--model", str(model)], check=False, capture_output=True, text=True, env=env,
                             cwd=Path(__file__).parents[1], timeout=300)
        assert res.returncode == 0, res.stderr
        figures.append(float(res.stdout.strip().splitlines()[-1].removeprefix("ppl=")))
    # W8 per channel is close to float, but not identical
    assert figures[0] != figures[1] and abs(figures[0] / figures[1] - 1) < 0.02


def test_bad_input(model_dir, tmp_path, capsys):
    base = ["quantize", "--model", str(model_dir / "model"), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match="needs --calib FILE"):
        main(base + ["--method", "gptq"])
    with pytest.raises(SystemExit, match="fewer than 500; give more text"):
        main(base + ["--method", "gptq", "--calib", str(model_dir / "heldout.txt"), "--num-samples", "500",
                     "--seq-len", "64"])
    with pytest.raises(SystemExit, match="--act-order is not an option of --method rtn"):
        main(base + ["--method", "rtn", "--act-order"])
    with pytest.raises(SystemExit, match="group_size=0 is invalid"):
        main(base + ["--method", "rtn", "--group-size", "0"])
    with pytest.raises(SystemExit, match="--seq-len must be a positive integer"):
        main(["eval", "--model", str(model_dir / "model"), "--data", str(model_dir / "heldout.txt"), "--seq-len", "0"])
    with pytest.raises(SystemExit):
        main(base + ["--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
