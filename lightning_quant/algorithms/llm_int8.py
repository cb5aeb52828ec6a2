"""LLM.int8() maths (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale"), pure tensors, no Lightning.

* Weights: *vector-wise* (per output row) absmax quantization, eq. (1) of the paper applied per row:
  ``codes = round(W * 127 / absmax_row)`` in ``[-127, 127]``, ``SCB = absmax_row`` (bitsandbytes' name).
* Activations: per-token absmax, ``round(x * 127 / absmax_token)``.
* Mixed-precision decomposition (section 3.2): input feature columns whose magnitude exceeds a
  threshold in *any* token of the batch are multiplied in float with their dequantized weight
  columns; all other columns go through the int8 x int8 -> int32 product.

In the project's :class:`~lightning_quant.quantized.QuantizedWeight` convention (unsigned codes,
``w = (q - z) * s``) a row-wise int8 weight is ``spec = INT8_ROWWISE`` (8 bits, per channel,
symmetric, float32 scales), ``q = codes + 128`` and ``s = SCB / 127``; the ``"int8"`` method keeps the
exact row absmax beside it (:class:`~lightning_quant.methods.llm_int8.Int8Layer`) so the layer is rebuilt
bit for bit. The layer's forward (the decomposition) is :func:`lightning_quant.kernels.int8_matmul.int8_outlier_linear`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec

__all__ = [
    "ABSMAX_FLOOR",
    "DEFAULT_THRESHOLD",
    "INT8_ROWWISE",
    "absmax_quantize_rows",
    "check_threshold",
    "int8_rowwise",
    "int8_rowwise_quantize",
    "outlier_columns",
    "rowwise_to_quantized",
]

#: The :class:`QuantSpec` of a row-wise absmax int8 weight (codes offset by the implicit zero 128).
INT8_ROWWISE = QuantSpec(bits=8, group_size=-1, symmetric=True, scale_dtype="float32")
#: Lightning's and the paper's outlier threshold (bitsandbytes' own default is 0.0).
DEFAULT_THRESHOLD = 6.0
#: Floor of the absmax divisor of :func:`absmax_quantize_rows` (an all-zero row divides by it, giving codes 0);
#: the activation-quantization kernel uses the same value.
ABSMAX_FLOOR = torch.finfo(torch.float32).tiny


def check_threshold(threshold: float) -> float:
    """Validate an outlier threshold (a finite number >= 0; 0 disables the outlier path)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number >= 0 (e.g. 6.0, or 0 for pure W8A8), got {threshold!r}.")
    t = float(threshold)
    if not (t >= 0.0 and t != float("inf")):
        raise ValueError(f"threshold={threshold!r} is invalid; use a finite value >= 0 (6.0 is the LLM.int8 default, "
                         "0 disables the outlier path).")
    return t


def absmax_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 per row of ``x [R, C]``: ``(codes int8 [R, C], absmax float32 [R])``.

    ``codes = round(x * 127 / absmax)``; an all-zero row gets codes 0 (its absmax is 0).
    """
    xf = x.detach().float()
    absmax = xf.abs().amax(dim=1)  # [R]
    codes = torch.round(xf * 127.0 / absmax.clamp_min(ABSMAX_FLOOR).unsqueeze(1)).clamp_(-127, 127)
    return codes.to(torch.int8), absmax


def int8_rowwise(weight: Tensor, name: str = "weight") -> tuple[Tensor, Tensor]:
    """Row-wise int8 codes ``[out, in]`` and ``SCB`` (row absmax, float32 ``[out]``) of ``weight [out, in]``."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: LLM.int8 takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    P.check_finite(weight, name)
    return absmax_quantize_rows(weight)


def rowwise_to_quantized(codes: Tensor, scb: Tensor, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Express int8 row-wise codes as a :class:`QuantizedWeight` (``q = codes + 128``, ``s = SCB / 127``)."""
    scales = (scb.float() / 127.0).unsqueeze(1)  # [out] -> [out, 1]
    return QuantizedWeight(codes=(codes.to(torch.int16) + 128).to(torch.uint8), scales=scales, zeros=None,
                           spec=INT8_ROWWISE, dtype=dtype)


def int8_rowwise_quantize(weight: Tensor, name: str = "weight") -> QuantizedWeight:
    """Row-wise absmax int8 quantization of ``weight [out, in]`` as a :class:`QuantizedWeight`."""
    codes, scb = int8_rowwise(weight, name)
    return rowwise_to_quantized(codes, scb, weight.dtype)


def outlier_columns(x: Tensor, threshold: float) -> Tensor:
    """Bool ``[in]``: feature columns of ``x [M, in]`` with ``|x| > threshold`` in any row (none when 0)."""
    if threshold == 0.0:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return (x.abs() > threshold).any(dim=0)
