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
* **magic-number dequantization**, no integer-to-float conversion instruction. Where no packed pair path
  applies (below) the word load, scales, zeros and unpacking are
  :func:`lightning_quant.kernels._packed.packed_step`, shared with the prefill dequantization: float16
  from float16 scales multiplies its float16 weights, any other dtype (float32, mixed, bfloat16 W8 or
  with groups smaller than the step) rounds the exact float32 ``(q − z)·s`` once to the activation
  dtype, as the reference does, and multiply-adds in float32;
* **16-bit activations with scales of their dtype, one scale row per step** (``GROUP_SIZE % BLOCK_K ==
  0``: every autotuned config for g32 and up; float16 W2/W4/W8, bfloat16 W2/W4) take **packed pair
  arithmetic** in inline PTX (:func:`lightning_quant.kernels._packed.f16x2_weights` / ``f16x2_fma``): a
  pair of codes ``j`` and ``j + PER/2`` of a word becomes the pair of the reference's weights with one
  ``LOP3`` (magic ``0x6400`` float16 / ``0x4300`` bfloat16; float16 puts a W4 code at bit offset 0 or 4
  of each half, so one shift per word serves two pairs), one exact ``HFMA2`` (``q − z``) and one
  ``HMUL2`` (times ``s``, the reference's one rounding; bfloat16 ``HFMA2.BF16`` with ``−0``): the weights
  are the reference's, bit for bit. Each is multiplied by its activation pair and added by ``HFMA2`` into
  a 16-bit partial per word row; a step's ``WR = BLOCK_K / PER`` row partials are summed by a 16-bit
  tree and the step's sum added to the float32 accumulator. Rounding: a product meets ``d = PER/2 +
  log2(WR)`` 16-bit roundings (7 for W4 with ``BLOCK_K`` 64), so a step's partial is off by at most
  ``γ_d·Σ|x·w|`` over its terms (``γ_d ≈ d·u``, ``u`` = ``2^-11`` float16, ``2^-8`` bfloat16), beyond the
  float32 sum of the steps and the final cast. A float16 partial overflows only where one step's
  products sum past 65504, where a float16 output would too. Other group sizes (16, 48) take the float32
  multiply-add path;
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
_HALF_CODE = {torch.float16: 1, torch.bfloat16: 2}
tl = None  # triton.language, bound on the first kernel build (lazy import)
packed_step = None  # _packed.packed_step jitted, bound on the first kernel build
f16x2_scale_zero = f16x2_weights = f16x2_fma = f16x2_sum_rows = f16x2_to_f32 = None  # likewise
pick_column = None
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
    if HALF >= 1 and GROUP_SIZE % BLOCK_K == 0 and (HALF == 1 or BITS != 8):  # packed pairs (_packed.half2_path)
        BF16: tl.constexpr = HALF == 2
        PER: tl.constexpr = 32 // BITS
        PER2: tl.constexpr = 16 // BITS
        WR: tl.constexpr = BLOCK_K // PER
        rows = k_begin // PER + tl.arange(0, WR)  # [WR] word rows of the first step
        w_ptrs = qw_ptr + rows.to(tl.int64)[None, :, None] * N + offs_n[None, None, :]  # [1, WR, BLOCK_N]
        ka = k_begin + tl.arange(0, WR)[:, None] * PER + tl.arange(0, PER2)[None, :]  # [WR, PER2]: low halves' columns
        xb_ptr = x_ptr.to(tl.pointer_type(tl.int16)) + (offs_m * K)[:, None, None]  # [BLOCK_M, 1, 1]
        row_ok = (offs_m < M)[:, None, None]
        for step in range(steps):
            k0 = k_begin + step * BLOCK_K
            words = tl.load(w_ptrs, mask=(rows < tl.cdiv(K, PER))[None, :, None] & mask_n[None, None, :], other=0)
            s2, z = f16x2_scale_zero(s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS, ASYM, GROUP_SIZE, BF16)
            if HAS_PERM:
                sa = tl.load(p_ptr + ka, mask=ka < K, other=0)
                sb = tl.load(p_ptr + ka + PER2, mask=ka + PER2 < K, other=0)
            else:
                sa = ka
                sb = ka + PER2
            xa = tl.load(xb_ptr + sa[None, :, :], mask=row_ok & (ka < K)[None, :, :], other=0).to(tl.int32)
            xc = tl.load(xb_ptr + sb[None, :, :], mask=row_ok & (ka + PER2 < K)[None, :, :], other=0).to(tl.int32)
            xp = (xa & 0xFFFF) | (xc << 16)  # [BLOCK_M, WR, PER2]: x[k_j] | x[k_j + PER2] << 16
            part = tl.zeros((BLOCK_M, WR, BLOCK_N), dtype=tl.int32)  # float16 pairs (+0, +0)
            for j in tl.static_range(PER2):
                w = f16x2_weights(words, s2, z, j, BITS, BF16)  # [1, WR, BLOCK_N]: once for all rows
                part = f16x2_fma(part, pick_column(xp, j, PER2)[:, :, None], w, BF16)
            acc += f16x2_to_f32(f16x2_sum_rows(part, WR, BF16), BF16)  # one step's 16-bit partials into float32
            w_ptrs += WR * N
            rows += WR
            ka += BLOCK_K
    else:
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
    """Autotune pre-filter: ``BLOCK_K`` must hold whole words (``>= 32/bits`` codes) and at most 8 word
    rows (``BLOCK_K·bits/32 <= 8``: W8 at ``BLOCK_K`` 64 holds 16 rows of words and partials a thread and
    spills under Triton 3.6); the float32 multiply-add path (not ``HALF``, or a group smaller than the
    step) at most 32 columns (its ``[BLOCK_K, 4]`` float32 weights a thread: 64 spill under 3.9); prefer the configs whose ``BLOCK_K`` divides the group size (one scale row
    per step), then those whose activation chunk fits in registers, ``BLOCK_M · BLOCK_K <= 64`` (every
    thread holds the chunk of all rows: 8 rows x 64 spill KiBs), else the smallest ``BLOCK_K``."""
    def arg(name, default=None):
        return kwargs.get(name, named_args.get(name, default))

    group, rows, bits, half = arg("GROUP_SIZE"), arg("BLOCK_M", 1), arg("BITS", 4), arg("HALF", 0)

    def fits(bk):  # whole words, at most 8 word rows; the float32 path at most 32 columns
        return 32 // bits <= bk <= 8 * (32 // bits) and (_packed.half2_path(half, bits, group, bk) or bk <= 32)

    whole = [c for c in configs if fits(c.kwargs["BLOCK_K"])]
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
        "key": ["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M"], "prune_configs_by": {"early_config_prune": prune_gemv}})}, helpers=(
        _packed.packed_step, *_packed.PAIR_HELPERS, _packed.split_epilogue))


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
