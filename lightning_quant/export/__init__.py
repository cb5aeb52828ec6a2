"""Export quantized models to formats real inference stacks load, and load them back.

``save(model, path, format=...)`` writes an HF-style directory (``gptq``, ``gptq_v2``, ``awq``,
``compressed-tensors``, ``int8``), an ONNX decoder with a KV cache that onnxruntime-genai generates with
(``onnx``), a llama.cpp GGUF file (``gguf``) or our own layout that keeps every layer setting
(``lightning-quant``, the CLI's default) atomically; ``load(path)`` reads any of them back (safetensors
and JSON only, never pickle). See ``docs/formats.md``.
"""

from __future__ import annotations

from lightning_quant.export.registry import (
    ExportFormat,
    SaveOptions,
    available_formats,
    detect_format,
    format_options,
    get_format,
    register_format,
)
from lightning_quant.export.saving import from_pretrained, load, save

__all__ = [
    "ExportConfig",
    "ExportFormat",
    "SaveOptions",
    "available_formats",
    "detect_format",
    "export_after_fit",
    "format_options",
    "from_pretrained",
    "get_format",
    "load",
    "register_format",
    "save",
]


def __getattr__(name: str):
    if name in ("ExportConfig", "export_after_fit"):
        from lightning_quant.export import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'lightning_quant.export' has no attribute {name!r}")
