"""int8 x int8 -> int32 matrix multiply (the core of LLM.int8() / W8A8 layers).

``int8_matmul(a [M, K] int8, b [N, K] int8) -> int32 [M, N]`` computes ``a @ b.T`` exactly in
integer arithmetic (LLM.int8(), Dettmers et al. 2022, eq. 1 before the outer-product rescale).

* :func:`int8_matmul_reference` — pure torch (int64 products, exact for ``K < 2^17``): the CPU path
  and the oracle of the Triton kernel.
* ``lightning_quant::int8_matmul`` — ``torch.library`` op: reference on CPU, Triton on CUDA; a fake
  implementation lets ``torch.compile`` trace it.
* :func:`int8_outlier_matmul` — LLM.int8's mixed-precision decomposition around ``int8_matmul`` (the
  forward of ``Int8OutlierLinear``), with a static-width outlier path (no host sync).
* :func:`int8_matmul_triton` — the kernel launcher (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``):
  ``[BLOCK_M, BLOCK_N]`` tiles, ``tl.dot`` on int8 operands with an int32 accumulator (the tensor
  cores' IMMA path), autotuned over a small config set keyed by a power-of-two row bucket.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_quant.algorithms.llm_int8 import absmax_quantize_rows, outlier_columns
from lightning_quant.kernels import _runtime

__all__ = ["MAX_OUTLIER_COLUMNS", "int8_matmul", "int8_matmul_reference", "int8_matmul_triton", "int8_outlier_matmul"]

#: Width of the float outlier path of :func:`int8_outlier_matmul` (static, so no host sync decides it);
#: the paper reports at most a few dozen outlier feature dimensions per layer up to 13B parameters.
MAX_OUTLIER_COLUMNS = 128

tl = None  # triton.language, bound on the first kernel build (lazy import)


def int8_matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b.T`` for int8 inputs, accumulated in int32 (via int64 on CPU; no overflow for K < 2^17)."""
    return (a.to(torch.int64) @ b.to(torch.int64).t()).to(torch.int32)


def _int8_kernel(a_ptr, b_ptr, c_ptr, M, N, K, M_BUCKET,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C[m-tile, n-tile] = sum_k A[m, k] · B[n, k]`` with an int32 accumulator."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def _configs(triton):
    shapes = [(16, 64, 128, 4, 3), (16, 128, 128, 4, 4), (32, 128, 128, 4, 3), (64, 64, 128, 4, 4),
              (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@functools.cache
def _build(interpret: bool):
    return _runtime.build_kernels(globals(), _int8_kernel, interpret,
                                  {"tuned": (_configs, {"key": ["M_BUCKET", "N", "K"]})})


def int8_matmul_triton(a: Tensor, b: Tensor, config: dict | None = None) -> Tensor:
    """Launch the Triton kernel; ``config`` (``BLOCK_M/N/K``) skips autotuning (required when interpreting)."""
    _check(a, b)
    a, b = a.contiguous(), b.contiguous()
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if m == 0:
        return out
    kernels = _build(_runtime.interpreting())
    bucket = min(1 << max(m - 1, 0).bit_length(), 4096)
    if config is not None or "tuned" not in kernels:
        if config is None:
            raise ValueError("Under TRITON_INTERPRET=1 pass config={'BLOCK_M': .., 'BLOCK_N': .., 'BLOCK_K': ..}.")
        grid = (-(-m // config["BLOCK_M"]), -(-n // config["BLOCK_N"]))
        with _runtime.on_device(a):
            _runtime.launch(kernels["jit"], grid, a, b, out, m, n, k, bucket, **config)
    else:
        with _runtime.on_device(a):
            _runtime.launch(kernels["tuned"], lambda meta: (-(-m // meta["BLOCK_M"]), -(-n // meta["BLOCK_N"])),
                            a, b, out, m, n, k, bucket)
    return out


@torch.library.custom_op("lightning_quant::int8_matmul", mutates_args=())
def _int8_matmul_op(a: Tensor, b: Tensor) -> Tensor:
    if a.device.type == "cuda":
        return int8_matmul_triton(a, b)
    return int8_matmul_reference(a, b)


@_int8_matmul_op.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


def _check(a: Tensor, b: Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 tensors, got {a.dtype} and {b.dtype}.")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul needs a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}.")
    _runtime.check_device(a, b)


def int8_matmul(a: Tensor, b: Tensor, force_reference: bool | None = None) -> Tensor:
    """``a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N]``: Triton on CUDA, the reference on CPU.

    ``force_reference=True`` or ``LIGHTNING_QUANT_FORCE_REFERENCE=1`` forces the reference.
    """
    _check(a, b)
    if _runtime.reference_forced(force_reference):
        return int8_matmul_reference(a, b)
    return _int8_matmul_op(a.contiguous(), b.contiguous())


def int8_outlier_matmul(x: Tensor, codes: Tensor, scb: Tensor, threshold: float,
                        max_outliers: int = MAX_OUTLIER_COLUMNS, bias: Tensor | None = None,
                        out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """LLM.int8 product ``x [M, in] @ W^T (+ bias)`` for ``W = codes * SCB / 127``: returns ``(y [M, out], outliers [in])``,
    ``y`` float32 (``out_dtype=None``) or cast to ``out_dtype`` after the float32 bias add — the whole
    forward of :class:`~lightning_quant.layers.int8.Int8OutlierLinear` on a flat input.

    ``y = X_o W_o^T + (round(X_r·127/a) @ codes_r^T) · a/127 · SCB/127`` where ``o`` are the outlier
    columns (float path with dequantized weights) and ``r`` the rest (int8 x int8 -> int32 through
    :func:`lightning_quant.kernels.int8_matmul.int8_matmul`, ``a`` the per-token absmax of ``X_r``).

    Without a host sync: the float path has a static width of ``min(in, max_outliers)`` columns
    (``nonzero_static``; unused slots multiply zeros), so no ``bool(outliers.any())`` waits for the
    GPU. Outlier columns beyond the first ``max_outliers`` (in feature order) stay on the int8 path;
    ``outliers`` still marks every column above the threshold.
    """
    xf = x.float()
    outliers = outlier_columns(xf, threshold)
    width = min(x.shape[-1], max_outliers) if threshold > 0.0 else 0
    if width:
        kept = outliers & (torch.cumsum(outliers, 0) <= width)  # [in]: the first `width` outlier columns
        idx = torch.nonzero_static(kept, size=width, fill_value=0).squeeze(1)  # [width], padded with column 0
        valid = torch.arange(width, device=x.device) < kept.sum()  # [width]: False on the padding
        x_o = xf.index_select(1, idx) * valid  # [M, width]
        x_rest = xf.masked_fill(kept, 0.0)
    else:
        x_rest = xf
    a_codes, a_absmax = absmax_quantize_rows(x_rest)  # [M, in] int8, [M]
    acc = int8_matmul(a_codes, codes)  # [M, out] int32
    y = acc.float() * (a_absmax / 127.0).unsqueeze(1) * (scb.float() / 127.0).unsqueeze(0)
    if width:
        w_o = codes.index_select(1, idx).float() * (scb.float() / 127.0).unsqueeze(1)  # [out, width]
        y = y + x_o @ w_o.t()
    if bias is not None:
        y = y + bias.float()
    return (y if out_dtype is None else y.to(out_dtype)), outliers
