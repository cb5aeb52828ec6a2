"""LoRA on a packed base (QLoRA-style, Dettmers et al. 2023) through peft's custom-module registration.

``y = PackedLinear(x) + (α / r) · B(A(dropout(x)))``: the packed int codes stay frozen buffers, only
``A [r, in]`` and ``B [out, r]`` train. Gradients reach earlier layers through the packed op's
autograd formula (``∂L/∂x = ∂L/∂y · W_deq``).

Usage::

    from peft import LoraConfig, get_peft_model
    from lightning_quant.integrations.peft import register_packed_lora

    config = register_packed_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(packed_model, config)

**Merging is refused**: folding ``B·A`` into int codes would re-quantize the weight (a lossy step
that deserves its own RTN/GPTQ pass), so :meth:`PackedLoraLinear.merge` raises with the
alternatives instead of silently changing the model. ``model.unload()`` (drop the adapters) works.
DoRA needs a float base weight and is refused at construction.

Written against peft's ``LoraConfig._register_custom_module`` (peft >= 0.14) and its
``tuners.lora.layer.Linear`` (whose ``forward`` adds the adapters to ``base_layer(x)``).
"""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _LoraLinear

from lightning_quant.layers.packed import PackedLinear

__all__ = ["PackedLoraLinear", "register_packed_lora"]


class PackedLoraLinear(_LoraLinear):
    """peft's LoRA ``Linear`` around a frozen :class:`~lightning_quant.layers.PackedLinear` base."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig | None = None, **kwargs) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, PackedLinear):
            raise TypeError(f"PackedLoraLinear wraps a PackedLinear, got {type(base).__name__}.")
        use_dora = kwargs.get("use_dora", getattr(config, "use_dora", False))
        if use_dora:
            raise ValueError("DoRA needs a float base weight; use LoraConfig(use_dora=False) on a packed base.")
        if config is not None and config.fan_in_fan_out:
            raise ValueError("A PackedLinear is [out, in] like nn.Linear: use LoraConfig(fan_in_fan_out=False).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "Merging LoRA into a PackedLinear is refused: it would re-quantize the packed codes. Keep the adapter "
            "unmerged, or merge into the float model first (train LoRA with QAT, merge, then quantize/pack), or "
            "call model.unload() to drop the adapters."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("PackedLoraLinear never merges, so there is nothing to unmerge.")

    def __repr__(self) -> str:
        return "packed_lora." + super().__repr__()


def register_packed_lora(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to wrap every targeted :class:`PackedLinear` in a :class:`PackedLoraLinear`; returns it."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_packed_lora takes a peft LoraConfig, got {type(config).__name__}.")
    config._register_custom_module({PackedLinear: PackedLoraLinear})
    return config
