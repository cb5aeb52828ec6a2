"""``lightning-quant``: our own directory layout — every registered layer kind, every layer setting kept.

It is what ``lightning-quant quantize`` writes by default (``--format lightning-quant``), and the one format
that holds whatever a converted model holds: packed layers of any spec (mixed specs included), act
order, per-token activation quant (``act_spec``), AWQ's explicit input scales, LLM.int8 layers — because
each layer is described by the layer registry (:func:`lightning_quant.layers.registry.layer_config`) and
stored as its own buffers. Safetensors and JSON only:

* ``config.json``: the model's HF config (``architectures``, ``dtype``) plus
  ``lightning_quant_export: {"format": "lightning-quant", "file": "quantization.json"}``;
* ``quantization.json``: ``format`` (``"lightning-quant"``), ``version`` (2), ``method`` (or ``null``),
  ``spec`` (the :class:`~lightning_quant.spec.QuantSpec` dict every quantized layer shares; for layers
  that carry none, LLM.int8's, the method's fixed spec; ``null`` when mixed), ``dtype`` (the
  non-quantized tensors') and ``layers``: ``{name: {**layer_config(layer), "figures": {figure: float}}}``
  (``kind``, shapes, compute dtype, spec, act order, activation spec, input scale or threshold, plus the
  method's per-layer figures such as ``gptq_loss``);
* ``model.safetensors`` (shards + index above ``max_shard_bytes``): the state dict, quantized layers as
  their buffers (``qweight``, ``scales``, ``qzeros``, ``perm``, ``g_idx``, ``input_scale`` /
  ``weight``, ``SCB``, ``outlier_threshold``); tied weights once.

``load`` rebuilds the causal LM from ``config.json`` (transformers, no download), swaps in empty layers by
name (:func:`~lightning_quant.layers.registry.layer_from_config`) and loads the state dict: identical logits.

Version 1 (what ``lightning_quant.cli.save_quantized`` wrote before this format was registered: a plain HF
config, layers with ``in_features, out_features, bias, act_order, input_scale, figures, kind`` where ``kind``
is ``"PackedLinear"`` / ``"Int8OutlierLinear"``, the LLM.int8 threshold among the figures, one top-level
``spec``) is read by translating its entries (:func:`read_metadata`); such a directory is recognised by its
``quantization.json`` (:attr:`~lightning_quant.export.registry.ExportFormat.marker_file`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quant.export import io
from lightning_quant.export.hf import config_dict, load_plain, model_dtype, plain_tensors
from lightning_quant.export.registry import ExportFormat, SaveOptions
from lightning_quant.layers.registry import (
    dtype_from_name,
    dtype_name,
    layer_config,
    layer_from_config,
    quantized_layers,
)
from lightning_quant.targets import is_linear_like, linear_weight, set_submodule

__all__ = ["NAME", "NATIVE", "QUANT_FILE", "VERSION", "NativeOptions", "read_metadata"]

NAME = "lightning-quant"
VERSION = 2
QUANT_FILE = "quantization.json"
_KEY = "lightning_quant_export"


@dataclass(frozen=True)
class NativeOptions:
    """Options of ``format="lightning-quant"`` (``export.save(..., options={...})``; the CLI fills them).

    Args:
        method: the method that quantized the model (``"gptq"``, ...), recorded as ``quantization.json``'s
            ``method``; ``None`` when unknown.
        figures: ``{layer name: {figure name: float}}``, the method's per-layer figures (``gptq_loss``,
            ``awq_ratio``, ...), written next to each layer's config. Every name must be a quantized layer of
            the saved model. Ints are stored as floats.
    """

    method: str | None = None
    figures: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method is not None and (not isinstance(self.method, str) or not self.method):
            raise ValueError(f"NativeOptions.method must be a non-empty str (the method's name) or None, "
                             f"got {self.method!r}.")
        object.__setattr__(self, "figures", _checked_figures(self.figures))


def _checked_figures(figures: Any) -> dict[str, dict[str, float]]:
    """``figures`` as plain ``{str: {str: float}}``; raises naming the first entry of another shape."""
    if not isinstance(figures, Mapping):
        raise TypeError(f"NativeOptions.figures must be a dict {{layer name: {{figure: float}}}}, "
                        f"got {type(figures).__name__}.")
    out = {}
    for layer, figs in figures.items():
        if not isinstance(layer, str) or not isinstance(figs, Mapping):
            raise TypeError(f"NativeOptions.figures maps layer names to {{figure: float}} dicts; got "
                            f"{layer!r}: {type(figs).__name__}.")
        bad = {k: v for k, v in figs.items()
               if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ValueError(f"NativeOptions.figures[{layer!r}] holds non-numeric figures {bad!r}; figures are "
                             "floats (convert tensors with float(), leave out flags and objects).")
        out[layer] = {k: float(v) for k, v in figs.items()}
    return out


# ---- save ------------------------------------------------------------------------------
def _save(model: nn.Module, directory: Path, options: SaveOptions) -> None:
    opts = options.format_options or NativeOptions()
    dtype = options.dtype or model_dtype(model)
    cfg = config_dict(model, dtype)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"The model has no quantized layers to export as {NAME!r}; quantize it first "
                         "(lightning_quant.quantize_model or a PTQ/QAT callback).")
    unknown = sorted(set(opts.figures) - set(layers))
    if unknown:
        raise ValueError(f"NativeOptions.figures names {unknown[:4]}, which are not quantized layers of the model; "
                         f"pass figures only for quantized layers (e.g. {next(iter(layers))!r}).")
    configs = {name: layer_config(m) for name, m in layers.items()}
    state = model.state_dict() if options.full_state is None else options.full_state
    prefixes = tuple(name + "." for name in layers)
    tensors: dict[str, Tensor] = {k: t for k, t in state.items() if k.startswith(prefixes)}  # as stored, never cast
    tensors.update(plain_tensors(model, layers, options.dtype, options.full_state))
    meta = {"format": NAME, "version": VERSION, "method": opts.method, "spec": _shared_spec(configs, opts.method),
            "dtype": dtype_name(dtype),
            "layers": {name: {**c, "figures": opts.figures.get(name, {})} for name, c in configs.items()}}
    cfg[_KEY] = {"format": NAME, "file": QUANT_FILE}
    io.write_tensors(directory, tensors, options.max_shard_bytes)
    io.write_json(directory / QUANT_FILE, meta)
    io.write_json(directory / "config.json", cfg)


def _shared_spec(configs: dict[str, dict], method: str | None) -> dict | None:
    """The spec dict every layer carries; for layers that carry none (LLM.int8), the method's fixed spec;
    ``None`` when they differ."""
    specs = [c.get("spec") for c in configs.values()]
    if specs[0] is not None and all(s == specs[0] for s in specs):
        return specs[0]
    if all(s is None for s in specs) and method is not None:
        from lightning_quant.methods.registry import get_method

        try:
            fixed = get_method(method).fixed_spec
        except ValueError:  # a method of the caller's own, not registered: nothing to record
            return None
        return None if fixed is None else fixed.to_dict()
    return None


# ---- load ------------------------------------------------------------------------------
def read_metadata(directory: str | Path) -> dict:
    """``quantization.json`` of a ``lightning-quant`` directory in the version-2 shape (version 1 translated).

    Raises ``ValueError`` for another format, an unknown version or a malformed file.
    """
    path = Path(directory) / QUANT_FILE
    meta = io.read_json(path)
    if meta.get("format") != NAME:
        raise ValueError(f"{str(path)!r} is not a {NAME} file (format={meta.get('format')!r}); "
                         "load other exports with lightning_quant.export.load.")
    reader = _READERS.get(meta.get("version"))
    if reader is None:
        raise ValueError(f"{str(path)!r} is {NAME} version {meta.get('version')!r}; this lightning_quant reads "
                         f"versions {sorted(_READERS)}. Upgrade lightning_quant to read it.")
    if not isinstance(meta.get("layers"), dict) or not isinstance(meta.get("dtype"), str):
        # the file's content is wrong (a corrupted export), not an argument's type
        raise ValueError(f"{str(path)!r} lacks 'layers' (a dict) or 'dtype' (a str); the export is corrupted — "  # noqa: TRY004
                         "re-export it.")
    return reader(meta)


def _v1_packed(info: dict, meta: dict) -> dict:
    return {"kind": "packed", "in_features": info["in_features"], "out_features": info["out_features"],
            "bias": info["bias"], "dtype": meta["dtype"], "spec": meta["spec"], "act_order": info["act_order"],
            "act_spec": None, "input_scale": info.get("input_scale", False)}


def _v1_int8(info: dict, meta: dict) -> dict:
    threshold = info.get("figures", {}).get("threshold")
    return {"kind": "int8", "in_features": info["in_features"], "out_features": info["out_features"],
            "bias": info["bias"], "dtype": meta["dtype"],
            **({} if threshold is None else {"threshold": float(threshold)})}


#: version-1 ``kind`` (the class name; absent in the first files: packed) -> the version-2 layer config
_V1_KINDS: dict[str, Callable[[dict, dict], dict]] = {"PackedLinear": _v1_packed, "Int8OutlierLinear": _v1_int8}


def _from_v1(meta: dict) -> dict:
    layers = {}
    for name, info in meta["layers"].items():
        kind = info.get("kind", "PackedLinear")
        if kind not in _V1_KINDS:
            raise ValueError(f"Layer {name!r} of a {NAME} version-1 file has kind {kind!r}; version 1 knows "
                             f"{sorted(_V1_KINDS)}. The file is corrupted — re-export it.")
        try:
            layers[name] = {**_V1_KINDS[kind](info, meta), "figures": dict(info.get("figures", {}))}
        except KeyError as e:
            raise ValueError(f"Layer {name!r} of a {NAME} version-1 file lacks {e}; the file is corrupted — "
                             "re-export it.") from None
    return {**meta, "version": VERSION, "layers": layers}


_READERS: dict[int, Callable[[dict], dict]] = {1: _from_v1, 2: lambda meta: meta}


def _build_model(config: dict, dtype: torch.dtype) -> nn.Module:
    """The (untrained) causal LM ``config.json`` describes, in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in (_KEY, "quantization_config")}
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json lacks 'model_type'; cannot rebuild the model. The export is corrupted.")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype)


