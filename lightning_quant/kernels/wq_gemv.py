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
* **magic-number dequantization**, no integer-to-float conversion instruction. float16 activations
  and scales: ``q | 0x6400`` is the float16 ``1024 + q`` (exact for 8-bit codes too: the exponent
  makes the spacing 1), minus ``1024 + z`` (same trick on the zero code) is the exact integer
  ``q − z``, times ``s`` one correctly rounded float16 product: bit for bit the reference's
  ``((q − z)·s in float32).to(float16)``, because ``(q − z)·s`` (at most 8 + 11 significant bits) is
  exact in float32 before its one rounding. Other dtypes (bfloat16, float32, mixed): ``q | 0x4B000000``
  is the float32 ``2^23 + q``, minus ``2^23 + z``, times ``s`` in float32, cast to the activation
  dtype — the reference's own operations. (A bfloat16 ``q | 0x4300`` trick works on the GPU too, but
  Triton's CPU interpreter cannot bitcast to bfloat16, and the tests must run it.);
* **act-order** gathers the activations inside the kernel (``x[m, perm[k]]``): no ``index_select``;
* **one launch**: with ``SPLIT_K = 1`` the program adds the bias, casts and stores. With
  ``SPLIT_K > 1`` the programs of one output tile ``atomic_add`` (``sem="relaxed"``) float32
  partials into a persistent, zeroed per-device workspace and bump the tile's arrival counter; the
  last to arrive adds the bias, casts, stores, and zeroes the workspace rows and the counter for the
  next call. No memset or cast kernel per call; offsets into ``qweight`` are int64.

The workspace (``[GEMV_MAX_ROWS, N]`` float32 plus one int32 counter per tile, grown on demand) is
created once per device and stream with ``torch.zeros``; calls on one stream are ordered, so they
never share it concurrently. It is allocated outside any CUDA-graph capture on the first call
(warm up before capturing).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_quant.kernels import _runtime

__all__ = ["GEMV_MAX_ROWS", "gemv_configs", "gemv_constants", "prune_gemv", "wq_gemv"]

#: Inputs with at most this many rows take the GEMV (``path="gemv"``) under ``path="auto"``.
GEMV_MAX_ROWS = 8
_PER_CHANNEL_GROUP = 1 << 30
_HALF_CODE = {torch.float16: 1}
tl = None  # triton.language, bound on the first kernel build (lazy import)


