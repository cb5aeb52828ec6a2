"""An independent GPTQ written straight from the paper, for comparing the library's solver against.

Frantar et al., "GPTQ", ICLR 2023, Algorithm 1: ``H^-1 = chol(H^-1)^T chol(H^-1)`` (upper factor
``U``), then for each column ``j``: ``q_j = quant(w_j)``, ``e = (w_j - q_j) / U_jj``,
``w_{j:} -= e U_{j, j:}`` — written with a dense float64 update (no lazy blocks, no in-place tricks,
no shared primitives), so that agreement with the library is evidence, not a tautology.

``qparams``: where each group's min-max qparams come from —
``"updated"`` (the error-updated weight when the group starts), ``"original"`` (the weight before
the sweep, as llm-compressor's observer does).
"""

from __future__ import annotations

import torch


def minmax_qparams(w: torch.Tensor, bits: int, sym: bool, scale_dtype=torch.float16):
    """Per-row ``(scale, zero)`` of ``w [out, cols]`` as GPTQ's ``Quantizer.find_params`` defines them,
    the scale rounded up to ``scale_dtype`` (so the range stays representable)."""
    maxq = 2**bits - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp_min(2.0**-20)
    if scale_dtype is not None:
        stored = scale.to(scale_dtype).to(w.dtype)
        scale = torch.where(stored < scale, torch.nextafter(stored.to(scale_dtype), torch.tensor(float("inf"),
                            dtype=scale_dtype)).to(w.dtype), stored)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool,
                   damp: float = 0.01, qparams: str = "updated"):
    """Dequantized GPTQ weight ``[out, in]`` (float64) for ``w [out, in]``, ``h [in, in]``."""
    if qparams not in ("updated", "original"):
        raise ValueError(f"qparams={qparams!r}")
    maxq = 2**bits - 1
    w = w.double().clone()
    h = h.double().clone()
    in_f = w.shape[1]
    gs = in_f if group_size == -1 else group_size
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(in_f, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    original = w.clone()
    q = torch.zeros_like(w)
    for j in range(in_f):
        if j % gs == 0:
            src = w if qparams == "updated" else original
            scale, zero = minmax_qparams(src[:, j : j + gs].float(), bits, sym)
            scale, zero = scale.double(), zero.double()
        q[:, j] = (torch.clamp(torch.round(w[:, j] / scale) + zero, 0, maxq) - zero) * scale
        e = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= torch.outer(e, u[j, j:])
    return q