def _swap_in(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Replace the model's float linear ``name`` by ``layer`` (same ``[out, in]``)."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{QUANT_FILE} has a quantized layer {name!r} that {type(model).__name__} lacks; "
                         "config.json and quantization.json do not match.") from None
    if not is_linear_like(target):
        raise ValueError(f"{QUANT_FILE} quantizes {name!r}, but the model's {name!r} is a {type(target).__name__}.")
    shape = (layer.out_features, layer.in_features)
    if tuple(linear_weight(target).shape) != shape:
        raise ValueError(f"{QUANT_FILE} gives layer {name!r} [out, in] = {shape}, but the model's is "
                         f"{tuple(linear_weight(target).shape)}; config.json and quantization.json do not match.")
    set_submodule(model, name, layer)


def _load(directory: Path, config: dict) -> nn.Module:
    meta = read_metadata(directory)
    model = _build_model(config, dtype_from_name(meta["dtype"]))
    for name, entry in meta["layers"].items():
        _swap_in(model, name, layer_from_config({k: v for k, v in entry.items() if k != "figures"}))
    load_plain(model, io.read_tensors(directory), quantized=set())
    return model.eval()


def _detect(config: dict) -> bool:
    return isinstance(config.get(_KEY), dict) and config[_KEY].get("format") == NAME


NATIVE = ExportFormat(name=NAME, save=_save, load=_load, detect=_detect, options=NativeOptions, marker_file=QUANT_FILE)
