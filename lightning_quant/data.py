"""Real text available offline: Python standard-library sources and WikiText-2 (when present)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

__all__ = ["stdlib_text", "token_windows", "wikitext2_path"]


def stdlib_text(max_chars: int = 2_000_000, split: str = "train") -> str:
    """Concatenated standard-library ``.py`` sources (deterministic order).

    ``split='train'`` takes files whose sorted index is not a multiple of 10, ``'heldout'``
    the others, so training and evaluation text never overlap.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % 10 == 0) == (split == "heldout")]
    parts, total = [], 0
    for f in chosen:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def wikitext2_path(split: str = "test") -> Path | None:
    """``shared/data/wikitext-2/{split}.txt`` beside the checkout, if present."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        p = parent / "shared" / "data" / "wikitext-2" / f"{split}.txt"
        if p.exists():
            return p
    return None


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]`` of a 1-D token tensor (the tail is dropped)."""
    ids = ids.flatten()
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"Text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
                         "give more text or a smaller seq_len.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)
