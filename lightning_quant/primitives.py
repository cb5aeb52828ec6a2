"""Pure tensor functions that every quantizer in the project goes through.

Shapes: a weight is ``[out, in]``; per-group parameters are ``[out, G]`` with
``G = spec.num_groups(in)``; ``g_idx`` is ``[in]`` and maps each input column to its group.
Conventions (code range, scale formula, partial last group) are documented in
:mod:`lightning_quant.spec`.

One formula per concept, each in one place:

* codes: :func:`round_codes` ``clamp(round(x/s) + z, 0, qmax)`` — RTN/GPTQ/AWQ's real quant, the min-max
  grid searches, and (through its two halves) the forward of :class:`_FakeQuantizeSTE`, the only rounding
  with a straight-through gradient, which QAT's fake quant uses; so fake and real quant compute identical
  codes from the same float32 operands;
* values: :func:`dequantize_codes` ``(q − z)·s`` — :func:`dequantize` (and through it
  ``QuantizedWeight.dequantize`` and the kernels' pure-torch reference), fake quant, GPTQ's solver;
* the implicit symmetric zero: :func:`zeros_or_midpoint` ``2^(b−1)``;
* scale rounding to ``spec.scale_dtype``: :func:`round_scale_up` (min-max qparams: the range stays
  inside the grid) and :func:`round_scale_nearest` (learned LSQ scales).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant.spec import ActivationSpec, QParamSearch, QuantSpec

__all__ = [
    "SCALE_EPS",
    "activation_qparams",
    "check_finite",
    "compute_qparams",
    "default_group_index",
    "dequantize",
    "dequantize_codes",
    "expand_groups",
    "fake_quantize",
    "fake_quantize_activation",
    "fake_quantize_minmax",
    "group_minmax",
    "qparams_from_minmax",
    "quantize",
    "quantize_activation",
    "round_codes",
    "round_scale_nearest",
    "round_scale_up",
    "search_clip",
    "zeros_or_midpoint",
]

#: Smallest scale we ever produce. Exactly representable in float16, so rounding scales to
#: float16 never produces 0 (which would turn codes into inf / NaN).
SCALE_EPS = 2.0**-20


def check_finite(t: Tensor, what: str) -> None:
    """Raise ``ValueError`` when ``t`` holds NaN or Inf, naming ``what`` (a layer or tensor)."""
    if not torch.isfinite(t).all():
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{what} contains {n_bad} NaN/Inf value(s); quantization needs finite values. "
            "Check the checkpoint / training run for divergence before quantizing."
        )


def default_group_index(in_features: int, spec: QuantSpec, device=None) -> Tensor:
    """``g_idx[j] = j // group_size`` (all zeros per channel). Shape ``[in]``, int64."""
    gs = spec.effective_group_size(in_features)
    return torch.arange(in_features, device=device) // gs


def expand_groups(t: Tensor, g_idx: Tensor) -> Tensor:
    """``[out, G] -> [out, in]`` by gathering each column's group parameter."""
    return t.index_select(1, g_idx.to(device=t.device, dtype=torch.long))


