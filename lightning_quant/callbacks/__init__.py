"""Thin Lightning adapters: hooks call the library's functions; no math lives here.

Names resolve lazily (no import-time cost, no import cycles):
``from lightning_quant.callbacks import GPTQ``.
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it (one line per callback)
_EXPORTS: dict[str, str] = {
    "QuantizationAwareTraining": "lightning_quant.callbacks.qat",
    "QuantizationReport": "lightning_quant.callbacks.report",
    "PackedValidation": "lightning_quant.callbacks.packed_validation",
    "GPTQ": "lightning_quant.callbacks.gptq",
    "AWQ": "lightning_quant.callbacks.awq",
    "LLMInt8": "lightning_quant.callbacks.llm_int8",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_quant.callbacks' has no attribute {name!r}; available: {sorted(_EXPORTS)}")


def __dir__():
    return __all__
