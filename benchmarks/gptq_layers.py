"""Per-layer GPTQ comparison on real SmolLM2-135M Hessians (issue 15's defect hunt).

Captures ``H = 2 XᵀX / n`` of every linear in the chosen blocks from the float model on WikiText-2 valid
windows, then for each spec reports, averaged over the layers, each solver's output error
``tr(D H Dᵀ)/2`` relative to RTN's: ours (``gptq_quantize``) with its options, and the independent dense
float64 Algorithm 1 of ``tests/algorithms/reference_gptq.py`` with group qparams from the updated or the
original weight. Agreement of ours with the reference on the asymmetric specs rules the solver in or out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gptq_layers.py --blocks 8,22 --num-samples 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference lives in the test suite

from lightning_quant.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, output_error
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.data import token_windows, wikitext2_path
from lightning_quant.models import load_causal_lm, load_tokenizer
from lightning_quant.spec import QParamSearch, QuantSpec
from lightning_quant.targets import linear_weight, select_linears
from tests.algorithms.reference_gptq import reference_gptq

SPECS = {"w4g64": QuantSpec(4, 64), "w4g64-asym": QuantSpec(4, 64, symmetric=False),
         "w3g64-asym": QuantSpec(3, 64, symmetric=False)}


def solvers(sp: QuantSpec):
    """name -> (weight, hessian) -> dequantized weight."""
    def ours(**kw):
        return lambda w, h: gptq_quantize(w, h, sp, GPTQConfig(**kw)).dequantized

    return {
        "ours": ours(),
        "ref-updated": lambda w, h: reference_gptq(w, h, sp.bits, sp.group_size, sp.symmetric).float(),
        "ref-original": lambda w, h: reference_gptq(w, h, sp.bits, sp.group_size, sp.symmetric,
                                                    qparams="original").float(),
        "ours-original": ours(group_qparams="original"),
        "ours-scale-fp32": lambda w, h: gptq_quantize(w, h, QuantSpec(sp.bits, sp.group_size, sp.symmetric, "float32")
                                                      ).dequantized,
        "ours-damp0.1": ours(damp_percent=0.1),
        "ours+mse": ours(qparam_search=QParamSearch()),
        "ours+hmse": ours(qparam_search=QParamSearch(objective="hessian")),
        "rtn+mse": lambda w, h: rtn_quantize(w, sp, search=QParamSearch()).dequantize(),
    }


def capture(blocks: list[int], n: int, seq_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model, tok = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    path = wikitext2_path("valid")
    if path is None:
        raise SystemExit("WikiText-2 valid not found under ../shared/data; see lightning_quant.data.wikitext2_path.")
    ids = token_windows(tok(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids, seq_len, n)
    targets = {k: m for k, m in select_linears(model).items() if any(f"layers.{b}." in k for b in blocks)}
    acc = {k: HessianAccumulator(linear_weight(m).shape[1], name=k) for k, m in targets.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, a, k=k: acc[k].add(a[0])) for k, m in targets.items()]
    with torch.no_grad():
        for batch in ids.split(2):
            model(batch)
    for h in hooks:
        h.remove()
    return {k: (linear_weight(m).detach().float(), acc[k].hessian()) for k, m in targets.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", default="8,22")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--configs", default=",".join(SPECS))
    p.add_argument("--solvers", default=",".join(solvers(QuantSpec())))
    args = p.parse_args()
    layers = capture([int(b) for b in args.blocks.split(",")], args.num_samples, args.seq_len)
    names = args.solvers.split(",")
    print(f"\n{len(layers)} linears of blocks {args.blocks}, H from {args.num_samples} x {args.seq_len} WikiText-2 "
          "valid tokens; mean over layers of tr(D H D^T) / RTN's, and seconds\n")
    print("| config | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for cfg in args.configs.split(","):
        sp = SPECS[cfg]
        fns = solvers(sp)
        ratio, secs = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for w, h in layers.values():
            rtn = output_error(w, rtn_quantize(w, sp).dequantize(), h)
            for k in names:
                t0 = time.perf_counter()
                dq = fns[k](w, h)
                secs[k] += time.perf_counter() - t0
                ratio[k] += output_error(w, dq, h) / rtn / len(layers)
        print(f"| {cfg} | " + " | ".join(f"{ratio[k]:.4f} ({secs[k]:.0f} s)" for k in names) + " |", flush=True)


if __name__ == "__main__":
    main()
