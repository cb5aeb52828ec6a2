"""``torch.distributed`` helpers that are no-ops in a single process.

Under DDP each rank calibrates on its own share of the batches; statistics (GPTQ Hessian sums and
token counts) are summed with :func:`all_reduce_sum` before solving, so every rank computes the
same result as one process would on all the data.

Under FSDP the strategy's own sharding stays in charge: :func:`unsharded` asks the FSDP unit that
owns a module to gather its full parameters (FSDP2 ``FSDPModule.unshard`` / ``reshard``; FSDP1
``summon_full_params``) for the duration of a block, one unit at a time, so no rank holds more than
that unit unsharded; :func:`owning_unit` finds the unit of a submodule. Every rank must enter the
same units in the same order (they are collectives).
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
    "fsdp_units",
    "full_state_dict",
    "full_tensor",
    "is_distributed",
    "is_sharded",
    "operand_like",
    "owning_unit",
    "rank",
    "shard",
    "unsharded",
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
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(unit, FullyShardedDataParallel):
        if across_forward:
            raise TypeError("Block-wise calibration under FSDP1 (FSDPStrategy) is not supported; use "
                            "ModelParallelStrategy (FSDP2) or DDP.")
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            yield
        return
    yield


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict of a sharded ``model`` on global rank 0 (on CPU; ``{}`` elsewhere): torch's
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, a collective every rank must call.
    This is how one rank writes a full checkpoint of an FSDP model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def block_gathered(unit: nn.Module | None):
    """One FSDP2 unit (a decoder block) gathered for a whole calibration step: :func:`unsharded` with
    ``across_forward=True``."""
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
