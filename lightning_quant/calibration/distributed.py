"""``torch.distributed`` helpers that are no-ops in a single process.

Under DDP each rank calibrates on its own share of the batches; statistics (GPTQ Hessian sums and
token counts) are summed with :func:`all_reduce_sum` before solving, so every rank computes the
same result as one process would on all the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["all_reduce_sum", "is_distributed", "rank", "shard", "world_size"]

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
