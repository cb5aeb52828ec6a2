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
symmetric, float32 scales), ``q = codes + 128`` and ``s = SCB / 127``; ``extras["SCB"]`` keeps the exact
row absmax so the layer can be rebuilt bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant import primitives as P
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec

__all__ = [
    "DEFAULT_THRESHOLD",
    "INT8_ROWWISE",
    "MAX_OUTLIER_COLUMNS",
    "absmax_quantize_rows",
    "check_threshold",
    "int8_outlier_matmul",
    "int8_rowwise",
    "int8_rowwise_quantize",
    "outlier_columns",
    "outlier_statistics",
    "rowwise_to_quantized",
]

#: The :class:`QuantSpec` of a row-wise absmax int8 weight (codes offset by the implicit zero 128).
INT8_ROWWISE = QuantSpec(bits=8, group_size=-1, symmetric=True, scale_dtype="float32")
#: Lightning's and the paper's outlier threshold (bitsandbytes' own default is 0.0).
DEFAULT_THRESHOLD = 6.0
#: Width of the float outlier path of :func:`int8_outlier_matmul` (static, so no host sync decides it);
#: the paper reports at most a few dozen outlier feature dimensions per layer up to 13B parameters.
MAX_OUTLIER_COLUMNS = 128
_TINY = torch.finfo(torch.float32).tiny


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
    codes = torch.round(xf * 127.0 / absmax.clamp_min(_TINY).unsqueeze(1)).clamp_(-127, 127)
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
    qw = QuantizedWeight(codes=(codes.to(torch.int16) + 128).to(torch.uint8), scales=scales, zeros=None,
                         spec=INT8_ROWWISE, dtype=dtype)
    qw.extras["SCB"] = scb.float().clone()
    return qw


def int8_rowwise_quantize(weight: Tensor, name: str = "weight") -> QuantizedWeight:
    """Row-wise absmax int8 quantization of ``weight [out, in]`` as a :class:`QuantizedWeight`."""
    codes, scb = int8_rowwise(weight, name)
    return rowwise_to_quantized(codes, scb, weight.dtype)


def outlier_columns(x: Tensor, threshold: float) -> Tensor:
    """Bool ``[in]``: feature columns of ``x [M, in]`` with ``|x| > threshold`` in any row (none when 0)."""
    if threshold == 0.0:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return (x.abs() > threshold).any(dim=0)


def int8_outlier_matmul(x: Tensor, codes: Tensor, scb: Tensor, threshold: float,
                        max_outliers: int = MAX_OUTLIER_COLUMNS) -> tuple[Tensor, Tensor]:
    """LLM.int8 product ``x [M, in] @ W^T`` for ``W = codes * SCB / 127``: returns ``(y float32 [M, out], outliers [in])``.

    ``y = X_o W_o^T + (round(X_r·127/a) @ codes_r^T) · a/127 · SCB/127`` where ``o`` are the outlier
    columns (float path with dequantized weights) and ``r`` the rest (int8 x int8 -> int32 through
    :func:`lightning_quant.kernels.int8_matmul.int8_matmul`, ``a`` the per-token absmax of ``X_r``).

    Without a host sync: the float path has a static width of ``min(in, max_outliers)`` columns
    (``nonzero_static``; unused slots multiply zeros), so no ``bool(outliers.any())`` waits for the
    GPU. Outlier columns beyond the first ``max_outliers`` (in feature order) stay on the int8 path;
    ``outliers`` still marks every column above the threshold.
    """
    from lightning_quant.kernels.int8_matmul import int8_matmul

    xf = x.float()
    outliers = outlier_columns(xf, threshold)
    width = min(x.shape[-1], max_outliers) if threshold > 0.0 else 0
    if width:
        kept = outliers & (torch.cumsum(outliers, 0) <= width)  # [in]: the first `width` outlier columns
        idx = torch.nonzero_static(kept, size=width, fill_value=0).squeeze(1)  # [width], padded with column 0
        valid = torch.arange(width, device=x.device) < kept.sum()  # [width]: False on the padding
        x_o = xf.index_select(1, idx) * valid  # [M, width]
        x_rest = xf.masked_fill(kept, 0.0)
    else:
        x_rest = xf
    a_codes, a_absmax = absmax_quantize_rows(x_rest)  # [M, in] int8, [M]
    acc = int8_matmul(a_codes, codes)  # [M, out] int32
    y = acc.float() * (a_absmax / 127.0).unsqueeze(1) * (scb.float() / 127.0).unsqueeze(0)
    if width:
        w_o = codes.index_select(1, idx).float() * (scb.float() / 127.0).unsqueeze(1)  # [out, width]
        y = y + x_o @ w_o.t()
    return y, outliers


@torch.no_grad()
def outlier_statistics(model: nn.Module, targets: dict[str, nn.Module], batches, threshold: float,
                       forward=None) -> dict[str, dict[str, float]]:
    """Outlier statistics of the inputs of ``targets`` over ``batches`` (float model, before conversion).

    For each layer: ``outlier_columns`` (mean number of input columns per batch that would take the
    float path), ``outlier_fraction`` (that number / in_features) and ``max_abs`` (largest |input|).
    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    threshold = check_threshold(threshold)
    stats = {n: {"outlier_columns": 0.0, "outlier_fraction": 0.0, "max_abs": 0.0} for n in targets}
    seen = {n: 0 for n in targets}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            P.check_finite(x, f"input of {name}")
            n_out = int(outlier_columns(x, threshold).sum())
            s = stats[name]
            s["outlier_columns"] += n_out
            s["outlier_fraction"] += n_out / x.shape[-1]
            s["max_abs"] = max(s["max_abs"], float(x.abs().max()) if x.numel() else 0.0)
            seen[name] += 1
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        n_batches = 0
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("outlier_statistics got no batches; pass at least one batch of token ids.")
    for n, s in stats.items():
        k = max(seen[n], 1)
        s["outlier_columns"] /= k
        s["outlier_fraction"] /= k
    return stats
