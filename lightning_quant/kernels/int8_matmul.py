"""int8 x int8 -> int32 matrix multiply (the core of LLM.int8() / W8A8 layers).

``int8_matmul(a [M, K] int8, b [N, K] int8) -> int32 [M, N]`` computes ``a @ b.T`` exactly in
integer arithmetic. The pure-torch reference below is the CPU path (and the oracle for the
Triton kernel, which the packed-layer work adds to this file).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["int8_matmul", "int8_matmul_reference"]


def int8_matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b.T`` for int8 inputs, accumulated in int32 (via int64 on CPU; no overflow for K < 2^17)."""
    return (a.to(torch.int64) @ b.to(torch.int64).t()).to(torch.int32)


def _check(a: Tensor, b: Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 tensors, got {a.dtype} and {b.dtype}.")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul needs a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}.")


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N]``."""
    _check(a, b)
    return int8_matmul_reference(a, b)
