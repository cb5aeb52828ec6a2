"""QAT benchmarks (figures, not tests).

1. ``overhead``: training-step time (forward + backward + AdamW step) with QAT weight-only (W4 g128) and
   W4A8 vs. the same model without QAT, same precision (float32 on CPU, bf16 autocast on CUDA). Goal on
   GPU: ratio <= 1.2x.
2. ``lora``: on SmolLM2-135M, how much of the RTN-vs-float gap a short QAT-LoRA run (merged mode,
   observer selectable, distillation from the float model on standard-library training text) recovers, measured on
   held-out text as perplexity and mean per-token KL to the float model, *after* conversion to packed
   layers. Goal: >= 70 % of the perplexity gap.

    python benchmarks/qat_overhead.py --part overhead --model smollm2 --steps 5
    python benchmarks/qat_overhead.py --part lora --steps 150
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lightning_quant import qat
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.api import swap_in_packed
from lightning_quant.data import stdlib_text, token_windows
from lightning_quant.evaluation import evaluate_against, reference_logits
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import linear_weight, select_linears

SPEC = QuantSpec(bits=4, group_size=128)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(name: str):
    if name == "tiny":
        from lightning_quant.testing import tiny_llama

        return tiny_llama(hidden=256, layers=4), 256
    from lightning_quant.models import load_causal_lm

    model = load_causal_lm("smollm2")
    return model, model.config.vocab_size


def _step_time(model, ids, steps: int, device: str) -> float:
    """Median seconds of one forward + backward + AdamW step on ``ids [B, T]``."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(steps + 1):  # the first step warms up (allocations, autotuning)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def overhead(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, vocab = _model(args.model)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for label, act in [("float", None), ("qat-w4", "none"), ("qat-w4a8", ActivationSpec())]:
        model = copy.deepcopy(base).to(device)
        if label != "float":
            qat.inject(model, SPEC, None if act == "none" else act, observer=args.observer)
        results[label] = _step_time(model, ids, args.steps, device)
        del model
    print(f"device={device} model={args.model} batch={args.batch}x{args.seq_len} observer={args.observer} "
          f"precision={'bf16-mixed' if device == 'cuda' else '32-true'} steps={args.steps} (median)")
    for label, t in results.items():
        print(f"  {label:9s} step {t * 1000:8.1f} ms   ratio vs float {t / results['float']:.3f}x")


def _rtn_model(model):
    rtn = copy.deepcopy(model)
    weights = {n: rtn_quantize(linear_weight(m).detach(), SPEC, name=n) for n, m in select_linears(rtn).items()}
    swap_in_packed(rtn, weights)
    return rtn


def _qat_lora(model, train_windows, steps: int, lr: float, batch: int, observer: str):
    import peft

    student = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0))
    qat.inject(student, SPEC, observer=observer, lora="merged")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    student.train()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        ids = train_windows[torch.randint(0, train_windows.shape[0], (batch,), generator=g)]
        with torch.no_grad():
            teacher = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        student_lp = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
        loss = (teacher.exp() * (teacher - student_lp)).sum(-1).mean()  # KL(float || QAT), per token
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:4d}  distillation KL {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    student.eval()
    qat.convert(student)  # merged LoRA + learned scales -> packed layers
    return student


def lora(args) -> None:
    from lightning_quant.models import load_tokenizer

    torch.manual_seed(0)
    model, _ = _model("smollm2")
    tok = load_tokenizer("smollm2")
    heldout = token_windows(tok(stdlib_text(200_000, split="heldout"), return_tensors="pt").input_ids, 256, 8)
    train = token_windows(tok(stdlib_text(1_000_000, split="train"), return_tensors="pt").input_ids, args.seq_len)
    ref = reference_logits(model, heldout)
    t0 = time.perf_counter()
    res = {"float": evaluate_against(model, ref, heldout), "rtn": evaluate_against(_rtn_model(model), ref, heldout)}
    print(f"  float {res['float']}  rtn {res['rtn']}", flush=True)
    student = _qat_lora(model, train, args.steps, args.lr, args.batch, args.lora_observer)
    res["qat-lora"] = evaluate_against(student, ref, heldout)
    print(f"SmolLM2-135M, {SPEC}, QAT-LoRA r=16 merged, observer={args.lora_observer}, {args.steps} steps x "
          f"{args.batch}x{args.seq_len} "
          f"tokens, lr={args.lr}; held-out: 8 x 256 stdlib tokens ({time.perf_counter() - t0:.0f} s)")
    for k, v in res.items():
        print(f"  {k:9s} ppl {v['ppl']:.4f}   KL {v['kl']:.5f}")
    gap_ppl = res["rtn"]["ppl"] - res["float"]["ppl"]
    gap_kl = res["rtn"]["kl"] - res["float"]["kl"]
    print(f"  recovered: {100 * (res['rtn']['ppl'] - res['qat-lora']['ppl']) / gap_ppl:.1f} % of the perplexity gap, "
          f"{100 * (res['rtn']['kl'] - res['qat-lora']['kl']) / gap_kl:.1f} % of the KL gap (goal >= 70 %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["overhead", "lora", "all"], default="all")
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2", help="model for --part overhead")
    ap.add_argument("--observer", default="minmax", help="observer for --part overhead")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-observer", default="minmax", help="observer for --part lora")
    args = ap.parse_args()
    if args.part in ("overhead", "all"):
        overhead(args)
    if args.part in ("lora", "all"):
        lora(args)


if __name__ == "__main__":
    main()
