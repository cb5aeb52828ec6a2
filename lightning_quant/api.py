"""Standalone entry point: quantize a model in place, without a Trainer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_quant.adapters import LORA_MODES, check_lora_mode, check_supported_host, merge_into_base
from lightning_quant.calibration.distributed import converted_groups
from lightning_quant.methods.llm_int8 import DEFAULT_THRESHOLD, INT8_METHOD_SPEC, LLMInt8Config
from lightning_quant.methods.registry import Method, MethodResult, get_method, swap_in_packed
from lightning_quant.methods.rotation import Rotation, rotate_model
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, select_targets

__all__ = ["LORA_MODES", "MethodResult", "Rotation", "check_rotation", "convert_to_int8", "prepare_targets",
           "quantize_model", "swap_in_packed"]


def prepare_targets(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None,
                    lora: str, what: str) -> dict[str, nn.Module]:
    """``{logical name: linear module}`` to quantize, after handling the peft adapters on them per ``lora``
    (see :data:`LORA_MODES`; ``"merged"`` changes the model: hosts are replaced by their merged base)."""
    check_lora_mode(lora)
    chosen = select_targets(model, include, exclude)
    hosts = {n: t.host for n, t in chosen.items() if t.host is not None}
    if hosts and lora == "merged":
        merge_into_base(model, hosts, f"{what} with lora='merged'")
        chosen = select_targets(model, include, exclude)
    elif hosts:
        for name, host in hosts.items():
            check_supported_host(host, name, f"{what} with lora='separate'")
    return {n: t.module for n, t in chosen.items()}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    spec: QuantSpec | None = None,
    method: str = "rtn",
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
    calibration: Any = None,
    config: Any = None,
    lora: str = "merged",
    rotation: Rotation | None = None,
) -> MethodResult:
    """Quantize the linear layers of ``model`` in place and swap in packed layers.

    Args:
        model: any ``nn.Module`` (HF transformers models, peft-wrapped ones, plain modules).
        spec: the weight :class:`QuantSpec`; ``None`` takes the method's fixed spec (``"int8"``:
            ``INT8_METHOD_SPEC``) and raises for a method without one.
        method: a registered method name: ``"rtn"`` (no data), ``"gptq"`` / ``"awq"`` (need
            ``calibration``), ``"int8"``.
        include / exclude: module-name filters (see :mod:`lightning_quant.targets`);
            ``lm_head`` is excluded by default.
        calibration: a tensor of token ids ``[N, T]`` or an iterable of batches, for methods that need it.
        config: the method's own frozen config dataclass (e.g. ``GPTQConfig``), or ``None`` for defaults.
        lora: for layers wrapped by peft LoRA adapters, one of :data:`LORA_MODES` (default ``"merged"``).
        rotation: a :class:`~lightning_quant.methods.rotation.Rotation` (QuaRot / SpinQuant R1): the residual
            stream is rotated offline (:func:`~lightning_quant.methods.rotation.rotate_model`, float outputs
            unchanged) before the method runs; adapters on rotated layers are merged first under
            ``lora="merged"`` and refused under ``"separate"``. Refused by methods that cannot use it (``int8``).

    Returns:
        The method's :class:`~lightning_quant.methods.registry.MethodResult`: a mapping ``{module name:
        QuantizedWeight}`` of every converted layer, with the method's per-layer ``figures`` (``gptq_loss``, ...)
        and layer data.
    """
    m = get_method(method)
    if spec is None:
        if m.fixed_spec is None:
            raise ValueError(f"method={method!r} needs a QuantSpec, e.g. quantize_model(model, QuantSpec(bits=4, "
                             f"group_size=128), method={method!r}); only methods with a fixed spec (int8) take none.")
        spec = m.fixed_spec
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}; e.g. QuantSpec(bits=4, group_size=128).")
    if m.needs_calibration and calibration is None:
        raise ValueError(f"method={method!r} needs calibration data: pass calibration=<token ids or a dataloader>.")
    if config is not None and m.config_type is not None and not isinstance(config, m.config_type):
        raise TypeError(f"config for method={method!r} must be a {m.config_type.__name__}, got {type(config).__name__}.")
    if m.check_spec is not None:
        m.check_spec(spec)  # before any change to the model (merging adapters)
    if rotation is not None:
        check_rotation(m, rotation)
        check_lora_mode(lora)
        select_targets(model, include, exclude)  # the filters fail before the model changes
        rotate_model(model, rotation, merge_adapters=lora == "merged")
    targets = prepare_targets(model, include, exclude, lora, f"method={method!r}")
    for name, module in targets.items():
        spec.check_in_features(_in_features(module, name))
    result = m.fn(model, targets, spec, calibration, config)
    if not isinstance(result, MethodResult):
        raise TypeError(f"method={method!r} returned a {type(result).__name__}; a registered method returns a "
                        "lightning_quant.methods.MethodResult (wrap its {name: QuantizedWeight} in MethodResult(...)).")
    missing = set(targets) - set(result)
    if missing:
        raise RuntimeError(f"method={method!r} left {len(missing)} layer(s) unconverted: {sorted(missing)[:5]}.")
    for group in converted_groups(model, list(result)):  # FSDP1: one unit at a time, unwrapped first
        (m.swap or swap_in_packed)(model, result.subset(group))
    return result


def check_rotation(method: Method, rotation: Rotation | None) -> None:
    """Raise when ``rotation`` is not a :class:`Rotation` (or ``None``) or ``method`` refuses a rotated model."""
    if rotation is None:
        return
    if not isinstance(rotation, Rotation):
        raise TypeError(f"rotation must be a lightning_quant.methods.rotation.Rotation, e.g. Rotation(kind='hadamard', "
                        f"seed=0), or None; got {type(rotation).__name__}.")
    if method.refuses_rotation is not None:
        raise ValueError(f"method={method.name!r} does not take rotation=: {method.refuses_rotation}.")


def convert_to_int8(model: nn.Module, threshold: float = DEFAULT_THRESHOLD, *, include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = DEFAULT_EXCLUDE) -> MethodResult:
    """Swap the selected linear layers of ``model`` for ``Int8OutlierLinear`` in place (``method="int8"``)."""
    return quantize_model(model, INT8_METHOD_SPEC, "int8", include=include, exclude=exclude,
                          config=LLMInt8Config(threshold))


def _in_features(module: nn.Module, name: str) -> int:
    from lightning_quant.targets import linear_weight

    if isinstance(module, nn.Linear):
        return module.in_features  # the weight may be an FSDP1 shard
    return linear_weight(module).shape[1]
