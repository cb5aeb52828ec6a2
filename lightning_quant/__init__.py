"""lightning-quant: LLM quantization as part of an ordinary PyTorch Lightning run.

Public vocabulary: :class:`QuantSpec` / :class:`ActivationSpec` (how), :class:`QuantizedWeight`
(the result), :func:`quantize_model` (standalone PTQ). Submodules: ``primitives``, ``packing``,
``algorithms``, ``layers``, ``kernels``, ``qat``, ``calibration``, ``callbacks``, ``plugins``, ``export``.
"""

from lightning_quant.api import quantize_model
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec

__version__ = "0.1.0"
__all__ = ["ActivationSpec", "QuantSpec", "QuantizedWeight", "__version__", "quantize_model"]
