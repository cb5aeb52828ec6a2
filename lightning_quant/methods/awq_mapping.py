"""Where AWQ's input scales go: groups of linears sharing an input, and what produced that input.

AWQ quantizes ``W diag(s)`` and needs the group's input divided by ``s``. That division is free
when the input is the output of a *foldable* operation (Lin et al. 2024, §3.2):

* ``"norm"``: a normalisation whose output is ``f(x) · weight (+ bias)`` per channel (RMSNorm,
  LayerNorm): divide its ``weight`` (and ``bias``) by ``s``;
* ``"linear"``: a linear whose output reaches the group unchanged or through per-channel linear /
  positively homogeneous steps (v -> attention -> o; up -> ``act(gate)·up`` -> down; OPT's
  fc1 -> ReLU -> fc2): divide its output rows (and bias) by ``s``.

Discovery is generic and data-driven, no per-architecture code:

1. **Trace** one block forward: targets fed the *same tensor object* form a group (call order);
   the module that *returned* that tensor is a direct producer candidate; other linear-like
   modules reading it (excluded linears, LoRA ``lora_A``) are *companions* whose input columns
   are multiplied by ``s`` to compensate.
2. **Indirect pairs as data**: :data:`INDIRECT_FOLDS` maps a ``config.model_type`` to
   ``(producer, consumer)`` name pairs inside a block (v -> o, up -> down); unknown families use
   :data:`GENERIC_INDIRECT_FOLDS`.
   Under grouped-query attention ``v_proj`` has ``kv·hd`` outputs while ``o_proj`` reads ``heads·hd``
   features (each kv head's block repeated for ``heads/kv`` query heads, as ``repeat_kv`` lays them
   out): the group's scales are then *tied* — equal across the copies of a kv head's block — so
   their producer share (one copy) folds into ``v_proj`` (:attr:`FoldPlan.tie`).
3. **Verify numerically**: every candidate fold is applied with random positive scales to the
   float block on real inputs; if the block output moves by more than :func:`fold_rtol` (relative L2)
   the group gets an *explicit* input scale instead (``PackedLinear.input_scale``), with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lightning_quant.algorithms.awq import ScaleTie, tie_expand
from lightning_quant.calibration.distributed import all_reduce_sum, operand_like
from lightning_quant.targets import is_linear_like, linear_weight

__all__ = [
    "FOLD_RTOL",
    "GENERIC_INDIRECT_FOLDS",
    "INDIRECT_FOLDS",
    "FoldCandidate",
    "FoldPlan",
    "discover_groups",
    "fold_into_producer",
    "fold_rtol",
    "model_type",
    "scale_input_columns",
]

_LLAMA_LIKE = (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj"))
#: ``config.model_type`` -> ``(producer, consumer)`` pairs (names relative to the block) whose fold
#: passes through attention (linear in v per channel) or an elementwise product / ReLU.
INDIRECT_FOLDS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "olmo": _LLAMA_LIKE, "smollm3": _LLAMA_LIKE,
    "opt": (("self_attn.v_proj", "self_attn.out_proj"), ("fc1", "fc2")),
    "gpt2": (),  # fused c_attn (q|k|v in one linear) and GELU between c_fc and c_proj: nothing indirect
}
#: Used for a model type not in :data:`INDIRECT_FOLDS` (every pair is still verified numerically).
GENERIC_INDIRECT_FOLDS: tuple[tuple[str, str], ...] = _LLAMA_LIKE
#: Largest relative L2 change of the block output a verified fold may cause (float32 rounding only).
FOLD_RTOL = 1e-4


def fold_rtol(dtype: torch.dtype) -> float:
    """:data:`FOLD_RTOL`, or ``4 * eps`` of a coarser weight dtype (bfloat16: 0.031, float16: 0.0039).

    A correct fold only re-rounds each rescaled weight (relative error ``<= eps / 2`` per element, so the
    block output moves by a few ``eps / 2``); a wrong one moves it by the spread of the random test
    scales (``exp(U(-0.5, 0.5))``: tens of percent), far above either bound."""
    return max(FOLD_RTOL, 4 * torch.finfo(dtype).eps)


_WRAPPER_SUFFIX = ".base_layer"  # peft keeps the original linear here


@dataclass
class FoldPlan:
    """One group of targets sharing an input and where its scales go.

    ``group``: qualified target names (call order). ``producer``: qualified name of the module the
    scales fold into, or ``None`` (explicit input scaling). ``kind``: ``"norm"`` / ``"linear"`` /
    ``None``. ``companions``: other linear-like readers of the input (scaled by ``s`` on their input
    columns). ``reason``: why the group is folded or explicit (for the report). ``tie``: a
    :class:`~lightning_quant.algorithms.awq.ScaleTie` when the producer feeds the group through grouped-query
    attention: the group's scales must be equal across the ``repeats`` copies of each kv head's block.
    """

    group: tuple[str, ...]
    producer: str | None
    kind: str | None
    companions: tuple[str, ...]
    reason: str
    tie: ScaleTie | None = None

    @property
    def folded(self) -> bool:
        return self.producer is not None

    def producer_scales(self, s: Tensor) -> Tensor:
        """The producer's share of the group's scales ``s [in]``: ``s`` itself, or under a tie the
        first copy of each kv head's block, ``[kv·hd]``."""
        return s if self.tie is None else self.tie.producer_share(s)


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of the outermost HF model inside ``model`` (a LightningModule, a peft
    wrapper or the HF model itself), else ``None``."""
    for m in model.modules():
        kind = getattr(getattr(m, "config", None), "model_type", None)
        if isinstance(kind, str) and kind:
            return kind
    return None


# ---- applying a fold (shared by verification, the swap and the float-exactness helper) --------
@torch.no_grad()
def fold_into_producer(module: nn.Module, kind: str, s: Tensor) -> None:
    """Divide the producer's output channels by ``s [C]``: a norm's weight/bias or a linear's rows/bias
    (a sharded ``DTensor`` weight is divided shard by shard: ``s`` is replicated onto its mesh)."""
    if kind == "linear":
        w = linear_weight(module)
        w.div_(operand_like(w, s.to(w.dtype).unsqueeze(1)))  # [out, in] / [out, 1]
    else:
        module.weight.div_(operand_like(module.weight, s.to(module.weight.dtype)))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(operand_like(bias, s.to(bias.dtype)))


@torch.no_grad()
def scale_input_columns(module: nn.Module, s: Tensor) -> None:
    """Multiply a linear-like module's input columns by ``s [in]`` (``W <- W diag(s)``)."""
    w = linear_weight(module)
    w.mul_(operand_like(w, s.to(w.dtype).unsqueeze(0)))


