"""Lightning plugins (precision, checkpoint IO).

Names resolve lazily (no import-time cost, no import cycles):
``from lightning_quant.plugins import QuantizationPrecision``.
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it (one line per callback)
_EXPORTS: dict[str, str] = {
    "QuantizationPrecision": "lightning_quant.plugins.precision",
    "QuantizedCheckpointIO": "lightning_quant.plugins.checkpoint_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_quant.plugins' has no attribute {name!r}; available: {sorted(_EXPORTS)}")


def __dir__():
    return __all__
