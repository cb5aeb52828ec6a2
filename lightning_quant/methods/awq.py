"""Model-level AWQ: the calibration engine and fold discovery feed :func:`~lightning_quant.algorithms.awq.awq_quantize_group`.

Registered as ``method="awq"`` (``needs_calibration=True``, ``config_type=AWQConfig``, own ``swap``).
Block by block (:func:`~lightning_quant.calibration.run_sequential`, float propagation as in the paper):

1. :func:`~lightning_quant.methods.awq_mapping.discover_groups` finds the groups sharing an input
   and where each group's scales fold (norm weight, a preceding linear's rows) or, failing that,
   that it folds nowhere — with the reason; such a group is quantized unscaled (``s = 1``, clip search
   only) or, with ``AWQConfig(unfoldable="explicit")``, keeps its scales as an explicit input scale;
2. one forward collects each group's input statistics (:class:`~lightning_quant.algorithms.awq.AWQStats`),
   all-reduced over DDP ranks;
3. groups are solved in *reverse* call order, so a group whose scales fold into a linear of an
   earlier group (v -> o, up -> down) has already set that linear's row scaling when the earlier
   group is searched: every search sees the weights that will actually be quantized.

The model is not changed by the method. Its :class:`~lightning_quant.methods.registry.MethodResult` holds
an :class:`AWQLayerScaling` per layer (``layers``) and the group figures ``awq_ratio``, ``awq_error`` and
``awq_rtn_error`` (``figures``); :func:`swap_in_awq` (the method's swap) applies the folds and installs
``PackedLinear`` layers (with ``input_scale`` for explicit groups); :func:`fold_awq_scales` applies
the same scalings to the *float* model (outputs unchanged: the exactness check);
:func:`awq_summary` reports which groups were folded, left unscaled or given explicit scales.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lightning_quant.algorithms.awq import AWQConfig, AWQGroupResult, AWQStats, awq_quantize_group
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.calibration import BlockContext, run_sequential
from lightning_quant.calibration import distributed as dist
from lightning_quant.calibration.distributed import full_tensor
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.methods.awq_mapping import (
    FoldPlan,
    discover_groups,
    fold_into_producer,
    model_type,
    scale_input_columns,
)
from lightning_quant.methods.registry import MethodResult, layer_bias, register_method
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import get_layer, linear_kind, linear_weight, replace_layer

__all__ = ["AWQConfig", "AWQLayerScaling", "awq_method", "awq_summary", "fold_awq_scales", "swap_in_awq"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class AWQLayerScaling:
    """How one layer's quantized weight relates to its float weight ``W [out, in]`` (the ``"awq"`` method's layer data).

    The codes quantize ``diag(1/row_scale) W diag(scales)``. ``plan`` says where ``1/scales`` goes
    (``plan.producer``); a group that folds nowhere either divides its input explicitly (``explicit``)
    or was searched unscaled (``scales`` all ones, ``AWQConfig.unfoldable="unscaled"``).
    ``row_scale [out]`` is set when a later group's scales were folded into this layer's rows.
    """

    scales: Tensor
    plan: FoldPlan
    row_scale: Tensor | None = None
    explicit: bool = False

    def to(self, device: torch.device | str) -> AWQLayerScaling:
        return replace(self, scales=self.scales.to(device),
                       row_scale=None if self.row_scale is None else self.row_scale.to(device))


def _solve_block(ctx: BlockContext, lin: dict[str, nn.Module], spec: QuantSpec, cfg: AWQConfig, family: str | None,
                 out: dict[str, tuple[QuantizedWeight, AWQLayerScaling, dict]]) -> None:
    """Solve every group of one block; ``out[name] = (weight, layer scaling, group figures)``."""
    plans = discover_groups(ctx.block, ctx.name, lin, ctx.inputs[0], family)
    stats = {p.group[0]: AWQStats(linear_weight(lin[p.group[0]]).shape[1], ctx.device, p.group[0]) for p in plans}
    with ctx.hook_linears({n: lin[n] for n in stats}, lambda n, m, x, y: stats[n].add(x)):
        ctx.forward()
    row_scale: dict[str, Tensor] = {}
    solved: dict[str, tuple[QuantizedWeight, AWQLayerScaling, dict]] = {}
    order = list(reversed(plans))
    for plan in order:  # every rank, in the same order (collectives)
        stats[plan.group[0]].all_reduce()
    owners = _chain_owners(order, dist.world_size())
    for plan in order:
        weights = {}
        for n in plan.group:
            w = linear_weight(lin[n]).detach().float()
            weights[n] = w / row_scale[n].unsqueeze(1) if n in row_scale else w  # [out, in] / [out, 1]
        unscaled = plan.producer is None and cfg.unfoldable == "unscaled"
        res = None
        if owners[plan.group] == dist.rank():  # each group searched once, by the rank owning its chain
            res = awq_quantize_group(stats[plan.group[0]], weights, spec,
                                     replace(cfg, n_grid=1) if unscaled else cfg, tie=plan.tie)  # n_grid=1: s=1
        res = _share_result(res, owners[plan.group], weights, spec) if dist.world_size() > 1 else res
        if plan.kind == "linear" and plan.producer in lin:
            row_scale[plan.producer] = plan.producer_scales(res.scales)
        figures = {"awq_ratio": res.ratio, "awq_error": res.error, "awq_rtn_error": res.rtn_error}  # the group's
        for n in plan.group:
            qw = replace(res.qweights[n], dtype=linear_weight(lin[n]).dtype)
            solved[n] = (qw, AWQLayerScaling(res.scales, plan, explicit=plan.producer is None and not unscaled), figures)
    for p in plans:  # call order; a row scaling is known once every group of the block is solved
        log.info("AWQ %s: %s", list(p.group), p.reason)
        for n in p.group:
            qw, info, figures = solved[n]
            out[n] = (qw, replace(info, row_scale=row_scale.get(n)), figures)


def _chain_owners(order: list[FoldPlan], world: int) -> dict[tuple[str, ...], int]:
    """The rank that searches each group. A group whose scales fold into a linear of another group (v -> o,
    up -> down) must be searched before it (that row scaling changes the other group's weights), so such
    groups form a chain, searched in order by one rank; chains go round-robin over the ranks (Llama: the
    attention chain o -> qkv and the MLP chain down -> gate/up, so 2 ranks each search half a block)."""
    chain: dict[tuple[str, ...], int] = {}
    for i, plan in enumerate(order):
        fed = [chain[q.group] for q in order[:i] if q.kind == "linear" and q.producer in plan.group]
        chain[plan.group] = fed[0] if fed else len(set(chain.values()))
    return {g: c % world for g, c in chain.items()}


def _share_result(res: AWQGroupResult | None, src: int, weights: dict[str, Tensor], spec: QuantSpec) -> AWQGroupResult:
    """A group's search result (given on rank ``src`` only) on every rank: scales, figures, each layer's codes."""
    w0 = next(iter(weights.values()))
    dev = w0.device
    figures = dist.broadcast_figures(None if res is None else (res.ratio, res.error, res.rtn_error), 3, src, dev)
    scales = dist.broadcast(res.scales.to(dev, torch.float32).contiguous() if res is not None else
                            torch.empty(w0.shape[1], dtype=torch.float32, device=dev), src)
    qweights = {n: dist.broadcast_quantized(None if res is None else res.qweights[n], src, tuple(w.shape), spec,
                                            w.dtype, dev) for n, w in weights.items()}
    if res is not None:
        return res
    return AWQGroupResult(scales, figures[0], [], qweights=qweights, error=figures[1], rtn_error=figures[2])


def awq_method(model: nn.Module, targets: dict[str, nn.Module], spec: QuantSpec, calibration,
               config: AWQConfig | None) -> MethodResult[AWQLayerScaling]:
    """The weights of ``targets`` (codes of the scaled weights) with their scalings; the model is unchanged."""
    cfg = config or AWQConfig()
    family = model_type(model)
    out: dict[str, tuple[QuantizedWeight, AWQLayerScaling, dict]] = {}

    def process(ctx: BlockContext) -> None:
        lin = ctx.linears(targets)
        if lin:
            _solve_block(ctx, lin, spec, cfg, family, out)

    run_sequential(model, calibration, process, **cfg.runner_kwargs())
    weights = {n: qw.to("cpu") for n, (qw, _, _) in out.items()}
    layers = {n: info.to("cpu") for n, (_, info, _) in out.items()}
    figures = {n: dict(f) for n, (_, _, f) in out.items()}
    outside = [n for n in targets if n not in out]
    if outside:
        warnings.warn(f"AWQ calibrates decoder blocks only; {outside} lie outside them and were quantized with RTN. "
                      "Add them to exclude=... to keep them in float.", RuntimeWarning, stacklevel=2)
        for n in outside:
            weights[n] = rtn_quantize(full_tensor(linear_weight(targets[n]).detach()), spec, name=n)
    return MethodResult(weights, layers, figures)


@torch.no_grad()
def _apply_folds(model: nn.Module, result: MethodResult[AWQLayerScaling]) -> None:
    """Fold each group's ``1/scales`` into its producer and companions (once per group); linears
    that are themselves quantized get their row scaling through their codes instead."""
    done = set()
    for info in result.layers.values():
        plan = info.plan
        if plan.producer is None or plan.group in done:
            continue
        done.add(plan.group)
        s = info.scales
        prod = model.get_submodule(plan.producer)
        if plan.kind == "norm" or plan.producer not in result.weights:
            fold_into_producer(prod, plan.kind, plan.producer_scales(s).to(prod.weight.device))
        for c in plan.companions:
            scale_input_columns(model.get_submodule(c), s)


def _bias(module: nn.Module, info: AWQLayerScaling | None) -> Tensor | None:
    bias = layer_bias(module)  # FSDP: gathered (every rank swaps the same layers in the same order)
    if bias is None:
        return None
    return bias / info.row_scale.to(bias) if info is not None and info.row_scale is not None else bias


@torch.no_grad()
def fold_awq_scales(model: nn.Module, result: MethodResult[AWQLayerScaling]) -> None:
    """Apply AWQ's scalings to the *float* model in place: producers divided, quantized layers'
    float weights set to ``diag(1/row_scale) W diag(scales)`` (explicit groups: unscaled columns).
    The model's outputs are unchanged up to float rounding — the check that every fold is exact."""
    _apply_folds(model, result)
    for n, info in result.layers.items():
        m = get_layer(model, n)
        w, b = linear_weight(m), _bias(m, info)
        if info.row_scale is not None:
            w.div_(info.row_scale.to(w).unsqueeze(1))
        if info.plan.producer is not None:
            w.mul_(info.scales.to(w).unsqueeze(0))
        if b is not None:
            linear_kind(m).bias(m).copy_(b)


def swap_in_awq(model: nn.Module, result: MethodResult[AWQLayerScaling]) -> dict[str, nn.Module]:
    """The ``"awq"`` method's swap: apply folds, then install ``PackedLinear`` layers (explicit
    groups get ``input_scale = scales``). Returns the replaced modules."""
    _apply_folds(model, result)
    replaced = {}
    for n, qw in result.weights.items():
        old = get_layer(model, n)
        info = result.layers.get(n)
        explicit = info is not None and info.explicit
        new = PackedLinear.from_quantized(qw, _bias(old, info), input_scale=info.scales if explicit else None)
        replaced[n] = replace_layer(model, n, new)
    return replaced


def awq_summary(result: MethodResult[AWQLayerScaling]) -> dict[str, dict[str, str]]:
    """``{"folded": ..., "explicit": ..., "unscaled": ...}``, each ``{group: reason}`` with groups as
    comma-joined names: scales folded into a producer, kept as an explicit input scale, or left at 1."""
    report: dict[str, dict[str, str]] = {"folded": {}, "explicit": {}, "unscaled": {}}
    for info in result.layers.values():
        key = ", ".join(info.plan.group)
        kind = "folded" if info.plan.folded else "explicit" if info.explicit else "unscaled"
        report[kind][key] = info.plan.reason
    return report


register_method("awq", awq_method, needs_calibration=True, config_type=AWQConfig, swap=swap_in_awq)