def _norm_like(m: nn.Module, width: int) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 1 and w.shape[0] == width and not is_linear_like(m)


# ---- discovery -----------------------------------------------------------------------------------
def _trace(block: nn.Module, inp) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """One forward of ``block`` recording (name, tensor) of every module's first input and output."""
    ins, outs, handles = [], [], []
    for name, mod in block.named_modules():
        if not name:
            continue

        def pre(m, args, _n=name):
            if args and isinstance(args[0], Tensor):
                ins.append((_n, args[0]))

        def post(m, args, out, _n=name):
            if isinstance(out, Tensor):
                outs.append((_n, out))

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            block(inp.hidden, *inp.args, **inp.kwargs)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


@dataclass(frozen=True)
class FoldCandidate:
    """Where a group's scales could fold, before the numerical check: ``producer`` (a module path in the block,
    ``None``: nowhere), its ``kind`` (``"norm"`` / ``"linear"``), the ``companions`` reading the same input,
    the ``reason`` (for the report) and the grouped-query ``tie`` (indirect folds into ``v_proj`` only)."""

    producer: str | None
    kind: str | None
    companions: tuple[str, ...]
    reason: str
    tie: ScaleTie | None = None


def _direct_candidate(key: Tensor, width: int, rel_group: set[str], ins, outs, block: nn.Module) -> FoldCandidate:
    producer = next((n for n, t in outs if t is key), None)  # innermost module returning the tensor
    companions = tuple(n for n, t in ins if t is key and n not in rel_group and is_linear_like(block.get_submodule(n)))
    if producer is None:
        return FoldCandidate(None, None, companions, "its input is not a module's output")
    mod = block.get_submodule(producer)
    if is_linear_like(mod) and linear_weight(mod).shape[0] == width:
        return FoldCandidate(producer, "linear", companions, f"folded into linear {producer}")
    if _norm_like(mod, width):
        return FoldCandidate(producer, "norm", companions, f"folded into {type(mod).__name__} {producer}")
    return FoldCandidate(None, None, companions,
                         f"its producer {producer} ({type(mod).__name__}) has no per-channel weight")


