"""Quantization solvers: tensors and specs in, :class:`QuantizedWeight` out. No Lightning, no model surgery.

Model-level methods (the drivers that feed these solvers from a model and swap layers) live in
:mod:`lightning_quant.methods`, registered by name in :data:`lightning_quant.methods.METHODS`.
"""

from lightning_quant.algorithms.rtn import rtn_quantize

__all__ = ["rtn_quantize"]
