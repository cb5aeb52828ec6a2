"""peft LoRA composition for fake quant.

A peft ``lora.Linear`` (the *host*) computes ``base_layer(x) + Σ_a scaling_a · B_a(A_a(dropout(x)))``.
QAT replaces ``host.base_layer`` by a :class:`~lightning_quant.qat.FakeQuantLinear` that keeps a plain
(unregistered, so no ``state_dict`` cycle) reference to its host:

* ``lora="separate"`` — the base module fake-quantizes ``W`` only; adapters stay float (QLoRA-style).
* ``lora="merged"`` — the base module returns ``x_q @ Q(W + Σ scaling·B@A)ᵀ + b − Σ scaling·B(A(x))``;
  the host then adds its adapter term back, so in eval mode the host computes exactly the merged,
  quantized layer (up to one float add/subtract of the adapter term). With ``lora_dropout > 0`` the
  training forward additionally carries ``scaling·B A (dropout(x) − x)`` (zero in eval), i.e. dropout
  acts as noise on the adapter path. Gradients to ``A`` / ``B`` flow through the fake quant's
  straight-through estimator.

Supported: vanilla LoRA (``peft.tuners.lora.layer.Linear``) on ``nn.Linear`` / GPT-2 ``Conv1D`` layers,
without DoRA or other variants, without ``lora_bias`` and not merged.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_quant.adapters import SUPPORTED, check_supported_host, is_tuner_layer

__all__ = ["SUPPORTED", "active_adapters", "adapter_output", "check_supported_host", "is_tuner_layer", "lora_delta", "merged_weight"]

def active_adapters(host: nn.Module) -> list[str]:
    """Adapters the host adds in its forward (none while adapters are disabled)."""
    if host.disable_adapters:
        return []
    return [a for a in host.active_adapters if a in host.lora_A]


def lora_delta(host: nn.Module) -> Tensor | None:
    """``Σ_a scaling_a · B_a @ A_a`` as ``[out, in]`` (``B [out, r]``, ``A [r, in]``), or ``None``."""
    delta = None
    for a in active_adapters(host):
        d = (host.lora_B[a].weight @ host.lora_A[a].weight) * host.scaling[a]  # [out, r] @ [r, in]
        delta = d if delta is None else delta + d
    return delta


def adapter_output(host: nn.Module, x: Tensor) -> Tensor | None:
    """``Σ_a scaling_a · B_a(A_a(x))`` without dropout, ``[..., out]``; ``None`` without adapters."""
    out = None
    for a in active_adapters(host):
        lora_a, lora_b = host.lora_A[a], host.lora_B[a]
        y = lora_b(lora_a(x.to(lora_a.weight.dtype))) * host.scaling[a]
        out = y if out is None else out + y
    return out


def merged_weight(weight_oi: Tensor, host: nn.Module | None) -> Tensor:
    """``W + Σ scaling·B@A`` ``[out, in]`` in the weight's dtype (``W`` itself without adapters)."""
    delta = None if host is None else lora_delta(host)
    return weight_oi if delta is None else weight_oi + delta.to(weight_oi.dtype)
