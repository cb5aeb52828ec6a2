"""Quantized layer kinds by name: ``kind -> layer class``, and each layer's plain-JSON description.

A layer class registers itself with :func:`register_layer` and provides two methods:

* ``layer_config(self) -> dict``: plain JSON (ints, floats, bools, strings, ``None``, lists, dicts) with
  everything needed to rebuild the layer *empty* — shapes, dtype, spec — but no tensors;
* ``from_config(cls, cfg, device=None) -> layer`` (a classmethod): that empty layer, whose
  ``load_state_dict`` then fills the buffers (``qweight``, ``scales``, ... of a ``.ckpt`` or a
  ``model.safetensors``).

:func:`layer_config` adds the ``"kind"`` key, :func:`layer_from_config` dispatches on it; the Lightning
checkpoint manifest (:mod:`lightning_quant.plugins.checkpoint_io`), the ``lightning-quant`` export
format (:mod:`lightning_quant.export.native`) and the exporters' layer discovery all go through here, so a
new layer kind is serialised everywhere once it registers. The built-in kinds (``"packed"``:
:class:`~lightning_quant.layers.packed.PackedLinear`, ``"int8"``:
:class:`~lightning_quant.layers.int8.Int8OutlierLinear`) are imported on first use.

Example::

    cfg = layer_config(model.get_submodule("model.layers.0.mlp.up_proj"))
    # {"kind": "packed", "in_features": 96, "out_features": 160, "bias": False, "dtype": "float32",
    #  "spec": {"bits": 4, ...}, "act_order": False, "act_spec": None, "input_scale": False}
    empty = layer_from_config(cfg)          # same shapes and spec, zero buffers
    empty.load_state_dict(state)            # the packed tensors
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "check_layer_config",
    "dtype_from_name",
    "dtype_name",
    "is_quantized_layer",
    "layer_config",
    "layer_from_config",
    "layer_kinds",
    "quantized_layer_types",
    "quantized_layers",
    "register_layer",
]

L = TypeVar("L", bound=type)

#: kind -> layer class (filled by :func:`register_layer`)
_KINDS: dict[str, type[nn.Module]] = {}
#: modules whose import registers the built-in kinds (imported lazily: no import-time work)
_BUILTIN_MODULES = ("lightning_quant.layers.packed", "lightning_quant.layers.int8")
_BUILTINS_LOADED = False
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def register_layer(kind: str) -> Callable[[L], L]:
    """Class decorator: register a quantized layer class under ``kind`` and set ``cls.layer_kind = kind``.

    The class must define ``layer_config()`` and the classmethod ``from_config(cfg, device=None)``.
    Registering another class under a taken kind raises; re-registering the same class (a module
    reload) replaces it.
    """
    if not isinstance(kind, str) or not kind or kind != kind.strip():
        raise ValueError(f"A layer kind is a non-empty name without surrounding spaces, got {kind!r}.")

    def decorate(cls: L) -> L:
        missing = [m for m in ("layer_config", "from_config") if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"register_layer({kind!r}) needs {cls.__name__} to define {missing}: layer_config() returns "
                            "its plain-JSON description, from_config(cfg) rebuilds an empty layer from it.")
        old = _KINDS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"Layer kind {kind!r} is already registered by {old.__module__}.{old.__qualname__}; "
                             f"register {cls.__name__} under another name.")
        cls.layer_kind = kind
        _KINDS[kind] = cls
        return cls

    return decorate


def _load_builtin_kinds() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _BUILTINS_LOADED = True


def layer_kinds() -> dict[str, type[nn.Module]]:
    """``{kind: layer class}`` of every registered kind (a copy)."""
    _load_builtin_kinds()
    return dict(sorted(_KINDS.items()))


def quantized_layer_types() -> tuple[type[nn.Module], ...]:
    """The registered layer classes, for ``isinstance`` (peft dispatch, exporters)."""
    return tuple(layer_kinds().values())


def _kind_of(module: nn.Module) -> str | None:
    """The registered kind of ``module`` (subclasses, e.g. FSDP2's wrapped classes, inherit it), else None."""
    _load_builtin_kinds()
    kind = getattr(type(module), "layer_kind", None)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    return kind if cls is not None and isinstance(module, cls) else None


def is_quantized_layer(module: nn.Module) -> bool:
    """True for an instance of a registered layer kind."""
    return _kind_of(module) is not None


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: layer}`` of every registered-kind layer in ``model`` (in ``named_modules`` order)."""
    return {name: m for name, m in model.named_modules() if is_quantized_layer(m)}


def layer_config(module: nn.Module) -> dict[str, Any]:
    """``{"kind": ..., **module.layer_config()}``: the plain-JSON description :func:`layer_from_config` reads."""
    kind = _kind_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a registered quantized layer (kinds: {sorted(_KINDS)}); "
                        "decorate its class with lightning_quant.layers.registry.register_layer(kind).")
    cfg = module.layer_config()
    if "kind" in cfg:
        raise ValueError(f"{type(module).__name__}.layer_config() must not set 'kind' (the registry adds {kind!r}).")
    return {"kind": kind, **cfg}


def layer_from_config(cfg: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """An empty layer (zero buffers) of the kind, shapes and spec ``cfg`` describes; ``load_state_dict`` fills it.

    Raises ``ValueError`` for a missing or unknown ``"kind"``, naming the registered kinds.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"A layer config is a dict with a 'kind' key, got {type(cfg).__name__}.")
    kinds = layer_kinds()
    kind = cfg.get("kind")
    if kind not in kinds:
        raise ValueError(f"Unknown layer kind {kind!r}; known kinds: {sorted(kinds)}. The file was written by a "
                         "newer lightning_quant or with a layer kind that is not imported (register_layer).")
    return kinds[kind].from_config({k: v for k, v in cfg.items() if k != "kind"}, device=device)


def check_layer_config(kind: str, cfg: Mapping[str, Any], required: tuple[str, ...],
                       defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``defaults`` filled in; raises ``ValueError`` naming missing or unknown keys.

    For ``from_config`` implementations: ``required`` keys must be present, every other key must be one
    of ``defaults``.
    """
    missing = [k for k in required if k not in cfg]
    unknown = sorted(set(cfg) - set(required) - set(defaults))
    problems = ([f"lacks {missing}"] if missing else []) + ([f"has unknown keys {unknown}"] if unknown else [])
    if problems:
        raise ValueError(f"Layer config of kind {kind!r} {' and '.join(problems)}; its keys are "
                         f"{sorted([*required, *defaults])}. Was it written by another version of lightning_quant?")
    return {**defaults, **cfg}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16 -> "float16"``, the spelling layer configs store."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16" -> torch.float16``; raises for a name that is not a floating torch dtype."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating torch dtype; use one of {list(_FLOAT_DTYPES)}.")
    return dtype
