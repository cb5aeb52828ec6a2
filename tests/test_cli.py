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
                 "32", "--asym", "--act-order", "--calib", str(model_dir / "calib.txt"), "--num-samples", "4", "--seq-len", "64",
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


def test_spec_flags_default_to_quantspec_defaults():
    from lightning_quant.cli import _spec, build_parser
    from lightning_quant.methods.registry import get_method

    parse = build_parser().parse_args
    base = ["quantize", "--model", "m", "--method", "rtn", "--out", "o"]
    assert _spec(parse(base), get_method("rtn")) == QuantSpec()  # symmetric, like QuantSpec
    assert QuantSpec().symmetric and _spec(parse(base + ["--sym"]), get_method("rtn")).symmetric
    assert _spec(parse(base + ["--asym", "--bits", "3"]), get_method("rtn")) == QuantSpec(bits=3, symmetric=False)
    assert _spec(parse(base + ["--group-size", "-1"]), get_method("rtn")) == QuantSpec(group_size=-1)


def test_sym_and_asym_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "m", "--method", "rtn", "--out", "o", "--sym", "--asym"])
    assert "argument --asym: not allowed with argument --sym" in capsys.readouterr().err


def test_int8_needs_no_spec_flags(model_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from lightning_quant.layers.int8 import Int8OutlierLinear
    from lightning_quant.methods.llm_int8 import INT8_METHOD_SPEC

    out = tmp_path / "i8"
    assert main(["quantize", "--model", str(model_dir / "model"), "--method", "int8", "--out", str(out)]) == 0
    assert _last_line(capsys) == f"quantized 14 layers with int8 ({INT8_METHOD_SPEC}) -> {out}"
    assert json.loads((out / "quantization.json").read_text())["spec"] == INT8_METHOD_SPEC.to_dict()
    ref = AutoModelForCausalLM.from_pretrained(model_dir / "model").eval()
    quantize_model(ref, method="int8")
    loaded = load_quantized(out)
    assert sum(isinstance(m, Int8OutlierLinear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)
    # flags that agree with the fixed spec are accepted
    main(["quantize", "--model", str(model_dir / "model"), "--method", "int8", "--bits", "8", "--group-size", "-1",
          "--sym", "--out", str(tmp_path / "agree")])


@pytest.mark.parametrize("flags, dropped", [
    (["--bits", "4"], "--bits 4"),
    (["--group-size", "128"], "--group-size 128"),
    (["--asym"], "--asym"),
    (["--bits", "8", "--group-size", "64", "--asym"], "--group-size 64 --asym"),
])
def test_int8_rejects_conflicting_spec_flags(model_dir, tmp_path, flags, dropped):
    with pytest.raises(SystemExit, match=rf"--method int8 always quantizes to W8ch \(--bits 8 --group-size -1 --sym\); "
                                         rf"drop {dropped}, or omit the spec flags"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "int8", *flags, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_awq_gptq_and_qparam_search_flags(model_dir, tmp_path, capsys):
    out = tmp_path / "ag"
    assert main(["quantize", "--model", str(model_dir / "model"), "--method", "awq+gptq", "--bits", "4", "--group-size",
                 "32", "--asym", "--qparam-search", "hessian", "--calib", str(model_dir / "calib.txt"),
                 "--num-samples", "2", "--seq-len", "64", "--out", str(out)]) == 0
    assert sum(isinstance(m, PackedLinear) for m in load_quantized(out).modules()) == 14
    with pytest.raises(SystemExit, match="use objective='weight', or method='gptq'/'awq'"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--qparam-search", "hessian",
              "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="--gptaq is not an option of --method rtn"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--gptaq", "--out", str(tmp_path / "g")])
    with pytest.raises(SystemExit, match="--qparam-search is not an option of --method int8"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "int8", "--qparam-search", "weight",
              "--out", str(tmp_path / "i")])


def test_gptaq_flag_equals_the_config(model_dir, tmp_path):
    """--gptaq: the saved model equals quantize_model(..., config=GPTQConfig(gptaq=True)) on the same data
    (and differs from plain GPTQ's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gptaq"
    assert main(["quantize", "--model", str(model_dir / "model"), "--method", "gptq", "--bits", "4", "--group-size",
                 "32", "--gptaq", "--calib", str(model_dir / "calib.txt"), "--num-samples", "2", "--seq-len", "64",
                 "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(model_dir / "model")
    calib = token_windows(tok((model_dir / "calib.txt").read_text(), return_tensors="pt").input_ids, 64, 2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = load_quantized(out)(input_ids=ids).logits
    for cfg, same in ((GPTQConfig(gptaq=True), True), (GPTQConfig(), False)):
        ref = AutoModelForCausalLM.from_pretrained(model_dir / "model").eval()
        quantize_model(ref, QuantSpec(4, 32), "gptq", calibration=calib, config=cfg)
        assert torch.equal(ref(input_ids=ids).logits, logits) is same, cfg


def test_rotate_flag_rotates_before_quantizing(model_dir, tmp_path):
    """--rotate hadamard --rotate-seed 3: the saved model equals quantize_model(..., rotation=Rotation(seed=3))."""
    from transformers import AutoModelForCausalLM

    from lightning_quant import Rotation

    out = tmp_path / "rot"
    assert main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--rotate", "hadamard", "--rotate-seed", "3", "--out", str(out)]) == 0
    ref = AutoModelForCausalLM.from_pretrained(model_dir / "model").eval()
    quantize_model(ref, QuantSpec(4, 32), "rtn", rotation=Rotation("hadamard", seed=3))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = load_quantized(out)
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, torch.ones(96))
    assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_rotate_flag_refusals(model_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"error: --rotate: method='int8' does not take rotation=: LLM.int8\(\)"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "int8", "--rotate", "hadamard",
              "--out", str(tmp_path / "i")])
    with pytest.raises(SystemExit, match=r"error: --rotate-seed needs --rotate \{hadamard,random\}"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--rotate-seed", "2",
              "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match=r"error: --rotate: Rotation\(seed=-1\) must be a non-negative int"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--rotate", "random",
              "--rotate-seed", "-1", "--out", str(tmp_path / "n")])
    assert not any((tmp_path / d).exists() for d in ("i", "r", "n"))
