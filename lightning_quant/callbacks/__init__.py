"""Thin Lightning adapters: hooks call the library's functions; no math lives here.

Names resolve lazily (no import-time cost, no import cycles):
``from lightning_quant.callbacks import GPTQ``.
"""

from __future__ import annotations

from lightning_quant._lazy import lazy_namespace

#: public name -> module that defines it (one line per callback)
_EXPORTS: dict[str, str] = {
    "QuantizationAwareTraining": "lightning_quant.callbacks.qat",
    "QuantizationReport": "lightning_quant.callbacks.report",
    "PackedValidation": "lightning_quant.callbacks.packed_validation",
    "GPTQ": "lightning_quant.callbacks.gptq",
    "AWQ": "lightning_quant.callbacks.awq",
    "LLMInt8": "lightning_quant.callbacks.llm_int8",
}

__all__, __getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
