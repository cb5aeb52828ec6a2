"""Quantization algorithms: tensors and specs in, :class:`QuantizedWeight` out. No Lightning.

Model-level methods are registered by name in :data:`METHODS` (used by
:func:`lightning_quant.quantize_model`, the callbacks and the CLI).
"""

from lightning_quant.algorithms.registry import METHODS, register_method
from lightning_quant.algorithms.rtn import rtn_quantize

__all__ = ["METHODS", "register_method", "rtn_quantize"]
