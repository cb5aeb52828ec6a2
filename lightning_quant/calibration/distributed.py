"""``torch.distributed`` helpers that are no-ops in a single process.

Under DDP each rank calibrates on its own share of the batches; statistics (GPTQ Hessian sums and
token counts) are summed with :func:`all_reduce_sum` before solving, so every rank computes the
same result as one process would on all the data.

Under FSDP the strategy's own sharding stays in charge: :func:`unsharded` asks the FSDP unit that
owns a module to gather its full parameters (FSDP2 ``FSDPModule.unshard`` / ``reshard``; FSDP1
``summon_full_params``) for the duration of a block, one unit at a time, so no rank holds more than
that unit unsharded; :func:`owning_unit` finds the unit of a submodule. Every rank must enter the
same units in the same order (they are collectives).

FSDP1 keeps each unit's parameters in one flat parameter whose views it sets on the modules it wrapped,
and it refuses to run a unit's forward while its parameters are summoned. So a gathered FSDP1 block runs
through its inner module (:func:`runnable`); the root unit (under Lightning, the wrapper around the
LightningModule: :func:`fsdp1_root`) is summoned while its parameters (embeddings, final norm, head) are
needed; and a unit whose layers were replaced by packed ones is unwrapped (:func:`settle_fsdp1`), its
remaining parameters kept full, so the model stays consistent (``state_dict``, forward).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "all_reduce_sum",
    "block_gathered",
    "broadcast",
    "broadcast_figures",
    "broadcast_quantized",
    "check_fsdp1_placement",
    "converted_groups",
    "fsdp1_root",
    "fsdp_units",
    "full_state_dict",
    "full_tensor",
    "gathered_root",
    "is_distributed",
    "is_sharded",
    "layer_gathered",
    "operand_like",
    "owning_unit",
    "rank",
    "reshard_all",
    "runnable",
    "settle_fsdp1",
    "shard",
    "unsharded",
    "unwrap_unit",
    "world_size",
]

T = TypeVar("T")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (no-op without an initialised process group); returns ``t``.

    Tensors on a device the backend cannot reduce (CPU tensors under NCCL) travel through the
    backend's device and are copied back.
    """
    if not is_distributed():
        return t
    backend = torch.distributed.get_backend()
    if backend == "nccl" and t.device.type != "cuda":
        tmp = t.to(f"cuda:{torch.cuda.current_device()}")
        torch.distributed.all_reduce(tmp)
        t.copy_(tmp)
    else:
        torch.distributed.all_reduce(t)
    return t


def broadcast(t: Tensor, src: int) -> Tensor:
    """Broadcast ``t`` in place from rank ``src`` (no-op without a process group); returns ``t``. Like
    :func:`all_reduce_sum`, CPU tensors travel through the device under NCCL."""
    if not is_distributed():
        return t
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        tmp = t.to(f"cuda:{torch.cuda.current_device()}")
        torch.distributed.broadcast(tmp, src)
        t.copy_(tmp)
    else:
        torch.distributed.broadcast(t, src)
    return t


def broadcast_figures(values: Sequence[float] | None, n: int, src: int, device: torch.device | str = "cpu") -> list[float]:
    """``n`` floats given on rank ``src`` (``None`` elsewhere), on every rank (float64: exact for flags,
    counts and float32 figures)."""
    head = torch.zeros(n, dtype=torch.float64, device=device)
    if values is not None:
        head.copy_(torch.tensor([float(v) for v in values], dtype=torch.float64))
    return broadcast(head, src).tolist()


