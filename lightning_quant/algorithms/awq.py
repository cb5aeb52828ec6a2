"""AWQ solver (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"), pure tensors: statistics of a group's captured inputs in, scales / clips /
:class:`~lightning_quant.quantized.QuantizedWeight` out. No Lightning, no model surgery.

A *group* is a set of linear layers that read the same input ``X [N, in]`` (q/k/v after the
attention norm, gate/up after the MLP norm, o after v, down after up). With a per-input-channel
scale ``s [in]`` the group computes ``Q(W diag(s)) (diag(s)^-1 x)``; the ``diag(s)^-1`` is folded
into whatever produced ``x`` (or applied explicitly), so only the quantization error changes.

1. Scale search (§3.2, eq. 4-5): ``s = mean|x|^α`` (normalised so ``sqrt(max·min) = 1``), ``α`` on a
   grid of ``n_grid`` points in ``[0, 1)``; pick the ``α`` minimising the group's output error
   ``Σ_layers tr(D H D^T)/2`` with ``D = W − Q(W diag(s)) diag(s)^-1`` and ``H = 2 X^T X / N``
   (:func:`lightning_quant.algorithms.hessian.output_error`: mean per-token squared output error).
   ``α = 0`` is ``s = 1``, i.e. plain RTN, so the chosen point is never worse than no scaling.
2. Clip search: for each layer of the scaled group, shrink each (row, weight-group) range by
   ``c = 1 − max_shrink·i/clip_grid`` and keep, per (row, group), the ``c`` with the least output
   error of that group's input columns (block-diagonal part of ``H``). The clipped result is kept
   only if the layer's full output error does not grow (so clipping never makes a layer worse).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.algorithms.hessian import HessianAccumulator, output_error
from lightning_quant.calibration.distributed import all_reduce_sum
from lightning_quant.calibration.options import CalibrationOptions
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QParamSearch, QuantSpec

__all__ = [
    "UNFOLDABLE",
    "AWQConfig",
    "AWQGroupResult",
    "AWQStats",
    "ScaleTie",
    "awq_quantize_group",
    "awq_scales",
    "search_clip",
    "search_scales",
]


#: What AWQ does with a group whose scales cannot be folded (see :class:`AWQConfig`).
UNFOLDABLE = ("unscaled", "explicit")


@dataclass(frozen=True)
class AWQConfig(CalibrationOptions):
    """AWQ settings (validated at construction).

    Args:
        n_grid: points of the scale-exponent grid ``α = i / n_grid``, ``i = 0..n_grid-1`` (20 in the paper).
        clip_grid: shrink factors tried per (row, group) in the clip search; 0 disables clipping.
        max_shrink: the smallest range tried is ``(1 − max_shrink)·max``; in ``[0, 1)``.
        unfoldable: a group whose scales fold into no preceding op (GPT-2's ``c_proj`` after GELU or
            after the fused ``c_attn``; anything whose fold fails the numerical check) is either
            ``"unscaled"`` (the default, as AutoAWQ and llm-compressor do: no input scaling, only the clip
            search, so every export format holds the layer) or ``"explicit"`` (the searched scales kept as
            the layer's ``input_scale``: lower error, but only ``onnx`` and our own checkpoints hold it).

    Plus the runner options of :class:`~lightning_quant.calibration.options.CalibrationOptions`
    (``batch_size``, ``block_path``, ``device``, ``progress``).
    """

    n_grid: int = 20
    clip_grid: int = 10
    max_shrink: float = 0.5
    unfoldable: str = "unscaled"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("n_grid", 1), ("clip_grid", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"AWQConfig.{name}={v!r} must be an int >= {low} (defaults: n_grid=20, clip_grid=10).")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"AWQConfig.max_shrink={self.max_shrink!r} must be in [0, 1); 0.5 is typical.")
        if self.unfoldable not in UNFOLDABLE:
            raise ValueError(f"AWQConfig.unfoldable={self.unfoldable!r} is not supported; use one of {UNFOLDABLE}.")


class AWQStats:
    """Statistics of one group's inputs: ``Σ x x^T`` and token count (a GPTQ
    :class:`~lightning_quant.algorithms.gptq.HessianAccumulator`) plus ``Σ |x|`` per channel ``[in]``."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", name: str = "group") -> None:
        self.gram = HessianAccumulator(in_features, device, name)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.name = name

    @property
    def in_features(self) -> int:
        return self.abs_sum.shape[0]

    def add(self, x: Tensor) -> None:
        """Accumulate inputs ``x [tokens, in]`` (checks shape and finiteness)."""
        P.check_finite(x, f"Calibration inputs of {self.name}")
        self.gram.add(x)  # raises on a feature-count mismatch
        self.abs_sum += x.detach().reshape(-1, x.shape[-1]).to(self.abs_sum.device, torch.float64).abs().sum(0)

    def all_reduce(self) -> None:
        """Sum over DDP ranks (no-op in one process)."""
        self.gram.all_reduce()
        all_reduce_sum(self.abs_sum)

    def hessian(self) -> Tensor:
        """``H = 2 X^T X / N`` float32 ``[in, in]``."""
        return self.gram.hessian()

    def mean_abs(self) -> Tensor:
        """``mean |x|`` per input channel, float32 ``[in]``."""
        return (self.abs_sum / self.gram.count.clamp_min(1)).float()

    @classmethod
    def from_inputs(cls, x: Tensor, name: str = "group") -> AWQStats:
        st = cls(x.shape[-1], x.device, name)
        st.add(x)
        return st


