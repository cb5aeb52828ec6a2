"""QAT-LoRA fine-tuning of SmolLM2-135M on Python source, compared with RTN and GPTQ.

    python examples/qat_lora_finetune.py               # what `make demo` runs (2-core CPU: ~10-15 min)
    python examples/qat_lora_finetune.py --model DIR   # any local HF model directory or .gguf file

Steps: (1) float baseline on held-out standard-library files; (2) RTN and (3) GPTQ of the float
model at the same spec; (4) LoRA fine-tuning under fake quant of the merged weight (QAT,
``lora="merged"``), validated on the packed model (PackedValidation), converted to packed layers,
exported in GPTQ format, with a quantization report and a W&B run (offline unless WANDB_API_KEY
is set). Ends with a table of held-out perplexity, KL to the float model and model size.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.callbacks import PackedValidation, QuantizationAwareTraining, QuantizationReport
from lightning_quant.evaluation import evaluate_against, reference_logits
from lightning_quant.lit import CausalLM, StdlibText, build_model
from lightning_quant.report import model_bytes


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', an HF model directory, a .gguf file, or tiny-llama")
    ap.add_argument("--steps", type=int, default=40, help="QAT-LoRA optimizer steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows for perplexity / KL")
    ap.add_argument("--calib-windows", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    if args.model not in ("smollm2", "tiny-llama") and not Path(args.model).exists():
        ap.error(f"--model {args.model!r}: no such path; pass 'smollm2', an HF model directory or a .gguf file")
    return args


def evaluate(name, model, ref, windows, rows, seconds=0.0):
    r = evaluate_against(model, ref, windows)
    rows.append((name, r["ppl"], r["kl"], model_bytes(model) / 2**20, seconds))
    print(f"  {name}: ppl={r['ppl']:.3f} kl={r['kl']:.4f}", flush=True)


def qat_lora(args, spec, data, out: Path):
    module = CausalLM.from_model(build_model(args.model), lr=args.lr, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    offline = not os.environ.get("WANDB_API_KEY")
    wandb_logger = WandbLogger(project="lightning-quant-demo", save_dir=str(out), offline=offline)
    trainer = pl.Trainer(
        max_steps=args.steps, val_check_interval=max(args.steps // 2, 1), limit_val_batches=2, num_sanity_val_steps=0,
        logger=[wandb_logger, CSVLogger(out)], default_root_dir=out, enable_checkpointing=False, log_every_n_steps=5,
        callbacks=[
            QuantizationAwareTraining(spec, lora="merged",
                                      export_on_fit_end={"format": "gptq", "path": str(out / "export"), "overwrite": True}),
            PackedValidation(),
            QuantizationReport(output_dir=str(out / "report"), num_batches=2),
        ],
    )
    trainer.fit(module, data)
    return module.model, wandb_logger


def main(argv: list[str] | None = None) -> list[tuple]:
    args = parse(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    spec = QuantSpec(args.bits, args.group_size)
    tokenizer = "bytes" if args.model.startswith("tiny") else args.model
    data = StdlibText(tokenizer, args.seq_len, args.batch_size, train_windows=max(args.steps * args.batch_size, args.calib_windows),
                      val_windows=args.eval_windows)
    data.setup()
    windows = data.val_ids
    print(f"[1/4] float baseline: {args.model}, held-out {tuple(windows.shape)} tokens", flush=True)
    base = build_model(args.model)
    ref = reference_logits(base, windows)
    rows: list[tuple] = []
    evaluate("float", base, ref, windows, rows)
    for i, (name, method, calib, cfg) in enumerate([("RTN", "rtn", None, None),
                                                     ("GPTQ", "gptq", data.train_ids[: args.calib_windows], GPTQConfig(progress=True))]):
        print(f"[{i + 2}/4] {name} {spec}", flush=True)
        q, t = copy.deepcopy(base), time.perf_counter()
        quantize_model(q, spec, method, calibration=calib, config=cfg)
        evaluate(f"{name} {spec}", q, ref, windows, rows, time.perf_counter() - t)
        del q
    print(f"[4/4] QAT-LoRA (merged) {spec}, {args.steps} steps", flush=True)
    t = time.perf_counter()
    qat_model, wandb_logger = qat_lora(args, spec, data, out)
    evaluate(f"QAT-LoRA {spec} (packed)", qat_model.eval(), ref, windows, rows, time.perf_counter() - t)
    print("\n| model | held-out ppl | KL to float | size (MiB) | time (s) |\n|---|---|---|---|---|")
    for name, ppl, kl, mb, secs in rows:
        print(f"| {name} | {ppl:.3f} | {kl:.4f} | {mb:.1f} | {secs:.0f} |")
    print(f"\nreport: {out / 'report' / 'report.md'}\nexport (GPTQ format): {out / 'export'}\n"
          f"W&B run: {wandb_logger.experiment.dir if wandb_logger.experiment else out}")
    wandb_logger.experiment.finish()
    return rows


if __name__ == "__main__":
    main()