def broadcast_quantized(qw, src: int, shape: tuple[int, int], spec, dtype: torch.dtype,
                        device: torch.device | str = "cpu"):
    """A :class:`~lightning_quant.quantized.QuantizedWeight` of an ``[out, in]`` weight, computed on rank ``src``
    (``None`` elsewhere), on every rank: which optional tensors exist and the group count, then each tensor.
    ``src`` gets its own object back (the callers share their figures)."""
    from lightning_quant.quantized import QuantizedWeight

    out_f, in_f = shape
    head = broadcast_figures(None if qw is None else (qw.zeros is not None, qw.g_idx is not None,
                                                      qw.perm is not None, qw.scales.shape[1]), 4, src, device)
    has_zeros, has_g, has_perm, groups = (int(v) for v in head)

    def share(t: Tensor | None, size, kind) -> Tensor:
        buf = t.to(device).contiguous() if t is not None else torch.empty(size, dtype=kind, device=device)
        return broadcast(buf, src)

    codes = share(None if qw is None else qw.codes, (out_f, in_f), torch.uint8)
    scales = share(None if qw is None else qw.scales, (out_f, groups), torch.float32)
    zeros = share(None if qw is None else qw.zeros, (out_f, groups), torch.float32) if has_zeros else None
    g_idx = share(None if qw is None else qw.g_idx, (in_f,), torch.int64) if has_g else None
    perm = share(None if qw is None else qw.perm, (in_f,), torch.int64) if has_perm else None
    if qw is not None:
        return qw
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, spec=spec, g_idx=g_idx, perm=perm, dtype=dtype)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """Round-robin share of ``items`` for one rank: indices ``i`` with ``i % world == rank``.

    Raises when some rank would get nothing (every rank must take part in the all-reduces).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if len(items) < w:
        raise ValueError(
            f"{len(items)} calibration batch(es) cannot be shared by {w} ranks; raise num_samples to at least {w}."
        )
    return [x for i, x in enumerate(items) if i % w == r]


def _fsdp_unit_types() -> tuple[type, ...]:
    """FSDP2's ``FSDPModule`` and FSDP1's ``FullyShardedDataParallel`` (those this torch has)."""
    kinds = [_fsdp2_module()] if _fsdp2_module() else []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        kinds.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def fsdp_units(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of every FSDP unit in ``model`` (FSDP2 ``fully_shard`` or FSDP1 wrappers)."""
    kinds = _fsdp_unit_types()
    return {n: m for n, m in model.named_modules() if kinds and isinstance(m, kinds)}


def owning_unit(units: dict[str, nn.Module], path: str) -> str | None:
    """The innermost unit (path) of ``units`` containing the module at ``path``, or ``None``."""
    owners = [u for u in units if u == "" or path == u or path.startswith(u + ".")]
    return max(owners, key=len, default=None)


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2 / tensor parallel) or ``model`` holds FSDP units."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return bool(fsdp_units(model))
    return any(isinstance(p, DTensor) for p in model.parameters()) or bool(fsdp_units(model))


def full_tensor(t: Tensor) -> Tensor:
    """The full value of ``t``: ``DTensor.full_tensor()`` (a collective: every rank must call it), else ``t``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def _fsdp2_module() -> type | tuple:
    """FSDP2's ``FSDPModule`` (``()`` on a torch without it: ``isinstance`` is then always False)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return ()
    return FSDPModule


@contextmanager
def unsharded(unit: nn.Module | None, across_forward: bool = False) -> Iterator[None]:
    """Full parameters of one FSDP ``unit`` inside the block (no-op for ``None`` or a plain module).

    With ``across_forward`` (FSDP2 only) the unit also stays unsharded through its own forward calls
    (``set_reshard_after_forward(False)``), so weights written into it last until the block ends — a
    calibration step. Writes are never kept after the block (FSDP2 reshards the old shards; FSDP1 is asked
    not to write back): callers that change weights install new modules instead.
    """
    if unit is None:
        yield
        return
    if isinstance(unit, _fsdp2_module()):
        if across_forward:
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
        try:
            yield
        finally:
            unit.reshard()
            if across_forward:
                unit.set_reshard_after_forward(True, recurse=False)
        return
    if _is_fsdp1(unit):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if across_forward:
            _check_flat_block(unit)
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            yield
        return
    yield


def reshard_all(units: dict[str, nn.Module]) -> None:
    """Put every FSDP2 unit back to its shards (a forward stopped inside a unit leaves it unsharded); FSDP1
    units reshard at the end of their own forward, and a forward stopped before one never unsharded it."""
    for unit in units.values():
        if isinstance(unit, _fsdp2_module()):
            unit.reshard()


def _is_fsdp1(m: nn.Module | None) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, FullyShardedDataParallel)


