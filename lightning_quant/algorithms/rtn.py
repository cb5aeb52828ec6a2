"""Round-to-nearest (RTN): min-max qparams per group, then round. The baseline every other
method must beat, and the quantizer GPTQ falls back to when its Cholesky factorisation fails."""

from __future__ import annotations

from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec

__all__ = ["rtn_quantize"]


def rtn_quantize(weight: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0, name: str = "weight") -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with per-group min-max qparams (optionally shrunk by ``clip``).

    Per element, ``|dequantize(q) − w| <= s/2`` for every ``w`` inside the (clipped) range.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: RTN takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    P.check_finite(weight, name)
    scales, zeros = P.compute_qparams(weight, spec, clip=clip)
    return QuantizedWeight.from_float(weight, spec, scales, zeros)
