"""PTQ quality and cost on SmolLM2-135M: float vs RTN vs GPTQ vs AWQ vs LLM.int8().

Prints a markdown table: held-out perplexity (WikiText-2 test from ../shared/data when present,
else held-out stdlib source), mean per-token KL to the float model, quantization wall time, and
peak resident memory while quantizing (Linux VmHWM, reset before each method).

    .venv/bin/python benchmarks/ptq_quality.py --num-samples 128 --seq-len 512        # the full run
    .venv/bin/python benchmarks/ptq_quality.py --num-samples 16 --seq-len 256 --eval-windows 8   # quick

Speed goal (issue 4): GPTQ on CPU at least 2x faster than llm-compressor's GPTQ on the same model
and data, with no worse perplexity. llm-compressor lives in its own venv; pass its python with
``--llmcompressor-python`` to add its rows (see docs/ptq.md), otherwise they are omitted:

    .venv/bin/python benchmarks/ptq_quality.py --methods rtn,gptq --configs w4g64,w4g64-asym \
        --llmcompressor-python /tmp/llmc/bin/python

For each of ``gptq`` / ``awq`` in ``--methods`` and each config, ``benchmarks/llmcompressor_baseline.py``
runs in that python on a float HF copy of the model and the same calibration tokens (both written
once under ``--work-dir``) with the same torch thread count, group size, symmetry, GPTQ dampening and
block size, and calibration batch size; its dequantized weights are loaded into a copy of the float
model, checked to lie on a b-bit grid per (row, group), and evaluated like our rows (``llmc-gptq``,
``llmc-awq``). The wall-time ratio llm-compressor / ours is printed per config.

``--methods`` also takes the issue-15 option rows of :data:`VARIANTS` (``rtn+mse``, ``gptq+orig``, ``gptq+mse``,
``gptq+hmse``, ``gptq+orig+mse``, ``gptq+static``, ``gptaq``, ``gptaq+static``): a registered method with one
option of its config set (``QParamSearch`` weight / Hessian objective, ``group_qparams="original"``, act-order
with static groups, the experimental GPTAQ),
and ``awq+gptq`` / ``awq+gptq+hmse`` (AWQ scales folded, then GPTQ). The rows of :data:`ROTATED` (``rtn+rot``,
``gptq+rot``, ``gptq+static+rot``, ``awq+gptq+rot``) run a row of :data:`VARIANTS` with ``quantize_model(..., rotation=Rotation())``:
the residual stream rotated offline by a randomised Hadamard first (QuaRot / SpinQuant R1, docs/ptq.md#rotations).

Goals (issue 5): AWQ perplexity at least as good as llm-compressor's AWQ on the same model and data;
LLM.int8 (``--methods ...,int8``: one row, weights are always row-wise int8, threshold 6.0)
perplexity change <= 0.5 % vs float.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import time
from pathlib import Path

import torch
from peak_memory import peak_mb, reset_peak
from torch import nn

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.awq import AWQConfig
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.algorithms.rtn import RTNConfig
from lightning_quant.data import stdlib_text, token_windows, wikitext2_path
from lightning_quant.evaluation import evaluate_against, reference_logits
from lightning_quant.methods.rotation import Rotation
from lightning_quant.models import load_causal_lm, load_tokenizer
from lightning_quant.spec import QParamSearch

CONFIGS = {
    "w4g64": QuantSpec(4, 64, symmetric=True),
    "w4g64-asym": QuantSpec(4, 64, symmetric=False),
    "w3g64-asym": QuantSpec(3, 64, symmetric=False),
    "w8ch": QuantSpec(8, -1, symmetric=True),
}


#: ``--methods`` rows: name -> (registered method, its config's options); GPTQ rows also take
#: ``--true-sequential`` / ``--act-order`` from the command line.
VARIANTS = {
    "rtn": ("rtn", None),
    "rtn+mse": ("rtn", {"qparam_search": QParamSearch()}),
    "gptq": ("gptq", {}),
    "gptq+orig": ("gptq", {"group_qparams": "original"}),
    "gptq+mse": ("gptq", {"qparam_search": QParamSearch()}),
    "gptq+hmse": ("gptq", {"qparam_search": QParamSearch(objective="hessian")}),
    "gptq+orig+mse": ("gptq", {"group_qparams": "original", "qparam_search": QParamSearch()}),
    "gptq+static": ("gptq", {"act_order": True, "static_groups": True}),
    "gptaq": ("gptq", {"gptaq": True}),
    "gptaq+static": ("gptq", {"gptaq": True, "act_order": True, "static_groups": True}),
    "awq": ("awq", None),
    "awq+gptq": ("awq+gptq", {"awq": AWQConfig()}),
    "awq+gptq+hmse": ("awq+gptq", {"awq": AWQConfig(), "qparam_search": QParamSearch(objective="hessian")}),
}


#: ``--methods`` rows that rotate first: name -> (the :data:`VARIANTS` row, the rotation).
ROTATED = {
    "rtn+rot": ("rtn", Rotation("hadamard", seed=0)),
    "gptq+rot": ("gptq", Rotation("hadamard", seed=0)),
    "gptq+static+rot": ("gptq+static", Rotation("hadamard", seed=0)),
    "awq+gptq+rot": ("awq+gptq", Rotation("hadamard", seed=0)),
}


def row_rotation(name: str) -> Rotation | None:
    """The rotation of a ``--methods`` row (``None``: not rotated)."""
    return ROTATED[name][1] if name in ROTATED else None


def variant_config(name: str, gptq_base: GPTQConfig):
    """``(registered method, config)`` of a ``--methods`` row."""
    name = ROTATED[name][0] if name in ROTATED else name
    if name not in VARIANTS:
        raise SystemExit(f"unknown --methods entry {name!r}; use int8 or one of {sorted([*VARIANTS, *ROTATED])}.")
    method, opts = VARIANTS[name]
    if method in ("gptq", "awq+gptq"):
        return method, dataclasses.replace(gptq_base, **opts)
    if method == "rtn":
        return method, None if opts is None else RTNConfig(**opts)
    return method, None


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
    from lightning_quant.api import convert_to_int8

    q = copy.deepcopy(model)
    reset_peak()
    t0 = time.perf_counter()
    convert_to_int8(q, threshold=6.0)
    wall, peak = time.perf_counter() - t0, peak_mb()
    r = evaluate_against(q, ref, held)
    print(f"done int8 (threshold 6.0): ppl={r['ppl']:.3f} kl={r['kl']:.4f} time={wall:.1f}s", flush=True)
    return ("int8", "row-wise W8, t=6.0", r["ppl"], r["kl"], wall, peak)


# ---- llm-compressor baseline (its own venv, a subprocess) ------------------------------------------
BASELINE = Path(__file__).with_name("llmcompressor_baseline.py")


def check_on_grid(w: torch.Tensor, bits: int, group_size: int, name: str = "weight") -> None:
    """Raise ``ValueError`` unless every (row, group) of ``w [out, in]`` holds at most ``2**bits`` distinct values.

    A necessary condition for ``w`` being the dequantization of ``bits``-bit codes with one
    (scale, zero point) per group; ``group_size=-1`` means one group per row.
    """
    g = w.shape[1] if group_size == -1 else group_size
    if w.dim() != 2 or w.shape[1] % g:
        raise ValueError(f"{name}: shape {tuple(w.shape)} is not [out, in] with in divisible by group size {g}.")
    v = w.detach().reshape(w.shape[0], w.shape[1] // g, g).sort(-1).values  # [out, in] -> [out, groups, g]
    distinct = (v[..., 1:] != v[..., :-1]).sum(-1) + 1  # [out, groups]
    worst = int(distinct.max())
    if worst > 2**bits:
        row, grp = divmod(int(distinct.argmax()), distinct.shape[1])
        raise ValueError(f"{name}: (row {row}, group {grp}) holds {worst} distinct values, more than 2**{bits}; "
                         "these weights are not on a per-group quantization grid.")


def write_float_checkpoint(model: nn.Module, tokenizer, directory: Path, probe: torch.Tensor) -> None:
    """Save ``model`` as a plain float HF checkpoint (no GGUF quantizer attached) and verify the reload.

    The GGUF-loaded model refuses ``save_pretrained``, so a fresh model is built from its config
    (without ``quantization_config``) and given the same state dict. Raises when the reloaded
    model's logits on ``probe [B, T]`` differ from ``model``'s.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        a, b = model(probe).logits, reloaded(probe).logits
    if not torch.equal(a, b):
        raise RuntimeError(f"float checkpoint {directory} reloads with different logits "
                           f"(max |diff| {(a - b).abs().max().item():.3g}).")


