"""Export formats by name: ``format -> (save, load, detect)``.

Built-in formats are imported on first use (no import-time work); others can be added with
:func:`register_format`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["ExportFormat", "SaveOptions", "available_formats", "detect_format", "format_options", "get_format",
           "register_format"]


@dataclass(frozen=True)
class SaveOptions:
    """Options every format receives.

    Args:
        dtype: cast the non-quantized floating tensors (embeddings, norms, biases, ``lm_head``) to
            this dtype (``None`` keeps the model's own); the config records it.
        max_shard_bytes: ``model.safetensors`` is split into shards above this size.
        full_state: the model's full state dict, for a model whose own ``state_dict()`` is sharded (FSDP:
            gathered by :func:`lightning_quant.calibration.distributed.full_state_dict`); ``None`` reads
            the model's.
        tokenizer: the tokenizer passed to :func:`~lightning_quant.export.save` (its files are written by
            ``save`` itself); a format may read it (its vocabulary, special ids) or require it.
        format_options: the format's own options, an instance of :attr:`ExportFormat.options`
            (``None`` for a format without options), built by :func:`format_options`.
    """

    dtype: Any = None
    max_shard_bytes: int = 5 * 1024**3
    full_state: dict | None = None
    tokenizer: Any = None
    format_options: Any = None

    def __post_init__(self) -> None:
        import torch

        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype (torch.float16, ...) or None, got {self.dtype!r}.")
        if isinstance(self.max_shard_bytes, bool) or not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {self.max_shard_bytes!r}.")


@dataclass(frozen=True)
class ExportFormat:
    """A named on-disk format.

    Attributes:
        name: the ``format=`` spelling.
        save: ``(model, directory, options) -> None`` writes into an (empty, temporary) directory.
        load: ``(directory, config) -> model`` reads it back (``config`` is the parsed config.json).
        detect: ``(config) -> bool``, True when ``config.json`` describes this format.
        options: optional frozen dataclass of the format's own options (validated in its ``__post_init__``);
            ``save(..., options={...})`` builds it from a dict (:func:`format_options`).
        needs_tokenizer: the format embeds the vocabulary, so ``save`` (and ``ExportConfig``) require a tokenizer.
        holds_adapters: an engine reading the format also applies peft adapters written next to it; False
            (``gguf``: llama.cpp runs the one file) makes ``save`` refuse a model with kept (unmerged) adapters.
        marker_file: a file whose presence identifies the format in a directory whose ``config.json`` no
            format's ``detect`` accepts (``lightning-quant`` version 1: a plain HF config next to
            ``quantization.json``); ``None``: ``detect`` alone decides.
    """

    name: str
    save: Callable[[nn.Module, Path, SaveOptions], None]
    load: Callable[[Path, dict], Any]
    detect: Callable[[dict], bool]
    options: type | None = None
    needs_tokenizer: bool = False
    holds_adapters: bool = True
    marker_file: str | None = None


def format_options(fmt: ExportFormat, value: Any = None) -> Any:
    """``fmt``'s options from ``None`` (its defaults), a dict of its fields, or an instance; ``None`` for a
    format without options. Unknown keys raise naming the allowed ones."""
    import dataclasses

    if fmt.options is None:
        if value:
            raise ValueError(f"Format {fmt.name!r} takes no options, got {value!r}; formats with options: "
                             f"{[n for n in available_formats() if get_format(n).options is not None]}.")
        return None
    if value is None:
        return fmt.options()
    if isinstance(value, fmt.options):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"options for format {fmt.name!r} must be a dict or {fmt.options.__name__}, got "
                        f"{type(value).__name__}.")
    allowed = [f.name for f in dataclasses.fields(fmt.options)]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for format {fmt.name!r}; its options are {allowed}.")
    return fmt.options(**value)


#: name -> "module:attribute" of the built-in formats (imported lazily)
_BUILTIN: dict[str, str] = {
    "gptq": "lightning_quant.export.gptq:GPTQ_V1",
    "gptq_v2": "lightning_quant.export.gptq:GPTQ_V2",
    "awq": "lightning_quant.export.awq:AWQ",
    "compressed-tensors": "lightning_quant.export.compressed_tensors:COMPRESSED_TENSORS",
    "int8": "lightning_quant.export.int8:INT8",
    "onnx": "lightning_quant.export.onnx:ONNX",
    "gguf": "lightning_quant.export.gguf:GGUF",
    "lightning-quant": "lightning_quant.export.native:NATIVE",
}
_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> None:
    """Add (or replace) a format."""
    if not isinstance(fmt, ExportFormat):
        raise TypeError(f"register_format takes an ExportFormat, got {type(fmt).__name__}.")
    _FORMATS[fmt.name] = fmt


def available_formats() -> list[str]:
    return sorted(set(_BUILTIN) | set(_FORMATS))


def get_format(name: str) -> ExportFormat:
    if name in _FORMATS:
        return _FORMATS[name]
    if name not in _BUILTIN:
        raise ValueError(f"Unknown export format {name!r}; available: {available_formats()}.")
    module, attr = _BUILTIN[name].split(":")
    fmt = getattr(importlib.import_module(module), attr)
    _FORMATS[name] = fmt
    return fmt


def detect_format(config: dict, directory: str | Path | None = None) -> ExportFormat:
    """The format whose ``detect`` accepts ``config`` (parsed ``config.json``), else the format whose
    :attr:`~ExportFormat.marker_file` is in ``directory`` (when given)."""
    formats = [get_format(name) for name in available_formats()]
    for fmt in formats:
        if fmt.detect(config):
            return fmt
    if directory is not None:
        for fmt in formats:
            if fmt.marker_file is not None and (Path(directory) / fmt.marker_file).is_file():
                return fmt
    qc = config.get("quantization_config")
    desc = "no quantization_config" if qc is None else f"quantization_config={_short(qc)}"
    raise ValueError(f"config.json has {desc}, which matches no known export format {available_formats()}; "
                     "was this directory written by lightning_quant.export.save?")


def _short(d: Any) -> str:
    s = repr(d)
    return s if len(s) < 200 else s[:200] + "..."
