"""GPTQ: one-shot weight quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1.

For a linear layer with weight ``W [out, in]`` and calibration inputs ``X [n, in]``, GPTQ minimises
``||X W^T - X Q^T||^2`` column by column. With the Hessian ``H = 2 X^T X / n`` (eq. 1; dampened by
``λ = damp_percent · mean(diag H)``), each column ``j`` is rounded and the error
``e = (w_j - q_j) / [H^-1]_jj`` is spread over the not-yet-quantized columns through the row ``j``
of the upper Cholesky factor ``U`` of ``H^-1`` (eq. 3 with the Cholesky reformulation of §3,
"Step 3"). Columns go in blocks of ``block_size`` ("lazy batch updates", §3 "Step 2").

Options: group-wise qparams computed on the *updated* weights when a group starts (the paper's
reference code), or all on the original weight before the sweep (``group_qparams="original"``, as
llm-compressor's observers do); min-max or grid-searched (``qparam_search``, a
:class:`~lightning_quant.spec.QParamSearch`, as GPTQ's reference ``mse`` quantizer); act-order
(columns by descending ``diag H``; with ``static_groups`` qparams come from the original weight
in natural groups, else groups follow the processing order and ``g_idx`` records them); dead
inputs (``diag H == 0``) get ``H_jj = 1`` and ``w_j = 0``.

Pure tensors: no Lightning, no model — :mod:`lightning_quant.methods.gptq` drives it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.algorithms.hessian import HessianAccumulator, output_error
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.calibration.options import CalibrationOptions
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QParamSearch, QuantSpec

#: Where GPTQ's group qparams come from (see :class:`GPTQConfig`).
GROUP_QPARAMS = ("updated", "original")

__all__ = ["DEFAULT_QPARAM_SEARCH", "GROUP_QPARAMS", "GPTQConfig", "GPTQResult", "HessianAccumulator", "gptq_quantize", "output_error"]


#: GPTQ's default group-qparam search: Hessian-weighted (measured best, docs/benchmarks.md, issue 15)
DEFAULT_QPARAM_SEARCH = QParamSearch(objective="hessian")


@dataclass(frozen=True)
class GPTQConfig(CalibrationOptions):
    """GPTQ settings (validated at construction).

    Args:
        damp_percent: dampening ``λ = damp_percent · mean(diag H)`` added to ``diag H``, in ``[0, 1)``.
        damp_retries: times the Cholesky is retried with 10x more damping before falling back to RTN.
        block_size: columns per lazy-update block (rounded to a multiple of the group size).
        act_order: process columns by descending ``diag H`` ("desc_act"). Default True: with static groups
            it costs nothing at inference and on SmolLM2 W4 g64 it took GPTQ from 33.60 to 32.65 ppl (sym)
            and from 32.46 to 31.92 (asym; KL 0.119 -> 0.101) (docs/benchmarks.md, issue 15, 2026-12-02).
        static_groups: with ``act_order``, qparams from the original weight in natural groups, so the
            layer needs no ``g_idx`` (an ordinary packed layer). ``None`` (default) means ``act_order``:
            ``act_order=True, static_groups=False`` gives the dynamic groups of the paper's code (a ``g_idx``).
        true_sequential: inside a block, quantize linears in call order groups ([q,k,v], [o],
            [gate,up], [down]) so each group's Hessian sees the earlier groups' quantized outputs.
        group_qparams: ``"updated"`` — each group's qparams from the error-updated weight when the group
            starts (the paper's reference code); ``"original"`` — every group's from the weight before the
            sweep (llm-compressor). Per-channel specs and static groups always use the original weight.
        qparam_search: a :class:`~lightning_quant.spec.QParamSearch` run per group wherever qparams are
            computed (its ``"hessian"`` objective uses the group's block of this layer's Hessian), or ``None``
            for min-max qparams. Default :data:`DEFAULT_QPARAM_SEARCH`, the Hessian-weighted search: on
            SmolLM2 W4 g64 it lowers GPTQ's KL to the float model by 50 % (sym) and 36 % (asym) for
            1.5-1.7x the time (docs/benchmarks.md, issue 15).
        gptaq: **experimental** GPTAQ ("asymmetric calibration", Li et al. 2025): each layer matches the
            *float* model's outputs from the quantized model's inputs, ``min ||W X_f − Q X||`` instead of GPTQ's
            ``min ||W X − Q X||``. The calibration carries a second, float stream of hidden states (one more
            set alive and one more block forward per block) and a cross term ``2 Σ (x_f − x) x^T / n`` per
            Hessian; the solver quantizes the target ``W + α W G H^-1`` (``α = 1``: the least-squares fit, see
            :func:`gptq_quantize`). Default False.
        gptaq_alpha: ``α``, the share of the least-squares correction applied, in ``(0, 1]``. Default 0.25,
            the GPTAQ authors' own setting: the full fit (``α = 1``) lowers every layer's calibration error but
            on SmolLM2 W4 g64 it wrecks the model (ppl 115 vs 32; docs/benchmarks.md, issue 15).
        awq: only for ``method="awq+gptq"``: the :class:`~lightning_quant.algorithms.awq.AWQConfig` of the AWQ
            scale search run first (``None`` there means ``AWQConfig()``); ``method="gptq"`` rejects it.

    Plus the runner options of :class:`~lightning_quant.calibration.options.CalibrationOptions`
    (``batch_size``, ``block_path``, ``device``, ``progress``).
    """

    damp_percent: float = 0.01
    damp_retries: int = 3
    block_size: int = 128
    act_order: bool = True
    static_groups: bool | None = None
    true_sequential: bool = True
    group_qparams: Literal["updated", "original"] = "updated"
    qparam_search: QParamSearch | None = DEFAULT_QPARAM_SEARCH
    gptaq: bool = False
    gptaq_alpha: float = 0.25
    awq: object | None = None  # AWQConfig (typed loosely: awq.py imports this module)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.static_groups is None:
            object.__setattr__(self, "static_groups", self.act_order)
        if not isinstance(self.damp_percent, (int, float)) or not 0.0 <= self.damp_percent < 1.0:
            raise ValueError(f"GPTQConfig.damp_percent={self.damp_percent!r} must be in [0, 1); 0.01 is typical.")
        for name in ("damp_retries", "block_size"):
            v = getattr(self, name)
            low = 0 if name == "damp_retries" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"GPTQConfig.{name}={v!r} must be an int >= {low}.")
        for name in ("act_order", "static_groups", "true_sequential", "gptaq"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTQConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if isinstance(self.gptaq_alpha, bool) or not isinstance(self.gptaq_alpha, (int, float)) \
                or not 0.0 < self.gptaq_alpha <= 1.0:
            raise ValueError(f"GPTQConfig.gptaq_alpha={self.gptaq_alpha!r} must be in (0, 1]; 0.25 is GPTAQ's default.")
        if self.group_qparams not in GROUP_QPARAMS:
            raise ValueError(f"GPTQConfig.group_qparams={self.group_qparams!r} is not supported; use one of {GROUP_QPARAMS}.")
        if self.qparam_search is not None and not isinstance(self.qparam_search, QParamSearch):
            raise TypeError(f"GPTQConfig.qparam_search must be a lightning_quant.spec.QParamSearch or None, "
                            f"got {type(self.qparam_search).__name__}.")
        if self.awq is not None:
            from lightning_quant.algorithms.awq import AWQConfig

            if not isinstance(self.awq, AWQConfig):
                raise TypeError(f"GPTQConfig.awq must be an AWQConfig or None, got {type(self.awq).__name__}.")
            if self.awq.unfoldable != "unscaled":
                raise ValueError("GPTQConfig.awq: AWQ+GPTQ folds every AWQ scale into the model before GPTQ, so "
                                 "explicit input scales cannot be kept; use AWQConfig(unfoldable='unscaled').")
        if self.static_groups and not self.act_order:
            raise ValueError("GPTQConfig.static_groups=True only applies with act_order=True; set act_order=True or drop it.")


    def runner_kwargs(self) -> dict:
        """The block runner's options, with the float stream GPTAQ needs."""
        return {**super().runner_kwargs(), "float_stream": self.gptaq}


@dataclass
class GPTQResult:
    """``qweight``; ``dequantized`` ``[out, in]`` float32 (what the solver committed to);
    ``loss`` = ``tr(D H D^T) / 2`` with ``D = W − Q`` (= mean per-token squared output error,
    since ``H = 2 X^T X / n``); ``damp`` the dampening fraction used; ``fallback`` True if RTN was used."""

    qweight: QuantizedWeight
    dequantized: Tensor
    loss: float
    damp: float
    fallback: bool = False


def _upper_inverse_factor(h: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)^-1`` (``H^-1 = U^T U``), or ``None``
    if the dampened ``H`` is not positive definite.

    One factorisation instead of three: with ``J`` the reversal permutation and ``J H J = L L^T``,
    ``H^-1 = (J L^-T J)(J L^-1 J)`` and ``U = J L^-1 J`` is upper triangular.
    """
    hd = h.flip(0, 1).clone()
    hd.diagonal().add_(damp * float(h.diagonal().mean()))
    lower, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    if not torch.isfinite(upper).all():
        return None
    return upper


@contextmanager
def _cpu_single_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops: on CPU, intra-op threads only add overhead (and
    spin badly on shared machines: ~7x slower measured with 2 threads on a loaded 2-core box)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _group_params(w: Tensor, spec: QuantSpec, search: QParamSearch | None = None,
                  h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise ``(scale, zero)`` ``[out]`` of the columns ``w [out, cols]`` (zero = midpoint if symmetric):
    min-max, or the range shrunk by the per-row factor ``search`` picks (``h [cols, cols]``: the columns'
    Hessian block, for the ``"hessian"`` objective)."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)  # [out, 1]
    if search is not None:
        clip = P.search_clip(w, replace(spec, group_size=-1), search, h)  # [out, 1]: the columns are one group
        lo, hi = lo * clip, hi * clip
    s, z = P.qparams_from_minmax(lo, hi, spec)
    z = P.zeros_or_midpoint(z, s, spec)  # [out, 1]
    return s[:, 0], z[:, 0]


def _fill_group_params(w: Tensor, h: Tensor, spec: QuantSpec, cfg: GPTQConfig, scales: Tensor, zeros: Tensor) -> None:
    """Qparams of every consecutive group of ``w [out, in]`` (Hessian ``h [in, in]``) into ``scales`` / ``zeros``."""
    gs = spec.effective_group_size(w.shape[1])
    for g in range(scales.shape[1]):
        cols = slice(g * gs, (g + 1) * gs)
        scales[:, g], zeros[:, g] = _group_params(w[:, cols], spec, cfg.qparam_search, h[cols, cols])


def _column_groups(in_f: int, spec: QuantSpec, perm: Tensor | None, static: bool) -> list[int]:
    """Group of the column at each *processing* position ``j``."""
    if spec.group_size == -1:
        return [0] * in_f
    gs = spec.group_size
    if static and perm is not None:
        return (perm // gs).tolist()
    return [j // gs for j in range(in_f)]


def _solve(w: Tensor, h: Tensor, upper: Tensor, spec: QuantSpec, cfg: GPTQConfig, scales: Tensor, zeros: Tensor,
           groups: list[int], dynamic: bool) -> tuple[Tensor, Tensor]:
    """Algorithm 1 on ``w [out, in]`` (processing order, modified in place) with ``upper = chol(H^-1)^T``
    (``h``: the Hessian in processing order, read by a ``"hessian"`` qparam search).

    ``scales`` / ``zeros`` ``[out, G]`` are read (precomputed groups) or filled (``dynamic``: computed on
    the error-updated weights when a group starts). Returns codes (float) and dequantized ``[out, in]``.
    """
    in_f = w.shape[1]
    gs = spec.effective_group_size(in_f)
    bs = cfg.block_size if spec.group_size == -1 else max(gs, cfg.block_size // gs * gs)
    codes = torch.empty_like(w)
    dq = torch.empty_like(w)
    qmax = float(spec.qmax)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = w[:, i1:i2].clone()  # [out, bs]
        err = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % gs == 0:  # groups never straddle blocks (bs is a multiple of gs)
                s_g, z_g = _group_params(w1[:, i : i + gs], spec, cfg.qparam_search, h[j : j + gs, j : j + gs])
                scales[:, j // gs], zeros[:, j // gs] = s_g, z_g
            s, z = scales[:, groups[j]], zeros[:, groups[j]]
            q = P.round_codes(w1[:, i], s, z, qmax)
            d = P.dequantize_codes(q, s, z)
            codes[:, j], dq[:, j] = q, d
            e = (w1[:, i] - d) / u1[i, i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)  # error feedback inside the block: w -= e u_i
            err[:, i] = e
        w[:, i2:] -= err @ upper[i1:i2, i2:]  # lazy batch update of the remaining columns
    return codes, dq


def _damp_schedule(cfg: GPTQConfig) -> list[float]:
    base = max(cfg.damp_percent, 1e-3)
    return [cfg.damp_percent] + [base * 10.0**k for k in range(1, cfg.damp_retries + 1)]


def _fallback(weight: Tensor, hessian: Tensor, spec: QuantSpec, cfg: GPTQConfig, name: str) -> GPTQResult:
    warnings.warn(
        f"GPTQ: the dampened Hessian of {name} is not positive definite even with damp_percent up to "
        f"{_damp_schedule(cfg)[-1]:g}; {name} was quantized with RTN instead. Raise GPTQConfig.damp_percent "
        f"(now {cfg.damp_percent}) or damp_retries, or give more / more varied calibration data.",
        RuntimeWarning,
        stacklevel=3,
    )
    qw = rtn_quantize(weight.detach(), spec, name=name)
    dq = qw.dequantize(torch.float32)
    return GPTQResult(qw, dq, output_error(weight, dq, hessian), float("nan"), fallback=True)


def _float_target(w: Tensor, h: Tensor, cross: Tensor, cfg: GPTQConfig, name: str) -> Tensor:
    """GPTAQ's target ``W + α W G H_d^-1`` (``α = cfg.gptaq_alpha``; float64 solve, ``H_d`` dampened with the first
    damping of the schedule that factorises); ``w`` and ``h`` as the sweep receives them (dead inputs done)."""
    if tuple(cross.shape) != tuple(h.shape):
        raise ValueError(f"{name}: the GPTAQ cross term must be [in, in] = {tuple(h.shape)}, got {tuple(cross.shape)}.")
    P.check_finite(cross, f"GPTAQ cross term of {name}")
    h64 = h.double()
    for damp in _damp_schedule(cfg):
        hd = h64.clone()
        hd.diagonal().add_(damp * float(h64.diagonal().mean()))
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            wg = w.double() @ cross.to(w.device, torch.float64)  # [out, in]
            shift = torch.cholesky_solve(wg.t(), lower).t()  # (W G) H_d^-1, H_d symmetric
            return (w.double() + cfg.gptaq_alpha * shift).float()
    return w  # no damping factorises: the sweep falls back to RTN on the weight itself


def gptq_quantize(weight: Tensor, hessian: Tensor, spec: QuantSpec, config: GPTQConfig | None = None,
                  name: str = "weight", cross: Tensor | None = None) -> GPTQResult:
    """GPTQ-quantize ``weight [out, in]`` given ``hessian [in, in]`` (``2 X^T X / n``).

    Returns a :class:`GPTQResult`; its ``qweight.dequantize()`` equals ``dequantized`` exactly. With
    ``act_order`` the ``QuantizedWeight`` carries ``perm`` (processing order) and, without static
    groups, ``g_idx`` (group of each original column).

    ``cross`` (GPTAQ, ``2 Σ (x_f − x) x^T / n`` with ``x_f`` the float model's inputs and ``x`` those the
    Hessian is built from) changes the objective to ``Σ ||W x_f − Q x||²``. That equals
    ``Σ ||(W* − Q) x||²`` plus a constant for its least-squares minimiser ``W* = W + W G H^-1`` (``G`` the
    cross term; ``H`` dampened as the sweep's), so the sweep runs unchanged on a target: ``W*`` itself with
    ``config.gptaq_alpha = 1``, else ``W + α (W* − W)`` (the default ``α = 0.25`` shrinks the correction, as
    the GPTAQ authors do). Qparams, error feedback and ``loss`` (then ``tr((T − Q) H (T − Q)^T)/2`` for the
    target ``T``) all refer to the target. ``cross = 0`` gives GPTQ's result exactly.
    """
    cfg = config or GPTQConfig()
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"{name}: need weight [out, in] and hessian [in, in]; got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}.")
    out_f, in_f = weight.shape
    spec.check_in_features(in_f)
    P.check_finite(weight, name)
    P.check_finite(hessian, f"Hessian of {name}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    if cross is not None:
        w = _float_target(w, h, cross, cfg, name)
    n_groups = spec.num_groups(in_f)
    scales = torch.empty(out_f, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_f, n_groups, dtype=torch.float32, device=w.device)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if cfg.act_order else None
    natural = spec.group_size == -1 or cfg.static_groups
    if natural:  # per channel, or static groups: qparams of the original weight, natural groups
        _fill_group_params(w, h, spec, cfg, scales, zeros)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    dynamic = not natural and cfg.group_qparams == "updated"
    if not natural and not dynamic:  # original weight, groups in processing order
        _fill_group_params(w, h, spec, cfg, scales, zeros)
    with _cpu_single_thread(w.device):
        for damp in _damp_schedule(cfg):
            upper = _upper_inverse_factor(h, damp)
            if upper is not None:
                break
        else:
            return _fallback(weight, hessian, spec, cfg, name)
        groups = _column_groups(in_f, spec, perm, cfg.static_groups)
        codes, dq = _solve(w, h, upper, spec, cfg, scales, zeros, groups, dynamic=dynamic)
    return _Sweep(codes, dq, scales, zeros, perm, damp, cfg.static_groups).result(weight, hessian, spec)


@dataclass(frozen=True)
class _Sweep:
    """What the column sweep produced: ``codes`` / ``dequantized`` ``[out, in]`` in processing order (``perm``,
    ``None`` for the natural one), the group qparams ``[out, G]`` and the damping that worked."""

    codes: Tensor
    dequantized: Tensor
    scales: Tensor
    zeros: Tensor
    perm: Tensor | None
    damp: float
    static_groups: bool

    def group_index(self, spec: QuantSpec) -> Tensor | None:
        """``g_idx [in]`` of act-order with dynamic groups (group of each original column), else ``None``."""
        if self.perm is None or spec.group_size == -1 or self.static_groups:
            return None
        in_f = self.perm.numel()
        g_idx = torch.empty(in_f, dtype=torch.long, device=self.perm.device)
        g_idx[self.perm] = torch.arange(in_f, device=self.perm.device) // spec.group_size
        return g_idx

    def result(self, weight: Tensor, hessian: Tensor, spec: QuantSpec) -> GPTQResult:
        """Back to the original column order and into a :class:`QuantizedWeight`."""
        codes, dq = self.codes, self.dequantized
        if self.perm is not None:
            inv = torch.argsort(self.perm)
            codes, dq = codes[:, inv], dq[:, inv]
        qw = QuantizedWeight(codes=codes.to(torch.uint8), scales=self.scales,
                             zeros=None if spec.symmetric else self.zeros, spec=spec, g_idx=self.group_index(spec),
                             perm=self.perm, dtype=weight.dtype)
        return GPTQResult(qw, dq, output_error(weight, dq, hessian), self.damp)
