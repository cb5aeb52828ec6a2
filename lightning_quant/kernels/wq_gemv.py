"""Decode GEMV for packed weights (``M <= GEMV_MAX_ROWS``): no ``tl.dot``, one launch per call.

``y [M, N] = x [M, K] @ W^T + b`` with the operands of :mod:`lightning_quant.kernels.wq_matmul`
(``qweight`` int32 ``[ceil(K·b/32), N]``, ``scales [G, N]``, ``qzeros [G, ceil(N·b/32)]`` or ``None``,
act-order ``perm [K]``). At a handful of rows the product is a matrix-vector product bound by the
weight stream, and tensor cores (16-row MMA tiles, operands staged through shared memory) only add
work per weight. Here:

* one program owns ``BLOCK_N`` outputs and a ``K / SPLIT_K`` slice; per step it loads
  ``[BLOCK_K·b/32, BLOCK_N]`` packed words (consecutive outputs are consecutive words, so a warp's
  load is one 128-byte line per word row), unpacks them in registers as ``[word row, code, N]``
  without a reshape, multiplies by the activations broadcast over ``N`` and sums the code axes in
  registers: the ``K`` reduction needs no shared memory;
* **magic-number dequantization**, no integer-to-float conversion instruction: the word load, scales,
  zeros and unpacking are :func:`lightning_quant.kernels._packed.packed_step`, shared with the prefill
  dequantization. float16 activations and scales multiply its float16 tile, bit for bit the reference;
  other dtypes (bfloat16, float32, mixed) round its exact float32 ``(q − z)·s`` once to the activation
  dtype, as the reference does. (A bfloat16 ``q | 0x4300`` trick works on the GPU too, but Triton's CPU
  interpreter cannot bitcast to bfloat16, and the tests must run it.);
* **act-order** gathers the activations inside the kernel (``x[m, perm[k]]``): no ``index_select``;
* **one launch**: with ``SPLIT_K = 1`` the program adds the bias, casts and stores. With
  ``SPLIT_K > 1`` the programs of one output tile ``atomic_add`` (``sem="relaxed"``) float32
  partials into a persistent, zeroed per-device workspace and bump the tile's arrival counter; the
  last to arrive adds the bias, casts, stores, and zeroes the workspace rows and the counter for the
  next call. No memset or cast kernel per call; offsets into ``qweight`` are int64.

The workspace (:func:`lightning_quant.kernels._runtime.split_workspace`: ``GEMV_MAX_ROWS · N`` float32
plus one int32 counter per tile, shared with the tensor-core split-K path, grown on demand) is created
once per device and stream with ``torch.zeros``; calls on one stream are ordered, so they never share
it concurrently. It is allocated outside any CUDA-graph capture on the first call (warm up before
capturing).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_quant.kernels import _packed, _runtime

__all__ = ["GEMV_MAX_ROWS", "gemv_configs", "gemv_constants", "prune_gemv", "wq_gemv"]

#: Inputs with at most this many rows take the GEMV (``path="gemv"``) under ``path="auto"``.
GEMV_MAX_ROWS = 8
_PER_CHANNEL_GROUP = 1 << 30
_HALF_CODE = {torch.float16: 1}
tl = None  # triton.language, bound on the first kernel build (lazy import)
packed_step = None  # _packed.packed_step jitted, bound on the first kernel build
split_epilogue = None  # _packed.split_epilogue jitted, likewise


def _wq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, p_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_zg,
                    BITS: tl.constexpr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Outputs ``[M, BLOCK_N]`` of tile ``program_id(0)`` over the ``K`` slice ``program_id(1)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)  # K steps per split
    k_begin = pid_k * steps * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(steps):
        w, offs_k, mask_k = packed_step(qw_ptr, s_ptr, z_ptr, k_begin + step * BLOCK_K, offs_n, mask_n, N, K,
                                        stride_zg, BITS, ASYM, GROUP_SIZE, HALF, BLOCK_N, BLOCK_K)
        if HALF == 1:  # the float16 product is the reference's rounding
            w = w.to(tl.float32)
        else:  # the exact float32 (q − z)·s, rounded once to x's dtype as the reference
            w = w.to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        if HAS_PERM:
            src = tl.load(p_ptr + offs_k, mask=mask_k, other=0)
        else:
            src = offs_k
        for mi in tl.static_range(BLOCK_M):  # unrolled: each row reuses the dequantized tile
            row_ok = (offs_k * 0 + mi) < M  # tensor-shaped: M == 1 arrives as a constant
            a = tl.load(x_ptr + mi * K + src, mask=mask_k & row_ok, other=0.0).to(tl.float32)  # [WR, PER]
            # [WR, PER, 1] x [WR, PER, BLOCK_N] -> sums over the code axes (in-thread) -> [BLOCK_N]
            part = tl.sum(tl.sum(a[:, :, None] * w, axis=1), axis=0)
            acc += tl.where(offs_m[:, None] == mi, part[None, :], 0.0)
    mask_out = (offs_m < M)[:, None] & mask_n[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    split_epilogue(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, out_off, offs_n, mask_n, mask_out, pid_n, HAS_BIAS,
                   BLOCK_M, BLOCK_N, SPLIT_K)


def gemv_configs(triton) -> list:
    """``(BLOCK_N, BLOCK_K, SPLIT_K, warps)``: ``BLOCK_N = 128·warps`` keeps each warp on its own
    128 outputs (4 words per thread, one 16-byte load per word row) so the ``K`` sums stay in-thread."""
    shapes = [(128, 64, 1, 1), (128, 64, 4, 1), (128, 32, 8, 1), (256, 64, 1, 2), (256, 64, 4, 2),
              (512, 32, 8, 4), (128, 16, 8, 1), (256, 16, 8, 2), (128, 8, 8, 1), (256, 8, 16, 2)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": sk}, num_warps=w, num_stages=3)
            for n, k, sk, w in shapes]


def prune_gemv(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune pre-filter: ``BLOCK_K`` must hold whole words (``>= 32/bits`` codes); prefer the configs
    whose ``BLOCK_K`` divides the group size (one scale row per step), then those whose activation
    chunk fits in registers, ``BLOCK_M · BLOCK_K <= 64`` (every thread holds the chunk of all rows:
    8 rows x 64 spill KiBs), else the smallest ``BLOCK_K``."""
    def arg(name, default=None):
        return kwargs.get(name, named_args.get(name, default))

    group, rows, per = arg("GROUP_SIZE"), arg("BLOCK_M", 1), 32 // arg("BITS", 4)
    whole = [c for c in configs if c.kwargs["BLOCK_K"] >= per]
    aligned = [c for c in whole if group is not None and group % c.kwargs["BLOCK_K"] == 0] or whole
    fit = [c for c in aligned if rows * c.kwargs["BLOCK_K"] <= 64]
    smallest = min(c.kwargs["BLOCK_K"] for c in aligned)
    return fit or [c for c in aligned if c.kwargs["BLOCK_K"] == smallest]


