"""PTQ quality and cost on SmolLM2-135M: float vs RTN vs GPTQ vs AWQ vs LLM.int8().

Prints a markdown table: held-out perplexity (WikiText-2 test from ../shared/data when present,
else held-out stdlib source), mean per-token KL to the float model, quantization wall time, and
peak resident memory while quantizing (Linux VmHWM, reset before each method).

    .venv/bin/python benchmarks/ptq_quality.py --num-samples 128 --seq-len 512        # the full run
    .venv/bin/python benchmarks/ptq_quality.py --num-samples 16 --seq-len 256 --eval-windows 8   # quick

Speed goal (issue 4): GPTQ on CPU at least 2x faster than llm-compressor's GPTQ on the same model
and data, with no worse perplexity. llm-compressor lives in its own venv; pass its python with
``--llmcompressor-python`` to add its row (see docs/ptq.md), otherwise the row is omitted.

Goals (issue 5): AWQ perplexity at least as good as llm-compressor's AWQ on the same model and data;
LLM.int8 (``--methods ...,int8``: one row, weights are always row-wise int8, threshold 6.0)
perplexity change <= 0.5 % vs float.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.data import stdlib_text, token_windows, wikitext2_path
from lightning_quant.evaluation import evaluate_against, reference_logits
from lightning_quant.models import load_causal_lm, load_tokenizer

CONFIGS = {
    "w4g64": QuantSpec(4, 64, symmetric=True),
    "w4g64-asym": QuantSpec(4, 64, symmetric=False),
    "w3g64-asym": QuantSpec(3, 64, symmetric=False),
    "w8ch": QuantSpec(8, -1, symmetric=True),
}


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _texts(tokenizer, args):
    wt = wikitext2_path("test")
    held_text = wt.read_text(encoding="utf-8") if wt is not None else stdlib_text(400_000, split="heldout")
    held_name = "WikiText-2 test" if wt is not None else "stdlib held-out"
    wt_train = wikitext2_path("valid")
    cal_text = wt_train.read_text(encoding="utf-8") if wt is not None and wt_train else stdlib_text(2_000_000)
    held = token_windows(tokenizer(held_text, return_tensors="pt").input_ids, args.seq_len, args.eval_windows)
    calib = token_windows(tokenizer(cal_text, return_tensors="pt").input_ids, args.seq_len, args.num_samples)
    if calib.shape[0] < args.num_samples:
        raise SystemExit(f"only {calib.shape[0]} calibration windows of {args.seq_len} tokens available.")
    return held_name, held, calib


def _int8_row(model, ref, held) -> tuple:
    from lightning_quant.algorithms.llm_int8_method import convert_to_int8

    q = copy.deepcopy(model)
    _reset_peak()
    t0 = time.perf_counter()
    convert_to_int8(q, threshold=6.0)
    wall, peak = time.perf_counter() - t0, _peak_mb()
    r = evaluate_against(q, ref, held)
    print(f"done int8 (threshold 6.0): ppl={r['ppl']:.3f} kl={r['kl']:.4f} time={wall:.1f}s", flush=True)
    return ("int8", "row-wise W8, t=6.0", r["ppl"], r["kl"], wall, peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--methods", default="rtn,gptq,awq,int8", help="registered methods; int8 gives one row")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--true-sequential", action="store_true", help="GPTQ true-sequential groups inside blocks")
    p.add_argument("--act-order", action="store_true")
    args = p.parse_args()
    model, tok = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    held_name, held, calib = _texts(tok, args)
    ref = reference_logits(model, held)
    base = evaluate_against(model, ref, held)
    rows = [("float", "-", base["ppl"], base["kl"], 0.0, float("nan"))]
    cfg = GPTQConfig(true_sequential=args.true_sequential, act_order=args.act_order)
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        for method in args.methods.split(","):
            if method == "int8":  # independent of the weight config: one row after the loop
                continue
            q = copy.deepcopy(model)
            _reset_peak()
            t0 = time.perf_counter()
            quantize_model(q, spec, method, calibration=calib if method != "rtn" else None,
                           config=cfg if method == "gptq" else None)
            wall = time.perf_counter() - t0
            peak = _peak_mb()
            r = evaluate_against(q, ref, held)
            rows.append((method, name, r["ppl"], r["kl"], wall, peak))
            print(f"done {method} {name}: ppl={r['ppl']:.3f} kl={r['kl']:.4f} time={wall:.1f}s", flush=True)
            del q
    if "int8" in args.methods.split(","):
        rows.append(_int8_row(model, ref, held))
    print(f"\nSmolLM2-135M, held-out: {held_name}, {held.shape[0]} x {args.seq_len} tokens; calibration: "
          f"{args.num_samples} x {args.seq_len} tokens; GPTQ {cfg}; torch threads {torch.get_num_threads()}\n")
    print("| method | config | ppl | KL to float | quantize wall (s) | peak RSS while quantizing (MB) |")
    print("|---|---|---|---|---|---|")
    for m, c, ppl, kl, wall, peak in rows:
        print(f"| {m} | {c} | {ppl:.3f} | {kl:.4f} | {wall:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
