"""llm-compressor baseline for ``benchmarks/ptq_quality.py`` (GPTQ or AWQ), run in llm-compressor's own venv.

llm-compressor is never a dependency of lightning-quant: this script imports only torch,
transformers, safetensors, datasets, compressed-tensors and llmcompressor, so it runs with the
python of a separate virtual environment (``pip install llmcompressor``). ``ptq_quality.py
--llmcompressor-python PATH`` calls it once per (method, config); it can also be run by hand:

    /tmp/llmc/bin/python benchmarks/llmcompressor_baseline.py --model DIR --calibration calib.safetensors \\
        --method gptq --bits 4 --group-size 64 --out OUTDIR

Inputs: a float HF checkpoint directory and a ``.safetensors`` file holding int64 ``input_ids [N, T]``.
It runs ``oneshot`` with ``GPTQModifier`` (``method=gptq``) or ``AWQModifier`` followed by a
``QuantizationModifier`` (``method=awq``) on every ``Linear`` except ``lm_head``, timing only the
``oneshot`` call, and writes into ``--out``:

* ``weights.safetensors``: the model's *effective* float state dict — every quantized linear's
  dequantized weight ``W_hat = (clamp(round(W / scale) + zp) - zp) * scale`` computed from the
  ``weight_scale`` / ``weight_zero_point`` that oneshot attached (i.e. what its compressed checkpoint
  represents), every other tensor (e.g. norms rescaled by AWQ) as it is after oneshot;
* ``result.json``: wall time, peak resident memory during oneshot (Linux VmHWM), settings, versions, the quantized module names, and how far the
  in-memory ``weight`` was from ``W_hat`` (0 for GPTQ, which writes fake-quantized weights; the
  scaled float weight for AWQ + RTN, which fake-quantizes in ``forward``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peak_memory import peak_mb, reset_peak  # benchmarks/ is sys.path[0] when run as a script


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="float HF checkpoint directory")
    p.add_argument("--calibration", required=True, help=".safetensors with int64 input_ids [N, T]")
    p.add_argument("--method", choices=("gptq", "awq"), required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="-1 for per-channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point); default symmetric")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening_frac (fraction of mean diag H)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block size")
    p.add_argument("--n-grid", type=int, default=20, help="AWQ scale grid points")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args()


def _cpu_safe_cache() -> None:
    """AWQ pins cached activations for faster host-to-device copies; pinning needs an accelerator."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _recipe(args: argparse.Namespace):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if args.group_size == -1 else "group"
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym, strategy=strategy,
                               group_size=None if args.group_size == -1 else args.group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        # actorder=None: natural column order (ours: act_order=False)
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=args.damp,
                             block_size=args.block_size, actorder=None)]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    _cpu_safe_cache()
    return [AWQModifier(n_grid=args.n_grid), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


@torch.no_grad()
def _effective_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str], float]:
    """``({name: float tensor}, quantized module names, max |weight - W_hat|)`` after oneshot."""
    from compressed_tensors.quantization import fake_quantize

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    quantized, gap = [], 0.0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        if not hasattr(module, "weight_scale"):
            raise RuntimeError(f"{name} has a quantization scheme but no weight_scale after oneshot.")
        zp = getattr(module, "weight_zero_point", None)
        if zp is None:
            zp = torch.zeros_like(module.weight_scale)
        if getattr(module, "weight_g_idx", None) is not None and (module.weight_g_idx.diff() < 0).any():
            raise RuntimeError(f"{name} has an activation-order g_idx; this baseline expects natural order.")
        w = module.weight.detach().float()
        w_hat = fake_quantize(w, module.weight_scale.float(), zp, scheme.weights)
        gap = max(gap, (w - w_hat).abs().max().item())
        state[f"{name}.weight"] = w_hat.contiguous()
        quantized.append(name)
    if not quantized:
        raise RuntimeError("oneshot left no module with a quantization scheme; nothing was quantized.")
    # only the original parameter names: drop the qparams compressed-tensors registered
    extra = [k for k in state if k.rsplit(".", 1)[-1] in ("weight_scale", "weight_zero_point", "weight_g_idx",
                                                          "weight_global_scale")]
    for k in extra:
        del state[k]
    return state, quantized, gap


def main() -> None:
    # benchmarks/kernels.py would shadow the 'kernels' package transformers probes for
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    args = _parse()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.calibration)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise ValueError(f"{args.calibration}: input_ids must be int64 [N, T], got {ids.dtype} {tuple(ids.shape)}.")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = _recipe(args)
    reset_peak()
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=args.batch_size, shuffle_calibration_samples=False)
    wall, peak = time.perf_counter() - t0, peak_mb()
    state, quantized, gap = _effective_state(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "weights.safetensors"))
    result = {
        "method": args.method, "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
        "damp": args.damp, "block_size": args.block_size, "n_grid": args.n_grid, "batch_size": args.batch_size,
        "calibration": list(ids.shape), "wall_s": wall, "peak_rss_mb": peak, "threads": torch.get_num_threads(),
        "quantized": quantized, "max_abs_weight_minus_w_hat": gap,
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"llm-compressor {args.method}: {len(quantized)} linears, oneshot wall {wall:.1f}s, "
          f"max |weight - W_hat| {gap:.3g}", flush=True)


if __name__ == "__main__":
    main()