@dataclass
class AWQGroupResult:
    """What :func:`awq_quantize_group` found for one group.

    ``scales [in]`` (quantize ``W diag(s)``, feed ``x / s``), ``ratio`` (the chosen ``α``),
    ``grid_errors`` (group output error for each grid point; index 0 is ``s = 1``),
    ``clips {name: [out, G]}``, ``qweights {name: QuantizedWeight of W diag(s)}``,
    ``error`` / ``rtn_error`` (group output error of AWQ and of plain RTN on the same inputs).
    """

    scales: Tensor
    ratio: float
    grid_errors: list[float]
    clips: dict[str, Tensor] = field(default_factory=dict)
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    error: float = 0.0
    rtn_error: float = 0.0


def awq_scales(mean_abs: Tensor, ratio: float) -> Tensor:
    """``s = mean|x|^α`` normalised by ``sqrt(max(s)·min(s))`` (float32 ``[in]``; ``α = 0`` gives ones)."""
    s = mean_abs.float().clamp_min(1e-4).pow(ratio)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True)
class ScaleTie:
    """Grouped-query attention tie of a group's scales (``kv_heads`` kv heads of ``head_dim`` features, each
    read by ``repeats`` query heads, as ``repeat_kv`` lays them out): the group reads ``kv·rep·hd`` features
    but its producer (``v_proj``) writes ``kv·hd``, so the scales must be equal across the repeats."""

    kv_heads: int
    repeats: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("kv_heads", "repeats", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ScaleTie.{name} must be a positive int, got {v!r}.")

    @property
    def producer_width(self) -> int:
        """``kv·hd``: the features the producer writes."""
        return self.kv_heads * self.head_dim

    def expand(self, s: Tensor) -> Tensor:
        """Producer scales ``[kv·hd]`` -> the group's ``[kv·rep·hd]`` (head ``h`` reads kv head ``h // rep``)."""
        kv, rep, hd = self.kv_heads, self.repeats, self.head_dim
        return s.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)

    def reduce(self, x: Tensor) -> Tensor:
        """Per-feature statistics ``[kv·rep·hd]`` -> their mean over the ``rep`` copies, ``[kv·hd]``."""
        return x.view(self.kv_heads, self.repeats, self.head_dim).mean(1).reshape(-1)

    def producer_share(self, s: Tensor) -> Tensor:
        """The producer's share of the group's tied scales ``s [kv·rep·hd]``: the first copy, ``[kv·hd]``."""
        return s.view(self.kv_heads, self.repeats, self.head_dim)[:, 0].reshape(-1)


def tie_expand(s: Tensor, tie: ScaleTie | None) -> Tensor:
    """:meth:`ScaleTie.expand`, the identity without a tie."""
    return s if tie is None else tie.expand(s)


def tie_reduce(x: Tensor, tie: ScaleTie | None) -> Tensor:
    """:meth:`ScaleTie.reduce`, the identity without a tie."""
    return x if tie is None else tie.reduce(x)


_fake_rtn = P.fake_quantize_minmax  # min-max fake quant on a [out, G, gs] view (shared with every grid search)


