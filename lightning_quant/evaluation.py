"""Held-out quality of a quantized model: perplexity and mean per-token KL to the float model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.metrics import LayerQuantizationError, Perplexity

__all__ = ["evaluate_against", "kl_to_reference", "layer_output_errors", "perplexity", "reference_logits"]


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows [N, T]`` (torchmetrics' Perplexity)."""
    metric = Perplexity()
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size]
        metric.update(_logits(model, ids)[:, :-1].float(), ids[:, 1:])
    return float(metric.compute())


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


@torch.no_grad()
def layer_output_errors(
    float_model: nn.Module, quant_model: nn.Module, names: list[str], batches: list[Tensor]
) -> LayerQuantizationError:
    """Per-layer output error of ``quant_model`` vs ``float_model`` on the same inputs.

    Each quantized layer is fed the *float* model's input of that layer (captured by hooks), so
    the figure isolates the layer's own quantization error from upstream drift.
    """
    metric = LayerQuantizationError(names)
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name):
        def fn(module, args, output):
            captured[name] = (args[0].detach(), output.detach())

        return fn

    handles = [float_model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for ids in batches:
            captured.clear()
            float_model(ids)
            for n in names:
                x, y = captured[n]
                metric.update(n, y, quant_model.get_submodule(n)(x))
    finally:
        for h in handles:
            h.remove()
    return metric
