"""What the edge benchmark's engines share: the measured row, the context every engine gets, timing.

``benchmarks/edge.py`` builds one :class:`EdgeContext` (the float and the quantized SmolLM2, the prompt,
the perplexity windows, our own perplexity) and asks each engine for its :class:`Row` s. An engine
outside ``edge.py`` (llama.cpp rows: ``benchmarks/edge_gguf.py``) provides ``rows(ctx) -> list[Row]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["EdgeContext", "Row", "decode_rate", "print_table"]


@dataclass
class Row:
    """One engine on one export.

    ``decode_tok_s``: generated tokens per second after the first (the prompt's prefill excluded);
    ``prefill_s``: seconds to the first generated token; ``ppl``: WikiText-2 test perplexity through the
    engine (``None`` when not measured); ``size_bytes``: the files the engine loads; ``tokens``: the
    generated ids (to compare engines' greedy paths).
    """

    engine: str
    weights: str
    decode_tok_s: float | None
    prefill_s: float | None
    ppl: float | None
    size_bytes: int | None
    tokens: list[int] = field(default_factory=list)


@dataclass
class EdgeContext:
    """Everything an engine needs to produce its rows (built once by ``edge.py``)."""

    float_model: nn.Module
    quantized: nn.Module  # our packed model (W4 g64 GPTQ), in memory
    tokenizer: Any
    prompt: Tensor  # [1, prompt_len]
    new_tokens: int
    windows: Tensor  # [N, seq_len] perplexity windows of WikiText-2 test
    our_ppl: float  # our own evaluation of ``quantized`` on ``windows``
    threads: int
    work_dir: Path
    spec: Any = None


def decode_rate(stamps: list[float], start: float) -> tuple[float, float]:
    """``(tokens/s after the first token, seconds to the first token)`` from per-token time stamps."""
    if len(stamps) < 2:
        raise ValueError("decode_rate needs at least two generated tokens.")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[0] - start


def now() -> float:
    return time.perf_counter()


def dir_size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def print_table(rows: list[Row], base: Row, our_ppl: float) -> None:
    """Markdown table with ratios to ``base`` (decode speed, size) and to ``our_ppl`` (perplexity)."""
    print("| engine | weights | decode tok/s | x base | prefill s | ppl | ppl vs ours | size MB | x base |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        speed = f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "-"
        ratio = f"{r.decode_tok_s / base.decode_tok_s:.2f}" if r.decode_tok_s and base.decode_tok_s else "-"
        pre = f"{r.prefill_s:.2f}" if r.prefill_s is not None else "-"
        ppl = f"{r.ppl:.3f}" if r.ppl is not None else "-"
        dppl = f"{100 * (r.ppl / our_ppl - 1):+.2f} %" if r.ppl is not None else "-"
        size = f"{r.size_bytes / 1e6:.1f}" if r.size_bytes else "-"
        sratio = f"{r.size_bytes / base.size_bytes:.2f}" if r.size_bytes and base.size_bytes else "-"
        print(f"| {r.engine} | {r.weights} | {speed} | {ratio} | {pre} | {ppl} | {dppl} | {size} | {sratio} |")