def llmc_row(args, model, ref, held, method: str, cfg_name: str, spec: QuantSpec, calib_file: Path,
             model_dir: Path, method_cfg) -> tuple:
    """Run the llm-compressor baseline for one (method, config) and evaluate its weights like ours."""
    from safetensors.torch import load_file

    from lightning_quant.targets import select_linears

    out = Path(args.work_dir) / f"llmc-{method}-{cfg_name}"
    cmd = [args.llmcompressor_python, str(BASELINE), "--model", str(model_dir), "--calibration", str(calib_file),
           "--method", method, "--bits", str(spec.bits), "--group-size", str(spec.group_size),
           "--batch-size", str(method_cfg.batch_size), "--threads", str(torch.get_num_threads()), "--out", str(out)]
    if not spec.symmetric:
        cmd.append("--asym")
    if method == "gptq":
        cmd += ["--damp", str(method_cfg.damp_percent), "--block-size", str(method_cfg.block_size)]
    else:
        cmd += ["--n-grid", str(method_cfg.n_grid)]
    subprocess.run(cmd, check=True, cwd=args.work_dir)
    result = json.loads((out / "result.json").read_text())
    q = copy.deepcopy(model)
    q.load_state_dict(load_file(str(out / "weights.safetensors")), strict=True)
    targets = set(select_linears(q))
    if set(result["quantized"]) != targets:
        raise RuntimeError(f"llm-compressor quantized {sorted(set(result['quantized']) ^ targets)[:5]} "
                           "differently from our target linears.")
    for name in sorted(targets):
        check_on_grid(q.get_submodule(name).weight, spec.bits, spec.group_size, name)
    r = evaluate_against(q, ref, held)
    print(f"done llmc-{method} {cfg_name}: ppl={r['ppl']:.3f} kl={r['kl']:.4f} time={result['wall_s']:.1f}s",
          flush=True)
    return (f"llmc-{method}", cfg_name, r["ppl"], r["kl"], result["wall_s"], result["peak_rss_mb"])


