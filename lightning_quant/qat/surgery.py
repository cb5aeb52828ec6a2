"""Model surgery for QAT: inject fake quant, remove it, convert to packed layers.

Names: a layer is addressed by its *logical* name — its module path, or for a layer wrapped by a peft
adapter the path of the adapter (``...q_proj``, not ``...q_proj.base_layer``), so ``include=["q_proj"]``
means the same with and without peft. Modules inside an adapter other than its ``base_layer``
(``lora_A``, ``lora_B``) are never targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_quant.layers.packed import PackedLinear
from lightning_quant.qat import lora as L
from lightning_quant.qat.config import QATConfig
from lightning_quant.qat.fake_quant import FakeQuantLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, is_linear_like, matches, set_submodule

__all__ = ["convert", "fake_quant_modules", "inject", "inject_config", "remove", "set_enabled"]


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every :class:`FakeQuantLinear` in ``model`` by module path (``...base_layer`` under peft)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module, nn.Module | None]]:
    """``{logical name: (module path, linear module, peft host or None)}`` for every linear-like layer."""
    hosts = {n: m for n, m in model.named_modules() if L.is_tuner_layer(m)}
    out = {}
    for name, module in model.named_modules():
        if not is_linear_like(module):
            continue
        host_name = max((h for h in hosts if name.startswith(h + ".")), key=len, default=None)
        if host_name is None:
            out[name] = (name, module, None)
        elif name == host_name + ".base_layer":
            out[host_name] = (name, module, hosts[host_name])
    return out


def _select(model: nn.Module, include, exclude) -> dict[str, tuple[str, nn.Module, nn.Module | None]]:
    existing = fake_quant_modules(model)
    if existing:
        raise ValueError(f"The model already has {len(existing)} fake-quant layer(s) (e.g. {next(iter(existing))!r}); "
                         "call lightning_quant.qat.remove(model) before injecting again.")
    cands = _candidates(model)
    examples = list(cands)[:6]
    for p in include or ():
        if not any(matches(n, p) for n in cands):
            raise ValueError(f"include pattern {p!r} matched no linear layer. Examples of names: {examples}. "
                             "Use a dotted suffix ('q_proj') or 're:<regex>'.")
    chosen = {n: c for n, c in cands.items()
              if (not include or any(matches(n, p) for p in include)) and not any(matches(n, p) for p in exclude or ())}
    if not chosen:
        raise ValueError(f"No linear layer left to fake-quantize (include={include or 'all'}, exclude={exclude}); "
                         f"candidates were {examples}. Loosen the filters.")
    return chosen


def inject_config(model: nn.Module, config: QATConfig) -> dict[str, FakeQuantLinear]:
    """Replace the selected layers by :class:`FakeQuantLinear` in place (see :func:`inject`)."""
    chosen = _select(model, config.include, config.exclude)
    for name, (_, module, host) in chosen.items():
        if host is not None:
            L.check_supported_host(host, name)
    out = {}
    for name, (path, module, host) in chosen.items():
        fq = FakeQuantLinear.from_linear(module, config.spec, config.act_spec, config.observer, host, config.lora)
        set_submodule(model, path, fq)
        out[path] = fq
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
def convert(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Swap every fake-quant layer for a :class:`PackedLinear` with the QAT-learned qparams.

    Merged LoRA: the whole peft layer is replaced by the packed merged weight (adapters folded in).
    Separate LoRA: only ``base_layer`` becomes packed; the float adapters stay. Returns
    ``{module path of the packed layer: QuantizedWeight}``.
    """
    fqs = fake_quant_modules(model)
    if not fqs:
        raise ValueError("convert found no fake-quant layer; call lightning_quant.qat.inject(model, spec) first.")
    hosts = {id(m): n for n, m in model.named_modules() if L.is_tuner_layer(m)}
    weights = {}
    for path, fq in fqs.items():
        qw = fq.quantized_weight()
        bias = None if fq.bias is None else fq.bias.detach()
        packed = PackedLinear.from_quantized(qw, bias, act_spec=fq.act_spec)
        if fq.lora_mode == "merged":
            path = hosts[id(fq._lora_host)]
        set_submodule(model, path, packed)
        weights[path] = qw
    return weights
