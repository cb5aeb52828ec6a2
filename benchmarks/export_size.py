"""Export sizes (figures, not tests): packed checkpoints vs. the float16 checkpoint.

For a model dominated by linear layers (a Llama with small vocab, hidden 1024) and, with
``--model smollm2``, the real SmolLM2-135M (whose 49k x 576 embedding is ~28 % of its weights, so its
ratio is bounded below by that), quantize every linear but ``lm_head`` with RTN W4 g128, export each
format with float16 non-quantized tensors, and print the ``.safetensors`` / ``.onnx`` size and the
ratio to ``model.half()`` saved as safetensors. Goal (linear-dominated model): W4 g128 <= 0.28.

    python benchmarks/export_size.py
    python benchmarks/export_size.py --model smollm2 --group-size 64
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_quant import QuantSpec, export, quantize_model


def linear_dominated_llama(hidden: int = 1024, layers: int = 4) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def dir_bytes(path: Path, suffixes=(".safetensors", ".onnx")) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in suffixes)


def float16_bytes(model: torch.nn.Module, out: Path) -> int:
    from safetensors.torch import save_model

    nn.Module.half(model)  # the base-class cast (transformers refuses .half() on GGUF-loaded models)
    save_model(model, str(out / "fp16.safetensors"))  # dedupes tied weights
    nn.Module.float(model)
    return (out / "fp16.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="linear-llama", choices=["linear-llama", "smollm2"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--formats", nargs="+", default=["gptq", "awq", "compressed-tensors", "onnx"])
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.model == "smollm2":
        from lightning_quant.models import load_causal_lm

        model = load_causal_lm("smollm2")
    else:
        model = linear_dominated_llama()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp16 = float16_bytes(model, tmp)
        quantize_model(model, QuantSpec(bits=4, group_size=args.group_size))
        print(f"model={args.model}  float16 checkpoint: {fp16 / 1e6:.2f} MB")
        for fmt in args.formats:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if fmt == "onnx":
                        export.save(nn.Module.half(model), tmp / fmt, fmt)
                        nn.Module.float(model)
                    else:
                        export.save(model, tmp / fmt, fmt, dtype=torch.float16)
            except ValueError as e:
                print(f"  {fmt:20s} not writable: {e}")
                continue
            size = dir_bytes(tmp / fmt)
            print(f"  {fmt:20s} {size / 1e6:8.2f} MB   ratio to float16: {size / fp16:.3f}")


if __name__ == "__main__":
    main()