def _check_group(weights: dict[str, Tensor], in_features: int) -> None:
    if not weights:
        raise ValueError("An AWQ group needs at least one weight.")
    for n, w in weights.items():
        if w.dim() != 2 or w.shape[1] != in_features:
            shapes = {k: tuple(v.shape) for k, v in weights.items()}
            raise ValueError(f"AWQ group weights must all be [out, {in_features}] (the inputs' feature count); "
                             f"{n!r} disagrees: {shapes}. Group only layers that read the same input.")
        P.check_finite(w, n)


def search_scales(stats: AWQStats, weights: dict[str, Tensor], spec: QuantSpec, n_grid: int = 20,
                  tie: ScaleTie | None = None) -> tuple[Tensor, float, list[float]]:
    """Grid search of ``α`` (module docstring, step 1): ``(scales [in], α, errors per grid point)``.

    ``tie`` (a :class:`ScaleTie`: grouped-query attention, see
    :class:`~lightning_quant.methods.awq_mapping.FoldPlan`): ``s`` is computed from ``mean|x|``
    averaged over the repeats and repeated back, so it folds into the ``[kv·hd]`` producer.
    """
    _check_group(weights, stats.in_features)
    h, mean_abs = stats.hessian(), stats.mean_abs()
    base = tie_reduce(mean_abs, tie)
    errors, best = [], (float("inf"), None, 0.0)
    for i in range(n_grid):
        ratio = i / n_grid
        s = tie_expand(awq_scales(base, ratio), tie)
        err = sum(output_error(w, _fake_rtn(w.float() * s, spec) / s, h) for w in weights.values())
        errors.append(err)
        if err < best[0]:
            best = (err, s, ratio)
    if best[1] is None:
        raise ValueError(f"{stats.name}: AWQ output errors are not finite ({errors}); check the inputs and weights.")
    return best[1], best[2], errors


def search_clip(w: Tensor, h: Tensor, spec: QuantSpec, clip_grid: int = 10, max_shrink: float = 0.5) -> Tensor:
    """Per (row, weight-group) shrink factor ``[out, G]`` of ``w [out, in]`` (module docstring, step 2): the
    shared :func:`~lightning_quant.primitives.search_clip` with ``QParamSearch(clip_grid, max_shrink, "hessian")``."""
    return P.search_clip(w, spec, QParamSearch(max(clip_grid, 1), max_shrink, "hessian"), h)


def awq_quantize_group(stats: AWQStats, weights: dict[str, Tensor], spec: QuantSpec,
                       config: AWQConfig | None = None, tie: ScaleTie | None = None) -> AWQGroupResult:
    """AWQ for one group: scale search, then clip search per layer, then quantization.

    Args:
        stats: the group's input statistics (:class:`AWQStats`, all-reduced under DDP).
        weights: ``{name: W [out, in]}`` of the layers reading that input (shapes must agree on ``in``).
        spec: the weight :class:`QuantSpec`.
        tie: a :class:`ScaleTie` keeping the scales equal across grouped-query repeats.
    Returns:
        :class:`AWQGroupResult`; each ``qweights[name]`` quantizes ``W diag(scales)``.
    """
    cfg = config or AWQConfig()
    _check_group(weights, stats.in_features)
    spec.check_in_features(stats.in_features)
    s, ratio, grid = search_scales(stats, weights, spec, cfg.n_grid, tie)
    h = stats.hessian()
    h_scaled = h / s.unsqueeze(0) / s.unsqueeze(1)  # inputs become x / s: H -> diag(1/s) H diag(1/s)
    res = AWQGroupResult(scales=s, ratio=ratio, grid_errors=grid)
    for n, w in weights.items():
        ws = w.float() * s  # [out, in] · [in]
        clip = torch.ones(w.shape[0], spec.num_groups(w.shape[1]), dtype=torch.float32, device=w.device)
        if cfg.clip_grid > 0:
            cand = search_clip(ws, h_scaled, spec, cfg.clip_grid, cfg.max_shrink)
            if output_error(ws, _fake_rtn(ws, spec, cand), h_scaled) <= output_error(ws, _fake_rtn(ws, spec), h_scaled):
                clip = cand
        scale, zero = P.compute_qparams(ws, spec, clip=clip)
        qw = replace(QuantizedWeight.from_float(ws, spec, scale, zero), dtype=w.dtype)
        res.clips[n], res.qweights[n] = clip, qw
        res.error += output_error(w, qw.dequantize(torch.float32) / s, h)
        res.rtn_error += output_error(w, _fake_rtn(w.float(), spec), h)
    return res
