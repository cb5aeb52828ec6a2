"""Edge serving of SmolLM2-135M quantized W4 g64 with GPTQ: decode speed, perplexity and size per engine.

Rows: transformers float32 ``generate`` (the baseline); our ONNX export through onnxruntime-genai at
``accuracy_level`` 0 (float compute) and 4 (int8 compute); the in-memory packed model (our own
perplexity). Engines from other modules add rows: ``benchmarks/edge_gguf.py`` (llama.cpp), when present,
provides ``rows(ctx: edge_common.EdgeContext) -> list[edge_common.Row]``.

Decode: a ``--prompt-len``-token WikiText-2 test prompt, then ``--new-tokens`` greedy tokens (end of
sequence ignored); tokens/s counts the tokens after the first one (prefill excluded). Perplexity:
``--eval-windows`` non-overlapping ``--seq-len`` windows of WikiText-2 test, each engine's logits
through the same torchmetrics Perplexity (onnxruntime runs the exported graph with an empty cache).

    /work/main/.venv/bin/python benchmarks/edge.py --threads 2 --num-samples 16 --eval-windows 8
    /work/main/.venv/bin/python benchmarks/edge.py --threads 1 --speed-only   # decode rows again, reusing the exports

``--speed-only`` skips GPTQ and perplexity and times the exports a previous run left in ``--work-dir``
(a second reading of the speeds, e.g. with another thread count on a machine under other load).

Goals (issue 16): onnxruntime-genai int4 decode >= 2x transformers float32; every engine's perplexity
within 0.5 % of our own figure for the same quantized model.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from pathlib import Path

import torch
from edge_common import EdgeContext, Row, decode_rate, dir_size, now, print_table

from lightning_quant import QuantSpec, export, quantize_model
from lightning_quant.data import token_windows, wikitext2_path
from lightning_quant.evaluation import perplexity
from lightning_quant.models import load_causal_lm, load_tokenizer


def _texts(tokenizer, args):
    test, valid = wikitext2_path("test"), wikitext2_path("valid")
    if test is None or valid is None:
        raise SystemExit("WikiText-2 not found (../shared/data/wikitext-2); the edge benchmark reports its perplexity.")
    ids = tokenizer(test.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    windows = token_windows(ids, args.seq_len, args.eval_windows)
    prompt = ids[:, 1_000:1_000 + args.prompt_len]  # past the first headings: running text
    calib = token_windows(tokenizer(valid.read_text(encoding="utf-8"), return_tensors="pt").input_ids, args.seq_len,
                          args.num_samples)
    return prompt, windows, calib


def _transformers_row(model, ctx: EdgeContext, name: str) -> Row:
    stamps: list[float] = []

    class Stamp:  # a logits processor is called once per generated token, right after its forward
        def __call__(self, input_ids, scores):
            stamps.append(now())
            return scores

    from transformers import LogitsProcessorList

    with torch.no_grad():
        model.generate(ctx.prompt[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        stamps.clear()
        start = now()
        out = model.generate(ctx.prompt, max_new_tokens=ctx.new_tokens, min_new_tokens=ctx.new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=ctx.tokenizer.eos_token_id)
    rate, prefill = decode_rate(stamps, start)
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return Row(name, "float32", rate, prefill, None, size, out[0, ctx.prompt.shape[1]:].tolist())


def _genai_row(directory: Path, ctx: EdgeContext, level: int, with_ppl: bool = True) -> Row:
    import onnxruntime_genai as og

    cfg = og.Config(str(directory))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": ctx.threads}}}}))
    model = og.Model(cfg)
    prompt = ctx.prompt[0].tolist()
    total = len(prompt) + ctx.new_tokens

    def run():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        stamps, start = [], now()
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(now())
        return stamps, start, [int(t) for t in gen.get_sequence(0)][len(prompt):]

    run()  # warm-up (weight prepacking happens at session creation; this warms caches and allocators)
    stamps, start, tokens = run()
    rate, prefill = decode_rate(stamps, start)
    from lightning_quant.export.onnx import OnnxCausalLM

    ppl = perplexity(OnnxCausalLM(directory, threads=ctx.threads), ctx.windows) if with_ppl else None
    return Row("onnxruntime-genai", f"W4 g64 MatMulNBits, accuracy_level={level}", rate, prefill, ppl,
               dir_size(directory / "model.onnx"), tokens)


def _external_rows(ctx: EdgeContext, modules: list[str]) -> list[Row]:
    rows = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            print(f"note: {name}.py is not present; its rows are omitted.", file=sys.stderr)
            continue
        rows += mod.rows(ctx)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=32, help="GPTQ calibration windows (WikiText-2 valid)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--work-dir", default="/tmp/lq_edge")
    p.add_argument("--engines", default="edge_gguf", help="comma list of modules with rows(ctx) (may be absent)")
    p.add_argument("--speed-only", action="store_true", help="decode speed of the exports already in --work-dir")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("smollm2")
    float_model = load_causal_lm("smollm2").eval()
    if args.speed_only:
        args.num_samples, args.eval_windows = 0, 0
    prompt, windows, calib = _texts(tokenizer, args)
    if args.speed_only:
        _speed_only(float_model, tokenizer, prompt, args)
        return
    spec = QuantSpec(4, 64, symmetric=True)
    quantized = copy.deepcopy(float_model)
    t0 = now()
    quantize_model(quantized, spec, "gptq", calibration=calib)
    print(f"GPTQ {spec} on {calib.shape[0]} x {args.seq_len} tokens: {now() - t0:.0f} s", flush=True)
    our_ppl = perplexity(quantized, windows)
    print(f"our ppl (in-memory packed model) = {our_ppl:.4f}", flush=True)
    work = Path(args.work_dir)
    ctx = EdgeContext(float_model, quantized, tokenizer, prompt, args.new_tokens, windows, our_ppl, args.threads, work,
                      spec)
    base = _transformers_row(float_model, ctx, "transformers generate")
    base.ppl = perplexity(float_model, windows)
    print(f"transformers float32: {base.decode_tok_s:.1f} tok/s, ppl {base.ppl:.4f}", flush=True)
    rows = [base]
    for level in (0, 4):
        out = export.save(quantized, work / f"onnx-a{level}", "onnx", tokenizer=tokenizer, overwrite=True,
                          options={"accuracy_level": level, "context_length": 2048})
        rows.append(_genai_row(out, ctx, level))
        print(f"onnxruntime-genai a{level}: {rows[-1].decode_tok_s:.1f} tok/s, ppl {rows[-1].ppl:.4f}", flush=True)
    rows.append(Row("lightning-quant (torch, in memory)", "W4 g64 PackedLinear", None, None, our_ppl, None))
    rows += _external_rows(ctx, [m for m in args.engines.split(",") if m])
    print(f"\nSmolLM2-135M, W4 g64 GPTQ ({calib.shape[0]} x {args.seq_len} calibration tokens), {args.threads} threads, "
          f"prompt {prompt.shape[1]} + {args.new_tokens} generated, ppl on {windows.shape[0]} x {args.seq_len} "
          "WikiText-2 test tokens\n")
    print_table(rows, base, our_ppl)
    for r in rows[1:3]:
        same = sum(a == b for a, b in zip(r.tokens, rows[1].tokens))
        print(f"{r.weights}: {same}/{len(r.tokens)} greedy tokens equal to accuracy_level=0's")
    a4 = rows[2]
    print(f"\ngoal int4 decode >= 2x transformers fp32: {a4.decode_tok_s / base.decode_tok_s:.2f}x "
          f"({'met' if a4.decode_tok_s >= 2 * base.decode_tok_s else 'NOT met'})")
    for r in rows:
        if r.ppl is not None and r is not base:
            d = 100 * abs(r.ppl / our_ppl - 1)
            print(f"goal ppl within 0.5 % ({r.engine}, {r.weights}): {d:.3f} % ({'met' if d <= 0.5 else 'NOT met'})")


def _speed_only(float_model, tokenizer, prompt, args) -> None:
    work = Path(args.work_dir)
    ctx = EdgeContext(float_model, None, tokenizer, prompt, args.new_tokens, None, float("nan"), args.threads, work)
    base = _transformers_row(float_model, ctx, "transformers generate")
    rows = [base] + [_genai_row(work / f"onnx-a{level}", ctx, level, with_ppl=False) for level in (0, 4)]
    print(f"\nSmolLM2-135M decode speed, {args.threads} threads, prompt {prompt.shape[1]} + {args.new_tokens} generated "
          f"(exports from {work})\n")
    print_table(rows, base, float("nan"))


if __name__ == "__main__":
    main()