def _llmc_inputs(args, model, tok, calib: torch.Tensor, held: torch.Tensor) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, calib_file = work / "float-hf", work / "calibration.safetensors"
    write_float_checkpoint(model, tok, model_dir, held[:1])
    save_file({"input_ids": calib.to(torch.int64).contiguous()}, str(calib_file))
    return model_dir, calib_file


def _print_ratios(rows: list[tuple]) -> None:
    walls = {(m, c): w for m, c, _, _, w, _ in rows}
    for (m, c), w in walls.items():
        if m.startswith("llmc-") and (m[5:], c) in walls:
            ours = walls[(m[5:], c)]
            print(f"wall time llm-compressor / ours, {m[5:]} {c}: {w:.1f} s / {ours:.1f} s = {w / ours:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--methods", default="rtn,gptq,awq,int8",
                   help=f"comma list of {sorted([*VARIANTS, *ROTATED])} or int8 (one row)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--true-sequential", action="store_true", help="GPTQ true-sequential groups inside blocks")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--llmcompressor-python", default=None,
                   help="python of a venv with llmcompressor: adds llmc-gptq / llmc-awq rows for gptq / awq in --methods")
    p.add_argument("--work-dir", default="/tmp/lq_llmc_baseline",
                   help="float HF copy, calibration tokens and llm-compressor outputs")
    args = p.parse_args()
    for m in args.methods.split(","):  # unknown names fail before the model loads
        if m != "int8":
            variant_config(m, GPTQConfig())
    model, tok = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    held_name, held, calib = _texts(tok, args)
    ref = reference_logits(model, held)
    base = evaluate_against(model, ref, held)
    rows = [("float", "-", base["ppl"], base["kl"], 0.0, float("nan"))]
    cfg = GPTQConfig(true_sequential=args.true_sequential, act_order=args.act_order)
    methods = args.methods.split(",")
    llmc_methods = [m for m in ("gptq", "awq") if m in methods] if args.llmcompressor_python else []
    if llmc_methods and (args.act_order or args.true_sequential):
        raise SystemExit("the llm-compressor comparison runs without act-order and with all linears of a block "
                         "at once; drop --act-order / --true-sequential.")
    llmc_inputs = _llmc_inputs(args, model, tok, calib, held) if llmc_methods else None
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        for method in args.methods.split(","):
            if method == "int8":  # independent of the weight config: one row after the loop
                continue
            registered, method_cfg = variant_config(method, cfg)
            q = copy.deepcopy(model)
            reset_peak()
            t0 = time.perf_counter()
            quantize_model(q, spec, registered, calibration=calib if registered != "rtn" else None, config=method_cfg,
                           rotation=row_rotation(method))
            wall = time.perf_counter() - t0
            peak = peak_mb()
            r = evaluate_against(q, ref, held)
            rows.append((method, name, r["ppl"], r["kl"], wall, peak))
            print(f"done {method} {name}: ppl={r['ppl']:.3f} kl={r['kl']:.4f} time={wall:.1f}s", flush=True)
            del q
        for method in llmc_methods:
            rows.append(llmc_row(args, model, ref, held, method, name, spec, llmc_inputs[1], llmc_inputs[0],
                                 cfg if method == "gptq" else AWQConfig()))
    if "int8" in args.methods.split(","):
        rows.append(_int8_row(model, ref, held))
    print(f"\nSmolLM2-135M, held-out: {held_name}, {held.shape[0]} x {args.seq_len} tokens; calibration: "
          f"{args.num_samples} x {args.seq_len} tokens; GPTQ {cfg}; torch threads {torch.get_num_threads()}\n")
    if llmc_methods:
        print("llmc-* rows: llm-compressor in its own process (wall = the oneshot call; peak RSS = that process's "
              "peak during oneshot)\n")
    print("| method | config | ppl | KL to float | quantize wall (s) | peak RSS while quantizing (MB) |")
    print("|---|---|---|---|---|---|")
    for m, c, ppl, kl, wall, peak in rows:
        print(f"| {m} | {c} | {ppl:.3f} | {kl:.4f} | {wall:.1f} | {peak:.0f} |")
    _print_ratios(rows)


if __name__ == "__main__":
    main()
