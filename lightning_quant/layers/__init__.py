"""Quantized layers built from :class:`~lightning_quant.quantized.QuantizedWeight`."""

from lightning_quant.layers.packed import PackedLinear

__all__ = ["PackedLinear"]
