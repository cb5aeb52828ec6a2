"""``make demo``: quantize the embedded SmolLM2-135M and compare held-out quality.

Prints float vs RTN perplexity and KL on held-out standard-library source code.
(The full QAT-LoRA demo replaces this when the examples land.)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.data import stdlib_text, token_windows
from lightning_quant.evaluation import evaluate_against, reference_logits
from lightning_quant.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2', a local HF model directory or a .gguf file")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    ids = tok(stdlib_text(400_000, split="heldout"), return_tensors="pt").input_ids
    windows = token_windows(ids, args.seq_len, args.windows)
    ref = reference_logits(model, windows)
    rows = [("float", evaluate_against(model, ref, windows), 0.0)]
    for spec in (QuantSpec(8, -1), QuantSpec(4, 64), QuantSpec(4, 64, symmetric=False)):
        q = copy.deepcopy(model)
        t = time.perf_counter()
        quantize_model(q, spec, "rtn")
        rows.append((f"RTN {spec}", evaluate_against(q, ref, windows), time.perf_counter() - t))
    print(f"\nHeld-out stdlib source, {windows.shape[0]} windows x {args.seq_len} tokens")
    print("| model | perplexity | KL to float | time (s) |\n|---|---|---|---|")
    for name, r, secs in rows:
        print(f"| {name} | {r['ppl']:.3f} | {r['kl']:.5f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
