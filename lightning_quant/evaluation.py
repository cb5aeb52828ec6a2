"""Held-out quality of a quantized model: perplexity and mean per-token KL to the float model."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["perplexity", "kl_to_reference", "evaluate_against"]


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows [N, T]``."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        logits = _logits(model, ids)[:, :-1].float()
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def kl_to_reference(model: nn.Module, ref_logits: list[Tensor], windows: Tensor, batch_size: int = 4) -> float:
    """Mean over tokens of KL(p_ref || p_model), with ``ref_logits`` from :func:`reference_logits`."""
    total, count = 0.0, 0
    for j, i in enumerate(range(0, windows.shape[0], batch_size)):
        lq = torch.log_softmax(_logits(model, windows[i : i + batch_size]).float(), -1)
        lp = torch.log_softmax(ref_logits[j].float(), -1)
        total += (lp.exp() * (lp - lq)).sum(-1).sum().item()
        count += lq.shape[0] * lq.shape[1]
    return total / count


@torch.no_grad()
def reference_logits(model: nn.Module, windows: Tensor, batch_size: int = 4) -> list[Tensor]:
    return [_logits(model, windows[i : i + batch_size]).half() for i in range(0, windows.shape[0], batch_size)]


def evaluate_against(model: nn.Module, ref: list[Tensor], windows: Tensor, batch_size: int = 4) -> dict[str, float]:
    return {"ppl": perplexity(model, windows, batch_size), "kl": kl_to_reference(model, ref, windows, batch_size)}
