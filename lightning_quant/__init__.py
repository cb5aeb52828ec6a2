"""lightning-quant: LLM quantization as part of an ordinary PyTorch Lightning run.

Public vocabulary: :class:`QuantSpec` / :class:`ActivationSpec` (how), :class:`QuantizedWeight`
(the result), :func:`quantize_model` (standalone PTQ) and :class:`Rotation` (its offline rotation option).
Submodules, lowest layer first (``lightning_quant.layering``, ``docs/architecture.md``): ``spec``,
``primitives``, ``packing``, ``quantized``, ``targets``, ``calibration``, ``algorithms``, ``kernels``,
``layers``, ``methods``, ``api``, ``qat``, ``integrations``, ``export``, ``callbacks``, ``plugins``, ``cli``. Names resolve lazily (no import-time work).
"""

from __future__ import annotations

from lightning_quant._lazy import lazy_namespace

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ActivationSpec": "lightning_quant.spec",
    "QuantSpec": "lightning_quant.spec",
    "QuantizedWeight": "lightning_quant.quantized",
    "Rotation": "lightning_quant.methods.rotation",
    "quantize_model": "lightning_quant.api",
}

__all__ = ["ActivationSpec", "QuantSpec", "QuantizedWeight", "Rotation", "__version__", "quantize_model"]
_, __getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
