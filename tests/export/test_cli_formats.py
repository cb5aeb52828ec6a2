"""CLI: ``quantize --format {gptq,awq,compressed-tensors,int8,onnx}`` and ``eval`` reading each export."""

from __future__ import annotations

import pytest

from lightning_quant import testing
from lightning_quant.cli import main
from lightning_quant.data import stdlib_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    testing.tiny_llama().save_pretrained(d / "model")
    testing.byte_tokenizer().save_pretrained(d / "model")
    (d / "heldout.txt").write_text(stdlib_text(4_000, split="heldout"))
    return d


def _ppl(model_dir, out, capsys) -> float:
    main(["eval", "--model", str(out), "--data", str(model_dir / "heldout.txt"), "--seq-len", "64", "--max-windows", "4"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("ppl=")
    return float(line[4:])


def _quantize(model_dir, out, fmt, method="rtn", extra=(), bits="4", group_size="32"):
    spec = [] if bits is None else ["--bits", bits, "--group-size", group_size]  # None: the method's fixed spec
    return main(["quantize", "--model", str(model_dir / "model"), "--method", method, *spec, *extra, "--out", str(out),
                 "--format", fmt])


def test_every_format_evaluates_to_the_native_figure(model_dir, tmp_path, capsys):
    _quantize(model_dir, tmp_path / "native", "lightning-quant", extra=["--sym"])
    native = _ppl(model_dir, tmp_path / "native", capsys)
    for fmt in ("gptq", "awq", "compressed-tensors"):
        _quantize(model_dir, tmp_path / fmt, fmt, extra=["--sym"])
        assert (tmp_path / fmt / "tokenizer.json").exists()
        assert _ppl(model_dir, tmp_path / fmt, capsys) == native, fmt
    _quantize(model_dir, tmp_path / "onnx", "onnx", extra=["--sym"])
    assert _ppl(model_dir, tmp_path / "onnx", capsys) == pytest.approx(native, rel=1e-4)


def test_int8_method_and_format(model_dir, tmp_path, capsys):
    int8 = {"method": "int8", "bits": None}  # int8's spec is fixed (W8 per channel): no spec flags needed
    _quantize(model_dir, tmp_path / "i8", "int8", **int8)
    from lightning_quant import export
    from lightning_quant.layers.int8 import Int8OutlierLinear

    assert sum(isinstance(m, Int8OutlierLinear) for m in export.load(tmp_path / "i8").modules()) == 14
    assert _ppl(model_dir, tmp_path / "i8", capsys) > 1.0
    with pytest.raises(SystemExit, match="--format gptq: .*use format='int8' for LLM.int8 layers"):
        _quantize(model_dir, tmp_path / "bad", "gptq", **int8)


def test_format_that_cannot_hold_the_spec_exits_with_reason(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--format awq: AWQ GEMM stores 4-bit weights only"):
        main(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--bits", "8", "--group-size", "32",
              "--out", str(tmp_path / "x"), "--format", "awq"])
    assert not (tmp_path / "x").exists()


def test_onnx_export_options(model_dir, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    _quantize(model_dir, tmp_path / "o", "onnx", extra=["--sym", "--export-option", "accuracy_level=4",
                                                        "--export-option", "context-length=128"])
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert (tmp_path / "o" / "genai_config.json").exists() and (tmp_path / "o" / "tokenizer.json").exists()
    assert _ppl(model_dir, tmp_path / "o", capsys) > 1.0
    with pytest.raises(SystemExit, match=r"--export-option: accuracy_level=7 is not supported by MatMulNBits"):
        _quantize(model_dir, tmp_path / "bad", "onnx", extra=["--export-option", "accuracy_level=7"])
    with pytest.raises(SystemExit, match="--export-option takes KEY=VALUE"):
        _quantize(model_dir, tmp_path / "bad", "onnx", extra=["--export-option", "accuracy_level"])
    with pytest.raises(SystemExit, match="--export-option needs --format"):
        _quantize(model_dir, tmp_path / "bad", "lightning-quant", extra=["--export-option", "graph=logits"])
    assert not (tmp_path / "bad").exists()