def _check_flat_block(unit: nn.Module) -> None:
    """A block calibrated under FSDP1 runs through its inner module while summoned: units nested inside
    it would run FSDP's forward, which FSDP1 refuses during a summon."""
    nested = [n for n, m in unit.module.named_modules() if _is_fsdp1(m)]
    if nested:
        raise TypeError(
            f"Block-wise calibration under FSDPStrategy (FSDP1) needs each decoder block to be one FSDP unit, but "
            f"this block holds nested units ({nested[:3]}); wrap whole decoder layers, e.g. "
            "FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}), or use ModelParallelStrategy (FSDP2)."
        )


def runnable(module: nn.Module) -> nn.Module:
    """The module to call inside :func:`unsharded`: an FSDP1 unit's inner module (FSDP1 runs no forward of a
    summoned unit; the summoned inner module computes with the full parameters), else ``module`` itself."""
    return module.module if _is_fsdp1(module) else module


def fsdp1_root(trainer) -> nn.Module | None:
    """The FSDP1 root wrapper around the LightningModule under ``FSDPStrategy`` (it owns the parameters of
    every module no nested unit wraps: embeddings, final norm, head), else ``None``."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if _is_fsdp1(model) else None


@contextmanager
def gathered_root(trainer) -> Iterator[None]:
    """The FSDP1 root unit's own parameters summoned (nested units stay sharded: they gather themselves in
    their forward or through :func:`unsharded`) for work outside the strategy's forward — calibration,
    statistics, export. A no-op under any other strategy."""
    with unsharded(fsdp1_root(trainer)):
        yield


def _stale(unit: nn.Module) -> bool:
    """True when some module whose parameters ``unit``'s flat parameter holds is no longer inside it."""
    handle = getattr(unit, "_handle", None)
    if handle is None:
        return False
    live = {id(m) for m in unit.modules()}
    return any(id(info.module) not in live for info in handle.flat_param._param_infos)


@torch.no_grad()
def unwrap_unit(model: nn.Module, path: str) -> nn.Module:
    """Replace the FSDP1 unit at ``path`` in ``model`` by its inner module, every parameter it still holds
    gathered (the unit summoned) and kept full as a plain parameter, ties kept; returns the inner module.
    Used when the unit's layers are converted: packed layers are full on every rank, so is what remains of
    the unit (norms, layers left in float). A collective: every rank unwraps the same units in order."""
    unit = model.get_submodule(path) if path else model
    if not path:
        raise TypeError("The model itself is the FSDP1 unit whose layers are converted; it cannot be unwrapped. "
                        "Wrap the decoder layers as units: FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}).")
    flat = unit._handle.flat_param if getattr(unit, "_handle", None) is not None else None
    live = {id(m) for m in unit.modules()}
    owners: list[tuple[nn.Module, str, nn.Parameter]] = []
    if flat is not None:
        with unsharded(unit):
            full: dict[int, nn.Parameter] = {}
            for i in flat._param_infos:
                if id(i.module) in live:
                    p = getattr(i.module, i.param_name)
                    full[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    owners.append((i.module, i.param_name, full[id(p)]))
            owners += [(i.module, i.param_name, full[id(getattr(i.prim_module, i.prim_param_name))])
                       for i in flat._shared_param_infos if id(i.module) in live and id(i.prim_module) in live]
    for m, name, p in owners:
        if name in m.__dict__:  # FSDP1 may set a view as a plain attribute
            delattr(m, name)
        m._parameters[name] = p
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, unit.module)
    return unit.module


def settle_fsdp1(model: nn.Module) -> list[str]:
    """Unwrap (:func:`unwrap_unit`) every FSDP1 unit of ``model`` some of whose layers were replaced (QAT's
    packed layers): FSDP1 would otherwise keep setting parameter views on modules that left the model, and
    fail in ``state_dict``. Returns the unwrapped paths; a no-op without FSDP1."""
    stale = [path for path, unit in fsdp_units(model).items() if _is_fsdp1(unit) and _stale(unit)]
    for path in stale:
        unwrap_unit(model, path)
    return stale


