"""Model-level GPTQ: the calibration engine feeds :func:`~lightning_quant.algorithms.gptq.gptq_quantize`.

Registered as ``method="gptq"`` (``needs_calibration=True``, ``config_type=GPTQConfig``). Block by
block (:func:`~lightning_quant.calibration.run_sequential`): for each true-sequential group of the
block's target linears, accumulate Hessians from real inputs — one per distinct input, shared by the
layers that read it (q/k/v, gate/up) — all-reduce them across DDP ranks, solve, and write the
dequantized weights into the block so later groups and blocks see the quantization error. The
model's weights are restored afterwards; swapping in packed layers is the caller's job
(:func:`lightning_quant.quantize_model`).

With ``GPTQConfig(gptaq=True)`` (experimental) the runner also carries the float model's hidden states;
each group's layers are first run on them with their original weights, and every Hessian gets GPTAQ's
cross term from the paired float / quantized inputs of the same tokens.

The :class:`~lightning_quant.methods.registry.MethodResult` carries, per layer, the figures ``gptq_loss``
(``tr(D H D^T)/2``), ``gptq_damp`` and ``gptq_fallback``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lightning_quant.algorithms.gptq import GPTQConfig, GPTQResult, HessianAccumulator, gptq_quantize
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.calibration import BlockContext, run_sequential
from lightning_quant.calibration import distributed as dist
from lightning_quant.calibration.distributed import full_tensor
from lightning_quant.methods.registry import MethodResult, register_method
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import linear_weight

__all__ = ["GPTQConfig", "gptq_method"]


def _quantize_group(ctx: BlockContext, readers: list[list[str]], lin: dict[str, nn.Module], spec: QuantSpec,
                    cfg: GPTQConfig, out: dict[str, QuantizedWeight], figures: dict[str, dict]) -> None:
    """Solve the layers of ``readers`` (lists of names fed the same input) after one forward that
    accumulates one Hessian per list (hooked on its first layer; the block stops after the last)."""
    acc = {g[0]: HessianAccumulator(linear_weight(lin[g[0]]).shape[1], ctx.device, ", ".join(g), cross=cfg.gptaq)
           for g in readers}
    hooked = {n: lin[n] for n in acc}
    if cfg.gptaq:  # the float model's inputs of these layers, batch for batch, paired with the quantized model's
        floats: dict[str, list[Tensor]] = {n: [] for n in acc}
        ctx.capture_inputs(hooked, lambda n, m, x: floats[n].append(x.detach().clone()), of_float_model=True)
        for rows in floats.values():
            for x in rows:
                ctx.ledger.add(x)
        calls = dict.fromkeys(acc, 0)

        def add(n: str, m: nn.Module, x: Tensor) -> None:
            acc[n].add(x, floats[n][calls[n]])
            calls[n] += 1

        ctx.capture_inputs(hooked, add)
        for rows in floats.values():
            for x in rows:
                ctx.ledger.remove(x)
        del floats
    else:
        ctx.capture_inputs(hooked, lambda n, m, x: acc[n].add(x))
    hessians, crosses = {}, {}
    for group in readers:
        acc[group[0]].all_reduce()
        hessians.update(dict.fromkeys(group, acc[group[0]].hessian()))
        crosses.update(dict.fromkeys(group, acc[group[0]].cross_term() if cfg.gptaq else None))
    world, me = dist.world_size(), dist.rank()
    for j, n in enumerate(hessians, start=len(out)):  # DDP / FSDP: the k-th layer solved overall is solved by
        owner = j % world                              # rank k % world (alternating across groups), then broadcast
        w = linear_weight(lin[n])
        res = gptq_quantize(w, hessians[n], spec, cfg, name=n, cross=crosses[n]) if owner == me else None
        res = _broadcast_result(res, owner, w, spec) if world > 1 else res
        figures[n] = {"gptq_loss": res.loss, "gptq_damp": res.damp, "gptq_fallback": res.fallback}
        out[n] = res.qweight.to("cpu")
        ctx.set_weight(lin[n], res.dequantized.to(w.dtype))


def _broadcast_result(res: GPTQResult | None, src: int, w: Tensor, spec: QuantSpec) -> GPTQResult:
    """``res`` (given on rank ``src`` only) on every rank: its weight, figures and dequantized weight."""
    qw = dist.broadcast_quantized(None if res is None else res.qweight, src, tuple(w.shape), spec, w.dtype, w.device)
    figures = dist.broadcast_figures(None if res is None else (res.loss, res.damp, res.fallback), 3, src, w.device)
    deq = None if res is None else res.dequantized.to(w.device).contiguous()
    deq = dist.broadcast(deq if deq is not None else torch.empty(w.shape, dtype=torch.float32, device=w.device), src)
    return res if res is not None else GPTQResult(qw, deq, figures[0], figures[1], bool(figures[2]))


def gptq_method(model: nn.Module, targets: dict[str, nn.Module], spec: QuantSpec, calibration,
                config: GPTQConfig | None) -> MethodResult:
    """The weights of ``targets`` with their GPTQ figures; leaves the model's weights unchanged."""
    cfg = config or GPTQConfig()
    if cfg.awq is not None:
        raise ValueError("GPTQConfig.awq is set but method='gptq' runs no AWQ; use method='awq+gptq' (or drop awq=).")
    out: dict[str, QuantizedWeight] = {}
    figures: dict[str, dict] = {}

    def process(ctx: BlockContext) -> None:
        lin = ctx.linears(targets)
        if not lin:
            return
        readers = ctx.sequential_groups(lin)  # layers sharing an input, in call order
        for step in ([[g] for g in readers] if cfg.true_sequential else [readers]):
            _quantize_group(ctx, step, lin, spec, cfg, out, figures)

    run_sequential(model, calibration, process, **cfg.runner_kwargs())
    outside = [n for n in targets if n not in out]
    if outside:
        warnings.warn(
            f"GPTQ calibrates decoder blocks only; {outside} lie outside them and were quantized with RTN. "
            "Add them to exclude=... to keep them in float.",
            RuntimeWarning,
            stacklevel=2,
        )
        for n in outside:
            out[n] = rtn_quantize(full_tensor(linear_weight(targets[n]).detach()), spec, name=n)
    return MethodResult(out, figures=figures)


register_method("gptq", gptq_method, needs_calibration=True, config_type=GPTQConfig)
