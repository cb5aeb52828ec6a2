"""LoRA on a packed base (QLoRA-style, Dettmers et al. 2023) through peft's custom-module registration.

``y = PackedLinear(x) + (α / r) · B(A(dropout(x)))``: the packed int codes stay frozen buffers, only
``A [r, in]`` and ``B [out, r]`` train. Gradients reach earlier layers through the packed op's
autograd formula (``∂L/∂x = ∂L/∂y · W_deq``).

Usage::

    from peft import LoraConfig, get_peft_model
    from lightning_quant.integrations.peft import register_packed_lora

    config = register_packed_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(packed_model, config)

**Merging is explicit**: folding ``B·A`` into int codes re-quantizes the weight (a lossy step with its
own choice of method), so peft's :meth:`PackedLoraLinear.merge` raises and points to
:func:`merge_packed_lora`, which re-quantizes ``W_deq + Σ scaling·B@A`` with RTN on the base's own grid
or with GPTQ on calibration data. ``model.unload()`` (drop the adapters) works.
DoRA needs a float base weight and is refused at construction.

Written against peft's ``LoraConfig._register_custom_module`` (peft >= 0.14) and its
``tuners.lora.layer.Linear`` (whose ``forward`` adds the adapters to ``base_layer(x)``).
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _LoraLinear
from torch import nn

from lightning_quant import primitives as P
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.layers.registry import quantized_layer_types
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.targets import set_submodule

__all__ = ["MERGE_METHODS", "PackedLoraLinear", "merge_packed_lora", "register_packed_lora"]


class PackedLoraLinear(_LoraLinear):
    """peft's LoRA ``Linear`` around a frozen :class:`~lightning_quant.layers.PackedLinear` base."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig | None = None, **kwargs) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        kinds = quantized_layer_types()  # every registered quantized layer kind; the adapters stay float
        if not isinstance(base, kinds):
            raise TypeError(f"PackedLoraLinear wraps a quantized layer ({', '.join(k.__name__ for k in kinds)}), "
                            f"got {type(base).__name__}.")
        use_dora = kwargs.get("use_dora", getattr(config, "use_dora", False))
        if use_dora:
            raise ValueError("DoRA needs a float base weight; use LoraConfig(use_dora=False) on a packed base.")
        if config is not None and config.fan_in_fan_out:
            raise ValueError("A PackedLinear is [out, in] like nn.Linear: use LoraConfig(fan_in_fan_out=False).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "peft's merge cannot fold LoRA into a PackedLinear: that re-quantizes the packed codes. Use "
            "lightning_quant.integrations.peft.merge_packed_lora(model, method='rtn' | 'gptq', ...), keep the "
            "adapter unmerged, or call model.unload() to drop the adapters."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("PackedLoraLinear never merges, so there is nothing to unmerge.")

    def __repr__(self) -> str:
        return "packed_lora." + super().__repr__()


def register_packed_lora(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to wrap every targeted :class:`PackedLinear` in a :class:`PackedLoraLinear`; returns it."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_packed_lora takes a peft LoraConfig, got {type(config).__name__}.")
    config._register_custom_module({kind: PackedLoraLinear for kind in quantized_layer_types()})
    return config


#: How :func:`merge_packed_lora` re-quantizes ``W_deq + Σ scaling·B@A``.
MERGE_METHODS = ("rtn", "gptq")


@torch.no_grad()
def merge_packed_lora(model: nn.Module, method: str = "rtn", calibration=None,
                      config=None) -> dict[str, QuantizedWeight]:
    """Fold LoRA adapters trained on packed bases (QLoRA style) back into packed layers, in place.

    Each :class:`PackedLoraLinear` host becomes one :class:`PackedLinear` quantizing
    ``W_merged = W_deq + Σ_a scaling_a · B_a @ A_a`` (``[out, in]``):

    * ``method="rtn"`` — on the base layer's own grid: its scales, zero points and ``g_idx`` are kept and
      only the codes change, ``q = clamp(round(W_merged / s) + z, 0, 2^b − 1)``. No data needed; the
      adapter's change is kept only where it moves a weight past a rounding boundary.
    * ``method="gptq"`` — GPTQ (:func:`lightning_quant.quantize_model`) on ``calibration`` with the base
      layer's spec: new qparams, error feedback on real activations. ``config`` is a ``GPTQConfig``.

    Returns ``{host name: QuantizedWeight}``. Raises when the model has no such host, for an int8 base
    (``TypeError``), for an unknown
    method, for calibration given to / missing from a method, and (GPTQ) for bases with activation quant
    or an AWQ input scale, which GPTQ cannot rebuild.
    """
    from lightning_quant.adapters import check_supported_host
    from lightning_quant.qat.lora import lora_delta

    if method not in MERGE_METHODS:
        raise ValueError(f"merge_packed_lora: method={method!r} is not supported; use one of {MERGE_METHODS}.")
    if method == "rtn" and calibration is not None:
        raise ValueError("merge_packed_lora(method='rtn') re-rounds on the base's own grid and takes no calibration; "
                         "pass calibration=None or use method='gptq'.")
    if method == "gptq" and calibration is None:
        raise ValueError("merge_packed_lora(method='gptq') needs calibration=<token ids or a dataloader>.")
    hosts = {n: m for n, m in model.named_modules() if isinstance(m, PackedLoraLinear)}
    if not hosts:
        raise ValueError("merge_packed_lora found no LoRA adapter on a PackedLinear; build them with "
                         "get_peft_model(packed_model, register_packed_lora(LoraConfig(...))).")
    merged: dict[str, tuple[PackedLinear, QuantizedWeight, torch.Tensor]] = {}
    for name, host in hosts.items():
        check_supported_host(host, name, "merge_packed_lora")
        base = host.get_base_layer()
        if not isinstance(base, PackedLinear):
            raise TypeError(f"{name}: merge_packed_lora re-quantizes PackedLinear bases; this one is a "
                             f"{type(base).__name__} (LLM.int8): keep its adapters separate or unload them.")
        if method == "gptq" and (base.act_spec is not None or base.input_scale is not None):
            raise ValueError(f"{name}: its packed base has activation quant or an AWQ input scale, which "
                             "merge_packed_lora(method='gptq') cannot rebuild; use method='rtn'.")
        qw = base.to_quantized()
        delta = lora_delta(host)
        w = qw.dequantize(torch.float32) + (0 if delta is None else delta.float())  # [out, in]
        merged[name] = (base, qw, w)
    if method == "rtn":
        return {name: _merge_on_grid(model, name, base, qw, w) for name, (base, qw, w) in merged.items()}
    return _merge_with_gptq(model, merged, calibration, config)


def _merge_on_grid(model: nn.Module, name: str, base: PackedLinear, qw: QuantizedWeight, w: torch.Tensor):
    codes = P.quantize(w, qw.scales, qw.zeros, qw.spec, qw.g_idx)
    new = QuantizedWeight(codes=codes, scales=qw.scales, zeros=qw.zeros, spec=qw.spec, g_idx=qw.g_idx,
                          dtype=qw.dtype)
    set_submodule(model, name, PackedLinear.from_quantized(new, base.bias, act_spec=base.act_spec,
                                                           input_scale=base.input_scale))
    return new


def _merge_with_gptq(model: nn.Module, merged: dict, calibration, config) -> dict[str, QuantizedWeight]:
    from lightning_quant.api import quantize_model

    by_spec: dict = {}
    for name, (base, qw, w) in merged.items():
        linear = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, dtype=base.compute_dtype,
                           device=w.device)
        linear.weight.copy_(w)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        set_submodule(model, name, linear)
        by_spec.setdefault(qw.spec, []).append(name)
    out: dict[str, QuantizedWeight] = {}
    for spec, names in by_spec.items():
        out.update(quantize_model(model, spec, "gptq", include=[f"re:^{re.escape(n)}$" for n in names],
                                  exclude=None, calibration=calibration, config=config))
    return out
