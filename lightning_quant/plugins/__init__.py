"""Lightning plugins (precision, checkpoint IO).

Names resolve lazily (no import-time cost, no import cycles):
``from lightning_quant.plugins import QuantizationPrecision``.
"""

from __future__ import annotations

from lightning_quant._lazy import lazy_namespace

#: public name -> module that defines it (one line per callback)
_EXPORTS: dict[str, str] = {
    "QuantizationPrecision": "lightning_quant.plugins.precision",
    "QuantizedCheckpointIO": "lightning_quant.plugins.checkpoint_io",
}

__all__, __getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