def gemv_constants(bits: int, asym: bool, has_bias: bool, has_perm: bool, group_size: int, x_dtype: torch.dtype,
                   scale_dtype: torch.dtype, rows: int) -> dict:
    """The kernel's constexpr arguments besides the block sizes (one specialisation per distinct dict)."""
    half = _HALF_CODE.get(x_dtype, 0) if scale_dtype == x_dtype else 0  # 1: float16 magic, 0: float32 magic
    return {"BITS": bits, "ASYM": asym, "HAS_BIAS": has_bias, "HAS_PERM": has_perm,
            "GROUP_SIZE": _PER_CHANNEL_GROUP if group_size == -1 else group_size, "HALF": half,
            "BLOCK_M": max(1, 1 << max(rows - 1, 0).bit_length())}


@functools.cache
def _build(interpret: bool):
    return _runtime.build_kernels(globals(), _wq_gemv_kernel, interpret, {"tuned": (gemv_configs, {
        "key": ["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M"], "prune_configs_by": {"early_config_prune": prune_gemv}})}, helpers=(_packed.packed_step, _packed.split_epilogue))


def wq_gemv(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor | None, perm: Tensor | None,
            bias: Tensor | None, bits: int, group_size: int, config: dict | None = None) -> Tensor:
    """Launch the GEMV for ``x [M, K]`` with ``M <= GEMV_MAX_ROWS``; inputs as
    :func:`lightning_quant.kernels.wq_matmul.wq_linear` (``x`` in the original feature order).

    ``config`` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, optional ``num_warps``) skips autotuning; it is
    required under ``TRITON_INTERPRET=1``.
    """
    m, k = x.shape
    n = scales.shape[1]
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"The GEMV takes at most {GEMV_MAX_ROWS} rows, got {m}; use path='splitk' or 'gemm'.")
    x = x.contiguous()
    out = x.new_empty(m, n)
    if m == 0:
        return out
    kernels = _build(_runtime.interpreting())
    const = gemv_constants(bits, qzeros is not None, bias is not None, perm is not None, group_size, x.dtype,
                           scales.dtype, m)
    min_block = 32 if config is None else config["BLOCK_N"]  # smallest tile: most counters
    ws, cnt = _runtime.split_workspace(x.device, GEMV_MAX_ROWS * n, -(-n // min_block))
    args = (x, qweight, scales, qweight if qzeros is None else qzeros, x if bias is None else bias,
            x if perm is None else perm, out, ws, cnt, m, n, k, 0 if qzeros is None else qzeros.shape[1])
    with _runtime.on_device(x):
        _packed.launch_packed(kernels, n, bits, args, const, config, "the decode GEMV")
    return out