def _wq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, p_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_zg,
                    BITS: tl.constexpr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Outputs ``[M, BLOCK_N]`` of tile ``program_id(0)`` over the ``K`` slice ``program_id(1)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    WR: tl.constexpr = BLOCK_K // PER  # word rows per step
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, WR)
    offs_j = tl.arange(0, PER)
    offs_m = tl.arange(0, BLOCK_M)
    shifts = (offs_j * BITS)[None, :, None]  # [1, PER, 1]: code j of a word sits at bits [j·b, (j+1)·b)
    n_words = tl.cdiv(K, PER)
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)  # K steps per split
    k_begin = pid_k * steps * BLOCK_K
    zsh = ((offs_n % PER) * BITS)[None, None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(steps):
        k0 = k_begin + step * BLOCK_K
        rows = k0 // PER + offs_r  # [WR]
        words = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :],
                        mask=(rows < n_words)[:, None] & mask_n[None, :], other=0)  # [WR, BLOCK_N]
        offs_k = k0 + offs_r[:, None] * PER + offs_j[None, :]  # [WR, PER]
        mask_k = offs_k < K
        if GROUP_SIZE % BLOCK_K == 0:  # the step lies in one group: one scale (and zero) row
            g_off = (k0 // GROUP_SIZE + offs_n * 0)[None, None, :]
            s_mask = (mask_n & ((offs_n * 0 + k0) < K))[None, None, :]  # tensor-shaped for the interpreter
        else:  # groups smaller than or straddling the step: a scale per element
            g_off = (offs_k // GROUP_SIZE)[:, :, None]
            s_mask = mask_k[:, :, None] & mask_n[None, None, :]
        s = tl.load(s_ptr + g_off * N + offs_n[None, None, :], mask=s_mask, other=0.0)
        if ASYM:
            zw = tl.load(z_ptr + g_off * stride_zg + (offs_n // PER)[None, None, :], mask=s_mask, other=0)
            z = (zw >> zsh) & QMASK
        else:
            z = tl.full((1, 1, 1), 1 << (BITS - 1), tl.int32)
        if HALF == 1:  # float16 magic number: 1024 + q exactly, minus 1024 + z, one rounding in the multiply
            # two codes per 32-bit op: code j in the low half, code j + PER/2 in the high half
            PER2: tl.constexpr = PER // 2
            pair = (words[:, None, :] >> (tl.arange(0, PER2) * BITS)[None, :, None]) & (QMASK | (QMASK << 16))
            pair = pair | 0x64006400  # [WR, PER/2, BLOCK_N]
            lo = pair.to(tl.int16).to(tl.float16, bitcast=True)
            hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
            q4 = tl.permute(tl.join(lo, hi), (0, 3, 1, 2))  # [WR, 2, PER/2, BLOCK_N]: k = r·PER + half·PER/2 + j
            qh = tl.reshape(q4, (WR, PER, BLOCK_N))
            zh = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            w = ((qh - zh) * s.to(tl.float16)).to(tl.float32)
        else:  # float32 magic number: 2^23 + q exactly, minus 2^23 + z; the reference's cast to x's dtype
            codes = (words[:, None, :] >> shifts) & QMASK  # [WR, PER, BLOCK_N]
            qf = (codes | 0x4B000000).to(tl.float32, bitcast=True)
            zf = (z | 0x4B000000).to(tl.float32, bitcast=True)
            w = ((qf - zf) * s.to(tl.float32)).to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
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
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(ws_ptr + out_off, acc, mask=mask_out, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is issued before this program's arrival
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # last split of this tile: finish and reset for the next call
            total = tl.load(ws_ptr + out_off, mask=mask_out, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.store(ws_ptr + out_off, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask_out)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


def gemv_configs(triton) -> list:
    """``(BLOCK_N, BLOCK_K, SPLIT_K, warps)``: ``BLOCK_N = 128·warps`` keeps each warp on its own
    128 outputs (4 words per thread, one 16-byte load per word row) so the ``K`` sums stay in-thread."""
    shapes = [(128, 64, 1, 1), (128, 64, 4, 1), (128, 32, 8, 1), (256, 64, 1, 2), (256, 64, 4, 2),
              (512, 64, 4, 4), (128, 16, 8, 1), (256, 16, 8, 2), (128, 8, 8, 1), (256, 8, 16, 2)]
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
        "key": ["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M"], "prune_configs_by": {"early_config_prune": prune_gemv}})})


_WORKSPACES: dict = {}


def _workspace(device: torch.device, n: int, tiles: int) -> tuple[Tensor, Tensor]:
    """The zeroed float32 ``[GEMV_MAX_ROWS, >= n]`` partial-sum buffer and int32 tile counters of
    ``device``'s current stream (created or grown once; the kernel leaves them zeroed)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.shape[1] < n or cnt.numel() < tiles:
        ws = torch.zeros(GEMV_MAX_ROWS, max(n, 0 if ws is None else ws.shape[1]), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


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
    ws, cnt = _workspace(x.device, n, -(-n // min_block))
    args = (x, qweight, scales, qweight if qzeros is None else qzeros, x if bias is None else bias,
            x if perm is None else perm, out, ws, cnt, m, n, k, 0 if qzeros is None else qzeros.shape[1])
    with _runtime.on_device(x):
        if config is not None or "tuned" not in kernels:
            if config is None:
                raise ValueError("Under TRITON_INTERPRET=1 pass config={'BLOCK_N': .., 'BLOCK_K': .., 'SPLIT_K': ..}.")
            cfg = {"SPLIT_K": 1, **config}
            if cfg["BLOCK_K"] % (32 // bits):
                raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} must be a multiple of 32/bits = {32 // bits} (whole words).")
            _runtime.launch(kernels["jit"], (-(-n // cfg["BLOCK_N"]), cfg["SPLIT_K"]), *args, **const, **cfg)
        else:
            _runtime.launch(kernels["tuned"], lambda meta: (-(-n // meta["BLOCK_N"]), meta["SPLIT_K"]), *args, **const)
    return out