def converted_groups(model: nn.Module, names: Sequence[str]) -> Iterator[list[str]]:
    """``names`` (layer paths about to be replaced by packed layers) in groups to swap one after another:
    all at once without FSDP1; under FSDP1 one group per owning unit, each unit unwrapped (:func:`unwrap_unit`)
    just before its group is yielded, so a swap sees plain, full tensors and no rank holds more than one
    gathered float unit."""
    units = {p: u for p, u in fsdp_units(model).items() if _is_fsdp1(u)}
    if not units:
        yield list(names)
        return
    groups: dict[str | None, list[str]] = {}
    for n in names:
        groups.setdefault(owning_unit(units, n), []).append(n)
    for path, group in groups.items():
        if path is not None:
            unwrap_unit(model, path)
        yield group


def check_fsdp1_placement(trainer, model: nn.Module, names: Sequence[str], who: str) -> None:
    """Under ``FSDPStrategy``, raise unless every layer to convert lies inside a nested FSDP1 unit: layers the
    root unit owns (no auto-wrap policy, or ``lm_head``) cannot be converted without unwrapping the root."""
    if fsdp1_root(trainer) is None:
        return
    units = fsdp_units(model)
    outside = [n for n in names if owning_unit(units, n) is None]
    if outside:
        raise ValueError(
            f"{who} under FSDPStrategy converts layers one FSDP unit at a time, but {len(outside)} layer(s) belong "
            f"to the root unit: {outside[:4]}. Wrap the decoder layers as units, e.g. FSDPStrategy(auto_wrap_policy="
            "{LlamaDecoderLayer}), and exclude layers outside them (the default exclude=['lm_head'] does), or use "
            "ModelParallelStrategy (FSDP2)."
        )


def layer_gathered(model: nn.Module, path: str, units: dict[str, nn.Module] | None = None):
    """The FSDP unit owning the module at ``path`` summoned (:func:`unsharded`), so its weight is full;
    a no-op without FSDP. Under FSDP2 :func:`full_tensor` is the cheaper way to read one tensor."""
    units = fsdp_units(model) if units is None else units
    unit = owning_unit(units, path)
    return unsharded(None if unit is None else units[unit])


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict of a sharded ``model`` on global rank 0 (on CPU; ``{}`` elsewhere), a collective
    every rank must call. FSDP2: torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``.
    FSDP1: one unit summoned at a time, each module's own tensors read under its unit (names without the
    wrappers' segments); under Lightning call it inside :func:`gathered_root` for the root's tensors.
    This is how one rank writes a full checkpoint of an FSDP model."""
    units = {p: u for p, u in fsdp_units(model).items() if _is_fsdp1(u)}
    if not units:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    from lightning_quant.targets import logical_path

    keep = rank() == 0
    groups: dict[str | None, list[tuple[str, nn.Module]]] = {}
    for path, m in model.named_modules():
        groups.setdefault(owning_unit(units, path), []).append((path, m))
    out: dict[str, Tensor] = {}
    for unit, modules in groups.items():
        with unsharded(None if unit is None else units[unit]):
            for path, m in modules:
                tensors = [*m._parameters.items()] + [(k, b) for k, b in m._buffers.items()
                                                     if k not in m._non_persistent_buffers_set]
                for k, t in tensors:
                    if t is not None and keep and not _is_fsdp1(m):
                        out[logical_path(f"{path}.{k}" if path else k)] = t.detach().to("cpu", copy=True)
    return out


def block_gathered(unit: nn.Module | None):
    """One FSDP unit (a decoder block) gathered for a whole calibration step: :func:`unsharded` with
    ``across_forward=True`` (FSDP2: kept unsharded through its own forward calls; FSDP1: summoned, the block
    run through :func:`runnable`)."""
    return unsharded(unit, across_forward=True)


def operand_like(target: Tensor, t: Tensor) -> Tensor:
    """``t`` as an operand for an in-place op on ``target``: replicated on ``target``'s mesh when ``target``
    is a sharded ``DTensor`` (``t`` must be equal on every rank: no communication), else ``t`` itself."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # pragma: no cover
        return t
    if not isinstance(target, DTensor):
        return t
    mesh = target.device_mesh
    return DTensor.from_local(t.to(target.device), mesh, [Replicate()] * mesh.ndim, run_check=False)
