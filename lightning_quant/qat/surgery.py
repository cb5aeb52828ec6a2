"""Model surgery for QAT: inject fake quant, remove it, convert to packed layers.

Layers are chosen by :func:`lightning_quant.targets.select_targets` (logical names: a peft host's path,
never its adapters), the selection every method shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_quant.calibration.distributed import fsdp_units, layer_gathered, settle_fsdp1
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.qat import lora as L
from lightning_quant.qat.config import QATConfig
from lightning_quant.qat.fake_quant import FakeQuantLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, Target, logical_path, select_targets, set_submodule

__all__ = ["convert", "deployable_layers", "fake_quant_modules", "inject", "inject_config", "packed_replacements", "remove", "set_enabled"]


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every :class:`FakeQuantLinear` in ``model`` by module path (``...base_layer`` under peft)."""
    return {logical_path(n): m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _select(model: nn.Module, include, exclude) -> dict[str, Target]:
    existing = fake_quant_modules(model)
    if existing:
        raise ValueError(f"The model already has {len(existing)} fake-quant layer(s) (e.g. {next(iter(existing))!r}); "
                         "call lightning_quant.qat.remove(model) before injecting again.")
    return select_targets(model, include, exclude)


def inject_config(model: nn.Module, config: QATConfig) -> dict[str, FakeQuantLinear]:
    """Replace the selected layers by :class:`FakeQuantLinear` in place (see :func:`inject`)."""
    chosen = _select(model, config.include, config.exclude)
    for t in chosen.values():
        if t.host is not None:
            L.check_supported_host(t.host, t.name)
    out = {}
    for t in chosen.values():
        fq = FakeQuantLinear.from_linear(t.module, config.spec, config.act_spec, config.observer, t.host, config.lora)
        set_submodule(model, t.path, fq)
        out[t.path] = fq
    set_enabled(model, config.start_step == 0)
    return out


def inject(model: nn.Module, spec: QuantSpec, act_spec: ActivationSpec | None = None,
           include: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
           observer: str = "minmax", lora: str = "merged") -> dict[str, FakeQuantLinear]:
    """Inject fake quant into the linear layers of ``model`` (in place), before any DDP/FSDP wrapping.

    Returns ``{module path: FakeQuantLinear}``. Fake quant is enabled; :func:`set_enabled` toggles it.
    Raises when a filter matches nothing, a layer is already fake-quantized, or a peft adapter type is
    not supported.
    """
    return inject_config(model, QATConfig(spec, act_spec, include, exclude, observer, lora))


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quant on or off in every :class:`FakeQuantLinear` (the ``enabled`` buffers)."""
    for fq in fake_quant_modules(model).values():
        fq.enabled.fill_(bool(enabled))


def remove(model: nn.Module) -> dict[str, nn.Module]:
    """Put the original float modules back (same parameters; observer state is dropped)."""
    restored = {}
    for path, fq in fake_quant_modules(model).items():
        restored[path] = fq.to_linear()
        set_submodule(model, path, restored[path])
    return restored


@torch.no_grad()
def packed_replacements(model: nn.Module) -> dict[str, tuple[PackedLinear, QuantizedWeight]]:
    """``{module path: (PackedLinear, QuantizedWeight)}`` that would replace each fake-quant layer (nothing
    is swapped): the layer itself, or in merged LoRA mode its whole peft host (adapters folded in).

    Under FSDP each layer is packed while the FSDP unit that owns it is gathered
    (:func:`~lightning_quant.calibration.distributed.unsharded`), so every rank gets the full layer and
    no rank holds more than one unit unsharded."""
    hosts = {id(m): logical_path(n) for n, m in model.named_modules() if L.is_tuner_layer(m)}
    units = fsdp_units(model)
    out = {}
    for path, fq in deployable_layers(model).items():
        with layer_gathered(model, path, units):  # FSDP: this layer's unit gathered, one at a time
            packed, qw = fq.to_packed()
        out[hosts[id(fq._lora_host)] if getattr(fq, "lora_mode", None) == "merged" else path] = (packed, qw)
    return out


def deployable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that deploy as packed layers through ``to_packed() -> (PackedLinear, QuantizedWeight)``:
    every :class:`FakeQuantLinear`, and any user layer implementing that protocol (with an optional
    ``lora_mode == "merged"`` and ``_lora_host`` to replace its peft host)."""
    return {logical_path(n): m for n, m in model.named_modules() if callable(getattr(m, "to_packed", None))}


@torch.no_grad()
def convert(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Swap every fake-quant layer for a :class:`PackedLinear` with the QAT-learned qparams.

    Merged LoRA: the whole peft layer is replaced by the packed merged weight (adapters folded in).
    Separate LoRA: only ``base_layer`` becomes packed; the float adapters stay. Returns
    ``{module path of the packed layer: QuantizedWeight}``.
    """
    replacements = packed_replacements(model)
    if not replacements:
        raise ValueError("convert found no fake-quant layer; call lightning_quant.qat.inject(model, spec) first.")
    for path, (packed, _) in replacements.items():
        set_submodule(model, path, packed)
    settle_fsdp1(model)  # FSDP1: units whose layers were replaced are unwrapped (their float rest kept full)
    return {path: qw for path, (_, qw) in replacements.items()}