def _gqa_tie(block: nn.Module, prod: str, outputs: int, width: int) -> ScaleTie | None:
    """The :class:`ScaleTie` when ``prod``'s ``outputs`` reach ``width`` features as whole
    heads repeated (grouped-query attention); the head size comes from the attention module's ``head_dim``."""
    parent = block.get_submodule(prod.rpartition(".")[0]) if "." in prod else block
    hd = getattr(parent, "head_dim", None)
    if not isinstance(hd, int) or hd <= 0 or outputs % hd or width % outputs:
        return None
    return ScaleTie(outputs // hd, width // outputs, hd)


def _indirect_candidate(rel_group: list[str], width: int, pairs, block: nn.Module) -> FoldCandidate:
    """The candidate for a group with no direct producer, from the data mapping ``pairs`` (no companions)."""
    for prod, cons in pairs:
        if not any(r == cons or r.endswith("." + cons) for r in rel_group):
            continue
        try:
            mod = block.get_submodule(prod)
        except AttributeError:
            return FoldCandidate(None, None, (), f"mapped producer {prod} does not exist in the block")
        if not is_linear_like(mod):
            return FoldCandidate(None, None, (), f"mapped producer {prod} is a {type(mod).__name__}, not a plain "
                                 "linear (e.g. a LoRA wrapper)")
        outputs = linear_weight(mod).shape[0]
        if outputs == width:
            return FoldCandidate(prod, "linear", (), f"folded into linear {prod} (indirect pair {prod} -> {cons})")
        tie = _gqa_tie(block, prod, outputs, width)
        if tie is None:
            return FoldCandidate(None, None, (), f"mapped producer {prod} has {outputs} outputs but the group reads "
                                 f"{width} features and no head_dim tells how they repeat")
        return FoldCandidate(prod, "linear", (), (f"folded into linear {prod} (indirect pair {prod} -> {cons}; "
                                                  f"grouped-query attention: scales tied across the {tie.repeats} "
                                                  f"query heads of each of {tie.kv_heads} kv heads)"), tie)
    return FoldCandidate(None, None, (), "no foldable producer")


def _verify(block: nn.Module, inp, ref: Tensor, plan_rel: tuple, modules: list[nn.Module], width: int,
            seed: int, tie: ScaleTie | None = None) -> bool:
    """Apply the fold with random (tied) scales, compare the block output, undo. True if within FOLD_RTOL."""
    producer, kind = plan_rel
    pmod = block.get_submodule(producer)
    touched = [pmod] + modules
    saved = [(t, t.detach().clone()) for m in touched for t in (m.weight, getattr(m, "bias", None))
             if isinstance(t, Tensor)]
    g = torch.Generator().manual_seed(seed)
    s_prod = torch.exp(torch.rand(width if tie is None else tie.producer_width, generator=g, dtype=torch.float32) - 0.5)
    s_prod = s_prod.to(pmod.weight.device)
    s = tie_expand(s_prod, tie)
    with torch.no_grad():
        try:
            fold_into_producer(pmod, kind, s_prod)
            for m in modules:
                scale_input_columns(m, s)
            out = _run(block, inp)
        finally:
            for t, v in saved:
                t.copy_(v)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    ok = torch.tensor([0.0 if rel <= fold_rtol(pmod.weight.dtype) else 1.0], dtype=torch.float32)
    return float(all_reduce_sum(ok)) == 0.0  # every DDP rank must agree


def _run(block, inp) -> Tensor:
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def discover_groups(block: nn.Module, prefix: str, members: dict[str, nn.Module], inp,
                    family: str | None = None) -> list[FoldPlan]:
    """Fold plans for the target ``members`` (logical name -> module) of ``block`` in call order.

    ``prefix`` is the block's qualified name; ``inp`` one calibration input of the block (a
    :class:`~lightning_quant.calibration.BlockInput`); ``family`` a ``config.model_type``.
    """
    paths = {id(m): n for n, m in block.named_modules()}
    rel = {n: paths[id(m)] for n, m in members.items()}  # module paths in the block (a peft host's base_layer)
    by_rel = {r: n for n, r in rel.items()}
    ins, outs = _trace(block, inp)
    groups: list[tuple[Tensor, list[str]]] = []
    for r, t in ins:
        if r not in by_rel or any(r in g for _, g in groups):
            continue
        same = next((g for key, g in groups if key is t), None)
        same.append(r) if same is not None else groups.append((t, [r]))
    missing = [by_rel[r] for r in by_rel if not any(r in g for _, g in groups)]
    if missing:
        raise RuntimeError(f"AWQ: {missing} never ran in the block's forward; exclude them or check block_path.")
    pairs = INDIRECT_FOLDS.get(family, GENERIC_INDIRECT_FOLDS) if family else GENERIC_INDIRECT_FOLDS
    plans, ref = [], None
    for i, (key, group) in enumerate(groups):
        width = key.shape[-1]
        cand = _direct_candidate(key, width, set(group), ins, outs, block)
        if cand.producer is None:
            indirect = _indirect_candidate([r.removesuffix(_WRAPPER_SUFFIX) for r in group], width, pairs, block)
            cand = indirect if indirect.producer is not None else replace(
                cand, reason=f"{cand.reason}; {indirect.reason}")
        if cand.producer is not None:
            mods = [block.get_submodule(r) for r in group + list(cand.companions)]
            if ref is None:
                with torch.no_grad():
                    ref = _run(block, inp)
            if not _verify(block, inp, ref, (cand.producer, cand.kind), mods, width, seed=i, tie=cand.tie):
                tol = fold_rtol(block.get_submodule(cand.producer).weight.dtype)
                cand = replace(cand, producer=None, kind=None, tie=None,
                               reason=f"fold into {cand.producer} failed the numerical check (block output moved > {tol:g})")
        plans.append(FoldPlan(tuple(by_rel[r] for r in group),
                              None if cand.producer is None else f"{prefix}.{cand.producer}", cand.kind,
                              tuple(f"{prefix}.{c}" for c in cand.companions), cand.reason, cand.tie))
    return plans