def group_minmax(w: Tensor, spec: QuantSpec, g_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-group ``(min, max)`` of ``w [out, in]`` as float32 ``[out, G]``.

    Works for any grouping, including a partial last group and act-order ``g_idx``.
    """
    out_f, in_f = w.shape
    g_idx = default_group_index(in_f, spec, w.device) if g_idx is None else g_idx.to(w.device).long()
    n_groups = int(g_idx.max()) + 1
    wf = w.detach().float()
    idx = g_idx.unsqueeze(0).expand(out_f, in_f)
    lo = torch.full((out_f, n_groups), float("inf"), dtype=torch.float32, device=w.device).scatter_reduce(1, idx, wf, "amin")
    hi = torch.full((out_f, n_groups), float("-inf"), dtype=torch.float32, device=w.device).scatter_reduce(1, idx, wf, "amax")
    return lo, hi


def round_scale_up(scale: Tensor, spec: QuantSpec) -> Tensor:
    """Clamp ``scale`` (any shape) to :data:`SCALE_EPS` and round it *up* to ``spec.scale_dtype``
    (returned as float32): the smallest storable value ``>= scale``.

    Used for min-max qparams (:func:`qparams_from_minmax`): a scale rounded up keeps every value of
    the range inside the grid, so each element's rounding error stays within ``s / 2``.
    """
    scale = scale.float().clamp_min(SCALE_EPS)
    stored = scale.to(spec.torch_scale_dtype)
    bumped = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.float() < scale, bumped, stored).float()


def round_scale_nearest(scale: Tensor, spec: QuantSpec) -> Tensor:
    """Clamp ``scale`` (any shape) to :data:`SCALE_EPS` and round it to the *nearest* value of
    ``spec.scale_dtype`` (returned as float32, never below :data:`SCALE_EPS`).

    Used for learned scales (LSQ, :class:`~lightning_quant.observers.LearnableScaleObserver`): they have
    no range to keep inside the grid, and round-to-nearest (the cast's own rounding) moves a trained
    scale the least, while the straight-through estimator around it passes the gradient unchanged.
    """
    return scale.float().clamp_min(SCALE_EPS).to(spec.torch_scale_dtype).float().clamp_min(SCALE_EPS)


def _zero_point(lo: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Asymmetric zero ``clamp(round(−lo / s), 0, qmax)`` of a range ``[lo, hi] ∋ 0`` (integer-valued float32)."""
    return torch.clamp(torch.round(-lo / scale), 0, qmax)


def qparams_from_minmax(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Scales and zero points from per-group ranges.

    Symmetric: ``s = 2·max(|lo|, |hi|) / (2^b − 1)``, zero implicit (``None``).
    Asymmetric: the range is widened to contain 0, ``s = (hi − lo) / (2^b − 1)``,
    ``z = clamp(round(−lo / s), 0, 2^b − 1)`` as float32 integers.
    Scales are float32 holding values exactly representable in ``spec.scale_dtype``, rounded up
    (:func:`round_scale_up`).
    """
    lo, hi = lo.float(), hi.float()
    if spec.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        return round_scale_up(2.0 * absmax / spec.qmax, spec), None
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = round_scale_up((hi - lo) / spec.qmax, spec)
    return scale, _zero_point(lo, scale, spec.qmax)


def compute_qparams(
    w: Tensor, spec: QuantSpec, g_idx: Tensor | None = None, clip: Tensor | float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """Min-max qparams of ``w [out, in]``; ``clip`` (scalar or ``[out, G]``) shrinks the range."""
    spec.check_in_features(w.shape[1])
    lo, hi = group_minmax(w, spec, g_idx)
    return qparams_from_minmax(lo * clip, hi * clip, spec)


def _grouped(w: Tensor, spec: QuantSpec) -> Tensor:
    """``w [out, in] -> [out, G, gs]`` float32, the partial last group zero-padded (zeros change no
    group's qparams, since ranges always contain 0, and quantize to exactly 0)."""
    out_f, in_f = w.shape
    gs = spec.effective_group_size(in_f)
    n_groups = spec.num_groups(in_f)
    return torch.nn.functional.pad(w.float(), (0, n_groups * gs - in_f)).view(out_f, n_groups, gs)


def fake_quantize_minmax(w: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> Tensor:
    """``dequantize(quantize(w))`` of ``w [out, in]`` with min-max qparams shrunk by ``clip`` (scalar or
    ``[out, G]``).

    The same values as :func:`compute_qparams` + :func:`fake_quantize` (same qparam formula, same
    elementwise float32 ops), computed on a ``[out, G, gs]`` view instead of gathers, because grid
    searches call it many times per layer.
    """
    out_f, in_f = w.shape
    wg = _grouped(w, spec)  # [out, in] -> [out, G, gs]
    clip = clip.unsqueeze(-1) if isinstance(clip, Tensor) else clip
    scale, zero = qparams_from_minmax(wg.amin(-1, keepdim=True) * clip, wg.amax(-1, keepdim=True) * clip, spec)
    zero = zeros_or_midpoint(zero, scale, spec)  # [out, G, 1]
    q = round_codes(wg, scale, zero, spec.qmax)
    return dequantize_codes(q, scale, zero).view(out_f, -1)[:, :in_f]  # [out, G, gs] -> [out, in]


def _group_blocks(h: Tensor, in_f: int, gs: int) -> Tensor:
    """Diagonal blocks of ``h [in, in]`` per weight group, zero-padded: ``[G, gs, gs]``."""
    n_groups = -(-in_f // gs)
    pad = n_groups * gs - in_f
    hp = torch.nn.functional.pad(h.float(), (0, pad, 0, pad))  # [G·gs, G·gs]
    idx = torch.arange(n_groups, device=h.device)
    return hp.view(n_groups, gs, n_groups, gs)[idx, :, idx, :]  # [G, gs, gs]


def search_clip(w: Tensor, spec: QuantSpec, search: QParamSearch, hessian: Tensor | None = None) -> Tensor:
    """Per-(row, group) shrink factor ``[out, G]`` of ``w [out, in]`` minimising ``search.objective``.

    ``"weight"``: ``Σ_group |w − Q_c(w)|^norm``; ``"hessian"``: ``d H_g d^T`` with ``d = w − Q_c(w)`` on
    the group and ``H_g`` the group's diagonal block of ``hessian [in, in]``. Ties keep the larger ``c``
    (``c = 1``, min-max, is tried first). Pass the result as ``clip`` to :func:`compute_qparams`.
    """
    out_f, in_f = w.shape
    spec.check_in_features(in_f)
    if search.objective == "hessian":
        if hessian is None or tuple(hessian.shape) != (in_f, in_f):
            raise ValueError(f"QParamSearch(objective='hessian') needs the layer's Hessian [in, in] = [{in_f}, {in_f}]"
                             f"{'' if hessian is None else f', got {tuple(hessian.shape)}'}; it exists only with "
                             "calibration data (GPTQ / AWQ): use objective='weight' for RTN.")
        blocks = _group_blocks(hessian, in_f, spec.effective_group_size(in_f))  # [G, gs, gs]
    n_groups = spec.num_groups(in_f)
    wg = _grouped(w, spec)
    best_err = torch.full((out_f, n_groups), float("inf"), dtype=torch.float32, device=w.device)
    best = torch.ones(out_f, n_groups, dtype=torch.float32, device=w.device)
    for c in search.ratios:
        d = wg - _grouped(fake_quantize_minmax(w, spec, clip=c), spec)  # [out, G, gs]
        if search.objective == "hessian":
            err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        else:
            err = d.abs().pow(search.norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best


def zeros_or_midpoint(zero: Tensor | None, like: Tensor, spec: QuantSpec | ActivationSpec) -> Tensor:
    """The zero points to compute with, float32: ``zero`` itself, or — symmetric codes, ``zero is None`` —
    the implicit ``z = 2^(bits−1)`` (``spec.midpoint``) in the shape and on the device of ``like``.

    ``like`` is usually the matching scales (``[out, G]``, ``[out, 1]``, ``[..., 1]``); a 0-dim ``like``
    gives a scalar that broadcasts over any ``[out, in]`` without materialising it.
    """
    if zero is not None:
        return zero.float()
    return torch.full_like(like, float(spec.midpoint), dtype=torch.float32)


def _nearest_codes(x: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """``round(x / s) + z``: the nearest grid point before the clamp (first half of :func:`round_codes`)."""
    return torch.round(x / s) + z


def _clamp_codes(raw: Tensor, qmax: int) -> Tensor:
    """``clamp(raw, 0, qmax)``: the code range (second half of :func:`round_codes`)."""
    return torch.clamp(raw, 0, qmax)


def round_codes(x: Tensor, s: Tensor, z: Tensor, qmax: int) -> Tensor:
    """``clamp(round(x / s) + z, 0, qmax)`` — the one rounding formula, on operands that broadcast (solvers
    that work column by column, such as GPTQ, call it directly on float32 ``[out]`` slices)."""
    return _clamp_codes(_nearest_codes(x, s, z), qmax)


def dequantize_codes(q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """``(q − z) · s`` — the one dequantization formula, elementwise on operands that broadcast (group-expanded
    ``[out, in]``, a ``[out, G, gs]`` view with ``[out, G, 1]`` qparams, GPTQ's ``[out]`` columns).

    Computes in the operands' dtype: every caller passes float32 (integer codes as float32) and casts the
    result itself, so the values are those of the project's float32 convention (:mod:`lightning_quant.spec`).
    """
    return (q - z) * s


def _expanded(w: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, g_idx: Tensor | None):
    """Float32 ``(s, z)`` gathered to ``w [out, in]``; the symmetric zero stays a broadcasting 0-dim tensor."""
    g_idx = default_group_index(w.shape[1], spec, w.device) if g_idx is None else g_idx
    s = expand_groups(scale.float(), g_idx)  # [out, G] -> [out, in]
    z_group = None if zero is None else expand_groups(zero, g_idx)  # [out, G] -> [out, in]
    z = zeros_or_midpoint(z_group, torch.empty((), device=w.device), spec)  # [out, in] or 0-dim
    return s, z


def quantize(
    w: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, g_idx: Tensor | None = None
) -> Tensor:
    """Integer codes ``uint8 [out, in]`` of ``w`` under the given qparams."""
    s, z = _expanded(w, scale, zero, spec, g_idx)
    return round_codes(w.detach().float(), s, z, spec.qmax).to(torch.uint8)


def dequantize(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    spec: QuantSpec,
    g_idx: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(codes − z) · s`` (:func:`dequantize_codes`) as ``dtype [out, in]``, computed in float32 then cast."""
    s, z = _expanded(codes, scale, zero, spec, g_idx)
    return dequantize_codes(codes.float(), s, z).to(dtype)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward: ``(clamp(round(x/s) + z, 0, qmax) − z) · s`` — :func:`round_codes` (its two halves: the
    gradient needs the code before the clamp) then :func:`dequantize_codes`, in float32, cast to ``x.dtype``.
    Backward (straight-through):

    * ``∂/∂x = 1`` where the code is inside ``[0, qmax]`` before clamping, else 0;
    * ``∂/∂s = (q − z) − x/s`` inside, ``(q − z)`` at the clamp (LSQ, Esser et al. 2020, eq. 3);
    * ``∂/∂z = 0`` inside, ``−s`` at the clamp (for a float, learnable zero point).
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, z: Tensor, qmax: int) -> Tensor:
        xf = x.float()
        raw = _nearest_codes(xf, s, z)
        q = _clamp_codes(raw, qmax)  # = round_codes(xf, s, z, qmax)
        inside = (raw >= 0) & (raw <= qmax)
        ctx.save_for_backward(xf, s, z, q, inside)
        ctx.x_dtype = x.dtype
        return dequantize_codes(q, s, z).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        xf, s, z, q, inside = ctx.saved_tensors
        g = g.float()
        gx = gs = gz = None
        if ctx.needs_input_grad[0]:
            gx = torch.where(inside, g, torch.zeros_like(g)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, (q - z) - xf / s, q - z)
            gs = (g * ds).sum_to_size(s.shape)
        if ctx.needs_input_grad[2]:
            dz = torch.where(inside, torch.zeros_like(g), -s.expand_as(g))
            gz = (g * dz).sum_to_size(z.shape)
        return gx, gs, gz, None


def fake_quantize(
    x: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, g_idx: Tensor | None = None
) -> Tensor:
    """Quantize-dequantize ``x [out, in]`` with one straight-through rounding.

    The forward equals ``dequantize(quantize(x, ...), ...)`` bit for bit (same float32 ops).
    Gradients flow to ``x`` (identity inside the clamp range) and, if they require grad, to
    ``scale`` (LSQ) and ``zero``.
    """
    s, z = _expanded(x, scale, zero, spec, g_idx)
    return _FakeQuantizeSTE.apply(x, s, z, spec.qmax)


# ---- activations (dynamic, per token) ---------------------------------------------------


def activation_qparams(x: Tensor, spec: ActivationSpec) -> tuple[Tensor, Tensor]:
    """Per-token qparams of ``x [..., features]``: scale and zero ``[..., 1]`` (float32).

    Computed from ``x.detach()``; the zero is the midpoint when symmetric.
    """
    xf = x.detach().float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    if spec.symmetric:
        scale = (2.0 * torch.maximum(-lo, hi) / spec.qmax).clamp_min(SCALE_EPS)
        return scale, zeros_or_midpoint(None, scale, spec)
    scale = ((hi - lo) / spec.qmax).clamp_min(SCALE_EPS)
    return scale, _zero_point(lo, scale, spec.qmax)


def quantize_activation(x: Tensor, spec: ActivationSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Codes ``uint8 [..., features]`` with their per-token ``(scale, zero)``."""
    scale, zero = activation_qparams(x, spec)
    return round_codes(x.detach().float(), scale, zero, spec.qmax).to(torch.uint8), scale, zero


def fake_quantize_activation(x: Tensor, spec: ActivationSpec) -> Tensor:
    """Dynamic per-token fake quant of activations (gradient: straight-through to ``x``)."""
    scale, zero = activation_qparams(x, spec)
    return _FakeQuantizeSTE.apply(x, scale, zero, spec.qmax)
