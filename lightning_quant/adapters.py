"""peft adapter wrappers ("hosts") around linear layers: recognising, checking and merging them.

A peft tuner layer (``BaseTunerLayer``, e.g. ``peft.tuners.lora.layer.Linear``) wraps a layer as
``host.base_layer`` and adds its adapters (``lora_A`` / ``lora_B`` ...) in ``forward``. Target selection
(:mod:`lightning_quant.targets`) names such a layer by the host's path and never targets the adapters;
this module holds what every method needs to know about the host itself. peft is optional here.
"""

from __future__ import annotations

from torch import nn

__all__ = ["LORA_MODES", "SUPPORTED", "active_copy", "check_lora_mode", "check_supported_host", "is_aux_wrapper", "is_peft_model", "is_tuner_layer",
           "merge_into_base"]

#: What happens to peft LoRA adapters on a quantized layer, for QAT and PTQ alike: ``"merged"`` — the
#: quantized weight is ``W + Σ scaling·B@A`` (one quantized layer); ``"separate"`` — only the base ``W`` is
#: quantized and the adapters stay float on it (QLoRA-style).
LORA_MODES = ("merged", "separate")

SUPPORTED = "peft LoRA on Linear / Conv1D layers (peft.tuners.lora.layer.Linear, no DoRA/variants, lora_bias=False)"


def _is_peft(module: nn.Module, where: str, name: str) -> bool:
    """``isinstance(module, peft's <where>.<name>)``; False when peft is not installed (it is optional)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(where), name)
    except ImportError:
        return False
    return isinstance(module, cls)


def check_lora_mode(lora: str) -> str:
    """``lora`` itself, or ``ValueError`` naming :data:`LORA_MODES`."""
    if lora not in LORA_MODES:
        raise ValueError(f"lora={lora!r} is not supported; use one of {LORA_MODES}.")
    return lora


def is_tuner_layer(module: nn.Module) -> bool:
    """True for any peft adapter wrapper (``BaseTunerLayer``)."""
    return _is_peft(module, "peft.tuners.tuners_utils", "BaseTunerLayer")


def is_aux_wrapper(module: nn.Module) -> bool:
    """True for peft's ``modules_to_save`` wrapper (``AuxiliaryTrainingWrapper``: a trainable copy of a
    whole module, e.g. ``lm_head``, next to the frozen original)."""
    return _is_peft(module, "peft.utils.other", "AuxiliaryTrainingWrapper")


def active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``modules_to_save`` wrapper runs: its active adapter's copy, or the original."""
    copies = getattr(wrapper, "modules_to_save", None) or {}
    active = [a for a in getattr(wrapper, "active_adapters", []) if a in copies]
    if getattr(wrapper, "disable_adapters", False) or not active:
        return wrapper.original_module
    return copies[active[0]]


def is_peft_model(module: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (the wrapper ``get_peft_model`` returns)."""
    return _is_peft(module, "peft", "PeftModel")


def check_supported_host(host: nn.Module, name: str, what: str = "QAT") -> None:
    """Raise when the adapter wrapping the selected layer ``name`` is not plain LoRA on a Linear."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(host, LoraLinear):
        raise NotImplementedError(
            f"{name}: adapter type {type(host).__module__}.{type(host).__name__} is not supported by {what}; "
            f"supported: {SUPPORTED}. Exclude this module or use a LoRA config."
        )
    if any(host.lora_variant.get(a) is not None for a in host.lora_A):
        raise NotImplementedError(f"{name}: LoRA variants (DoRA, ...) are not supported by {what}; supported: {SUPPORTED}.")
    if any(host.lora_bias.get(a, False) for a in host.lora_A):
        raise NotImplementedError(f"{name}: lora_bias=True is not supported by {what}; supported: {SUPPORTED}.")
    if host.merged:
        raise ValueError(f"{name}: the LoRA adapters are merged into the base weight; call unmerge() before {what}.")


def merge_into_base(model: nn.Module, hosts: dict[str, nn.Module], what: str) -> None:
    """Fold each host's active adapters into its base weight (``W + Σ scaling·B@A``, peft's own merge) and
    put the base layer in the host's place, so the layer at the host's path is the merged float layer."""
    for name, host in hosts.items():
        check_supported_host(host, name, what)
    for name, host in hosts.items():
        host.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, host.get_base_layer())
