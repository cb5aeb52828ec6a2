"""Weight observers for quantization-aware training: they decide the qparams fake quant uses.

Every observer is an ``nn.Module`` built for one weight ``[out, in]`` at injection time, so all of its
state (buffers, learnable scales) has a deterministic shape and lives in ``state_dict`` — a checkpoint
saved mid-QAT resumes through ordinary ``load_state_dict``.

Interface (shapes: ``w [out, in]``, qparams ``[out, G]`` with ``G = spec.num_groups(in)``):

* :meth:`Observer.observe` ``(w)`` — update statistics (called in training mode, no gradient);
* :meth:`Observer.qparams` ``(w) -> (scale, zero | None)`` — float32 scales exactly representable in
  ``spec.scale_dtype`` and integer-valued zeros, so that :func:`~lightning_quant.primitives.quantize`
  with them reproduces the fake-quant forward bit for bit.

Observers (registry :data:`OBSERVERS`, extend with :func:`register_observer`):

* ``"minmax"`` — per-group min-max of the current weight (what RTN uses).
* ``"moving_average"`` — exponential moving average of per-group min / max
  (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference", §3.1 / appendix).
* ``"mse"`` — per-group clipping ratio chosen from a grid to minimise ``||w - Q(w)||²``.
* ``"lsq"`` — learnable scales (Esser et al. 2020, "Learned Step Size Quantization"): the scale is an
  ``nn.Parameter`` trained through the straight-through estimator of
  :func:`~lightning_quant.primitives.fake_quantize` (LSQ eq. 3), with the gradient scaled by
  ``g = 1 / sqrt(N · Q_P)`` (LSQ eq. 4, ``N`` = elements per group, ``Q_P`` = largest positive code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_quant import primitives as P
from lightning_quant.spec import QuantSpec

__all__ = [
    "OBSERVERS",
    "LearnableScaleObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "build_observer",
    "register_observer",
]


class Observer(nn.Module):
    """Base class: one observer per weight ``[out, in]``; subclasses implement :meth:`qparams`."""

    def __init__(self, spec: QuantSpec, weight: Tensor) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Observers take a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
        spec.check_in_features(weight.shape[1])
        self.spec = spec
        self.out_features, self.in_features = weight.shape

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        """Update statistics from ``w [out, in]``; the default observer keeps none."""

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"spec={self.spec}, shape=({self.out_features}, {self.in_features})"


class MinMaxObserver(Observer):
    """Per-group min-max of the *current* weight (computed once per forward, in :meth:`qparams`);
    the last result is kept in the ``scale`` / ``zero`` buffers."""

    def __init__(self, spec: QuantSpec, weight: Tensor) -> None:
        super().__init__(spec, weight)
        scale, zero = P.compute_qparams(weight.detach(), spec)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        scale, zero = P.compute_qparams(w.detach(), self.spec)
        with torch.no_grad():
            self.scale.copy_(scale)
            if zero is not None:
                self.zero.copy_(zero)
        return scale, zero


class MovingAverageObserver(Observer):
    """EMA of per-group ``(min, max)``: ``m ← momentum·m + (1 − momentum)·m_batch``.

    Buffers ``lo`` / ``hi`` ``[out, G]`` start at the weight's range at injection time.
    """

    def __init__(self, spec: QuantSpec, weight: Tensor, momentum: float = 0.9) -> None:
        super().__init__(spec, weight)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        lo, hi = P.group_minmax(weight.detach(), spec)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        lo, hi = P.group_minmax(w.detach(), self.spec)
        self.lo.mul_(self.momentum).add_(lo, alpha=1.0 - self.momentum)
        self.hi.mul_(self.momentum).add_(hi, alpha=1.0 - self.momentum)

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return P.qparams_from_minmax(self.lo, self.hi, self.spec)


class MSEObserver(Observer):
    """Per-group clip ratio ``c`` from a grid that minimises the group's ``Σ (w − Q_c(w))²``.

    ``Q_c`` uses min-max qparams of the range shrunk by ``c`` (:func:`~lightning_quant.primitives.compute_qparams`
    with ``clip``). The chosen ratios live in the ``clip`` buffer ``[out, G]``; the search reruns on every
    :meth:`observe` (cost: ``grid`` fake quantizations of the weight).
    """

    def __init__(self, spec: QuantSpec, weight: Tensor, grid: int = 20, min_ratio: float = 0.5) -> None:
        super().__init__(spec, weight)
        if grid < 1 or not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"MSEObserver needs grid >= 1 and 0 < min_ratio <= 1, got grid={grid}, min_ratio={min_ratio}.")
        self.register_buffer("ratios", torch.linspace(1.0, min_ratio, grid, dtype=torch.float32), persistent=False)
        self.register_buffer("clip", torch.ones(self.out_features, spec.num_groups(self.in_features), dtype=torch.float32))
        self.observe(weight)

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        w = w.detach().float()
        g_idx = P.default_group_index(self.in_features, self.spec, w.device)
        best_err = torch.full_like(self.clip, float("inf"))
        for r in self.ratios.tolist():
            scale, zero = P.compute_qparams(w, self.spec, clip=r)
            err = (P.fake_quantize(w, scale, zero, self.spec) - w).pow(2)  # [out, in]
            err = torch.zeros_like(best_err).index_add_(1, g_idx, err)  # [out, in] -> [out, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            self.clip.copy_(torch.where(better, torch.full_like(self.clip, r), self.clip))

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return P.compute_qparams(w.detach(), self.spec, clip=self.clip)


class LearnableScaleObserver(Observer):
    """LSQ: ``scale`` is an ``nn.Parameter [out, G]`` initialised to the min-max scale.

    In :meth:`qparams` the scale is clamped to :data:`~lightning_quant.primitives.SCALE_EPS`, its gradient
    multiplied by ``g = 1/sqrt(N·Q_P)`` (LSQ eq. 4) and its value rounded to the nearest ``spec.scale_dtype``
    value (:func:`~lightning_quant.primitives.round_scale_nearest`, not the min-max qparams' round-up) with a
    straight-through estimator, so the value used equals the value a packed layer stores. Asymmetric
    specs keep the min-max zero point of injection time fixed (buffer ``zero``): converted checkpoints need
    integer zero points, and a learned float offset could not be stored.
    """

    def __init__(self, spec: QuantSpec, weight: Tensor) -> None:
        super().__init__(spec, weight)
        scale, zero = P.compute_qparams(weight.detach(), spec)
        self.scale = nn.Parameter(scale)  # float32 [out, G]
        self.register_buffer("zero", zero)
        n_per_group = spec.effective_group_size(self.in_features)
        q_pos = spec.qmax - spec.midpoint if spec.symmetric else spec.qmax
        self.grad_scale = 1.0 / math.sqrt(n_per_group * q_pos)

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        s = self.scale.float()
        s = s * self.grad_scale + (s - s * self.grad_scale).detach()  # value s, gradient g·∂L/∂s
        s = s.clamp_min(P.SCALE_EPS)
        stored = P.round_scale_nearest(s.detach(), self.spec)  # a learned scale: nearest, not up (no range to hold)
        return s + (stored - s).detach(), self.zero


#: observer name -> class; every class takes ``(spec, weight)``
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "mse": MSEObserver,
    "lsq": LearnableScaleObserver,
}


def register_observer(name: str, cls: type[Observer]) -> None:
    """Make ``observer=name`` available to QAT; ``cls(spec, weight)`` must build it."""
    if not (isinstance(cls, type) and issubclass(cls, Observer)):
        raise TypeError(f"register_observer needs an Observer subclass, got {cls!r}.")
    OBSERVERS[name] = cls


def check_observer(name: str) -> None:
    """Raise ``ValueError`` naming the registered observers when ``name`` is not one of them."""
    if name not in OBSERVERS:
        raise ValueError(f"observer={name!r} is not registered; use one of {sorted(OBSERVERS)} "
                         "(or add one with lightning_quant.observers.register_observer).")


def build_observer(name: str, spec: QuantSpec, weight: Tensor) -> Observer:
    """The observer registered as ``name`` for ``weight [out, in]``."""
    check_observer(name)
    return OBSERVERS[name](spec, weight)
