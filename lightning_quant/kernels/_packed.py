"""What the packed-weight kernels share: the unpacking step and launcher of the two without ``tl.dot``,
and the split-K epilogue of the GEMV and the tensor-core split-K path.

:mod:`lightning_quant.kernels.wq_gemv` (decode) and :mod:`lightning_quant.kernels.wq_dequant`
(prefill scratch buffer) walk ``qweight`` (int32 ``[ceil(K·b/32), N]``) the same way: per step one
``[BLOCK_K·b/32, BLOCK_N]`` word load, the step's scales and zero codes, and magic-number
dequantization into a ``[word row, code, N]`` tile. :func:`packed_step` is that step; the kernels
call it as a Triton function (inlined when they compile, so the compiled code is that of one kernel),
bound into their module by :func:`lightning_quant.kernels._runtime.build_kernels` (``helpers=``).

Dequantization, bit for bit the reference ``((q − z)·s in float32).to(dtype)``:

* ``HALF = 1`` (float16 scales): ``q | 0x6400`` read as float16 is ``1024 + q`` (exact for 8-bit
  codes too: the exponent makes the spacing 1), minus ``1024 + z`` is the exact integer ``q − z``,
  and the float16 product with ``s`` rounds once the exact ``(q − z)·s`` (at most 8 + 11 significant
  bits, so also exact in the reference's float32 before its one rounding to float16). Two codes per
  32-bit op: code ``j`` in the low half, code ``j + PER/2`` in the high half. The tile is float16.
* otherwise ``q | 0x4B000000`` read as float32 is ``2^23 + q``, minus ``2^23 + z``, times ``s`` in
  float32: the reference's own float32 value, which the caller casts (one rounding). The tile is
  float32.

**Packed half2 arithmetic** (the GEMV's float16 path, :func:`half2_code_fma`): the same 32-bit op's
result *is* a pair of float16 values (``1024 + q_j``, ``1024 + q_{j+PER/2}``). :func:`as_half2` reinterprets
an int32 tensor as float16 ``[..., 2]`` (low half first); compiled, that is one ``mov.b32`` the
assembler removes, so the float16 subtract, scale and multiply-add that follow stay ``HADD2`` /
``HMUL2`` / ``HFMA2`` on whole registers (two weights an instruction). Built from two scalar halves
instead, LLVM's vectoriser leaves the products scalar. Triton's CPU interpreter runs no PTX, so there
:func:`as_half2` splits the bits with plain Triton (``INTERPRETED``, bound by
:func:`~lightning_quant.kernels._runtime.build_kernels`): the same values, element by element.
"""

from __future__ import annotations

from lightning_quant.kernels import _runtime

__all__ = ["as_half2", "half2_code_fma", "half2_scale_zero", "launch_packed", "packed_step", "pick_column",
           "split_epilogue"]

tl = None  # triton.language, bound by _runtime.build_kernels on the first kernel build (lazy import)
INTERPRETED = None  # tl.constexpr(TRITON_INTERPRET), bound by _runtime.build_kernels likewise


def packed_step(qw_ptr, s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS: tl.constexpr, ASYM: tl.constexpr,
                GROUP_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(w [WR, PER, BLOCK_N], offs_k [WR, PER], mask_k)`` for kernel columns ``k0 .. k0 + BLOCK_K``:
    ``w[r, j, n]`` is the dequantized weight of kernel column ``k0 + r·PER + j`` and output ``offs_n[n]``
    (zero where masked), ``PER = 32 / BITS`` codes per word."""
    PER: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    WR: tl.constexpr = BLOCK_K // PER  # word rows per step
    offs_r = tl.arange(0, WR)
    offs_j = tl.arange(0, PER)
    rows = k0 // PER + offs_r  # [WR]
    words = tl.load(qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=(rows < tl.cdiv(K, PER))[:, None] & mask_n[None, :], other=0)  # [WR, BLOCK_N]
    offs_k = k0 + offs_r[:, None] * PER + offs_j[None, :]  # [WR, PER]: kernel column of each code
    mask_k = offs_k < K
    if GROUP_SIZE % BLOCK_K == 0:  # the step lies in one group: one scale (and zero) row
        g_off = (k0 // GROUP_SIZE + offs_n * 0)[None, None, :]
        s_mask = (mask_n & ((offs_n * 0 + k0) < K))[None, None, :]  # tensor-shaped for the interpreter
    else:  # groups smaller than or straddling the step: a scale per element
        g_off = (offs_k // GROUP_SIZE)[:, :, None]
        s_mask = mask_k[:, :, None] & mask_n[None, None, :]
    s = tl.load(s_ptr + g_off * N + offs_n[None, None, :], mask=s_mask, other=0.0)
    if ASYM:  # zero codes packed along N: output n's code sits at bits (n mod PER)·b of word n / PER
        zw = tl.load(z_ptr + g_off * stride_zg + (offs_n // PER)[None, None, :], mask=s_mask, other=0)
        z = (zw >> ((offs_n % PER) * BITS)[None, None, :]) & QMASK
    else:
        z = tl.full((1, 1, 1), 1 << (BITS - 1), tl.int32)
    if HALF == 1:
        PER2: tl.constexpr = PER // 2
        pair = (words[:, None, :] >> (tl.arange(0, PER2) * BITS)[None, :, None]) & (QMASK | (QMASK << 16))
        pair = pair | 0x64006400  # [WR, PER/2, BLOCK_N]
        lo = pair.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        q4 = tl.permute(tl.join(lo, hi), (0, 3, 1, 2))  # [WR, 2, PER/2, BLOCK_N]: k = r·PER + half·PER/2 + j
        qh = tl.reshape(q4, (WR, PER, BLOCK_N))
        zh = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        w = (qh - zh) * s.to(tl.float16)  # (q − z) exact in float16; the product's one rounding = the reference's
    else:
        codes = (words[:, None, :] >> (offs_j * BITS)[None, :, None]) & QMASK  # [WR, PER, BLOCK_N]
        qf = (codes | 0x4B000000).to(tl.float32, bitcast=True)
        zf = (z | 0x4B000000).to(tl.float32, bitcast=True)
        w = (qf - zf) * s.to(tl.float32)
    return w, offs_k, mask_k


def as_half2(bits32):
    """int32 ``[...]`` -> float16 ``[..., 2]``: the low and the high half of each word, reinterpreted
    (``mov.b32`` compiled: no instruction survives; split with Triton ops under the interpreter)."""
    if INTERPRETED:
        lo = bits32.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (bits32 >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.join(lo, hi)
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [tl.join(bits32, bits32)], dtype=tl.float16,
                                     is_pure=True, pack=2)


def _half_of(t, bit: tl.constexpr):
    """``t [R, C]`` -> ``[R, C / 2]``: the columns whose index has bit 0 equal to ``bit`` (an in-thread split)."""
    even, odd = tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))
    if bit == 0:
        out = even
    else:
        out = odd
    return out


def pick_column(t, j: tl.constexpr, COLS: tl.constexpr):
    """Column ``j`` (``[R]``) of ``t [R, COLS]`` (``COLS`` 2, 4 or 8, held in-thread): halving splits."""
    t = _half_of(t, j % 2)
    if COLS >= 4:
        t = _half_of(t, (j // 2) % 2)
    if COLS >= 8:
        t = _half_of(t, (j // 4) % 2)
    return tl.reshape(t, (t.shape[0],))


def half2_code_fma(acc, words, zbits, s, xbits, j: tl.constexpr, BITS: tl.constexpr):
    """``acc + x·w`` in float16 pairs, ``acc [R, BLOCK_N, 2]``: the weights of code pair ``j`` of ``words``
    (``[R, BLOCK_N]`` int32; codes ``j`` and ``j + PER/2``) are ``(1024 + q) − (1024 + z)`` (exact) times ``s``
    (one rounding, the reference's weight), ``zbits``/``s`` as :func:`half2_scale_zero` gives them; ``xbits``
    (``[R]`` int32) holds the two activations of those columns, low half first. Per word pair: one shift,
    one ``LOP3``, ``HADD2``, ``HMUL2``, ``HFMA2``."""
    QMASK: tl.constexpr = (1 << BITS) - 1
    q = as_half2(((words >> (j * BITS)) & (QMASK | (QMASK << 16))) | 0x64006400)
    return acc + as_half2(xbits)[:, None, :] * ((q - as_half2(zbits)) * s)


def half2_scale_zero(s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS: tl.constexpr, ASYM: tl.constexpr,
                     GROUP_SIZE: tl.constexpr):
    """``(zbits, s)`` of kernel column ``k0``'s group for outputs ``offs_n`` (``[1, BLOCK_N]``): the int32 bits
    of the float16 pair ``(1024 + z, 1024 + z)`` and the float16 pair ``(s, s)`` ``[1, BLOCK_N, 2]``, the
    operands of :func:`half2_code_fma`."""
    PER: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    g_off = (k0 // GROUP_SIZE + offs_n * 0)[None, :]
    s_mask = (mask_n & ((offs_n * 0 + k0) < K))[None, :]
    s = tl.load(s_ptr + g_off * N + offs_n[None, :], mask=s_mask, other=0.0)  # [1, BLOCK_N]
    if ASYM:
        zw = tl.load(z_ptr + g_off * stride_zg + (offs_n // PER)[None, :], mask=s_mask, other=0)
        z = (zw >> ((offs_n % PER) * BITS)[None, :]) & QMASK
    else:
        z = tl.full((1, 1), 1 << (BITS - 1), tl.int32)
    return (z | 0x6400) * 0x10001, as_half2((s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001)


def split_epilogue(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, out_off, offs_n, mask_n, mask_out, tile,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the float32 tile ``acc [BLOCK_M, BLOCK_N]`` (+ bias, cast to ``out_ptr``'s dtype) at ``out_off``.

    ``SPLIT_K = 1``: directly. Otherwise the ``SPLIT_K`` programs of output tile ``tile`` add their partials
    (relaxed atomics: sums commute) into the zeroed float32 workspace ``ws_ptr`` and bump the tile's
    arrival counter (acq_rel); the last to arrive reads the sum, adds the bias, casts, stores, and zeroes
    the workspace rows and the counter for the next call (:func:`~lightning_quant.kernels._runtime.split_workspace`).
    """
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(ws_ptr + out_off, acc, mask=mask_out, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is issued before this program's arrival
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # last split of this tile: finish and reset
            total = tl.load(ws_ptr + out_off, mask=mask_out, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.store(ws_ptr + out_off, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask_out)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")


def launch_packed(kernels: dict, n: int, bits: int, args: tuple, const: dict, config: dict | None, what: str) -> None:
    """Launch a family built with ``(BLOCK_N, BLOCK_K, SPLIT_K)`` configs on the grid
    ``(ceil(n / BLOCK_N), SPLIT_K)``: ``config`` when given (required under ``TRITON_INTERPRET=1``, where
    nothing is autotuned; ``SPLIT_K`` defaults to 1), else the autotuned kernel. ``what`` names the call
    in the error."""
    if config is None and "tuned" in kernels:
        _runtime.launch(kernels["tuned"], lambda meta: (-(-n // meta["BLOCK_N"]), meta["SPLIT_K"]), *args, **const)
        return
    if config is None:
        raise ValueError(f"Under TRITON_INTERPRET=1 pass config={{'BLOCK_N': .., 'BLOCK_K': .., 'SPLIT_K': ..}} for {what}.")
    cfg = {"SPLIT_K": 1, **config}
    if cfg["BLOCK_K"] % (32 // bits):
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} must be a multiple of 32/bits = {32 // bits} (whole words).")
    _runtime.launch(kernels["jit"], (-(-n // cfg["BLOCK_N"]), cfg["SPLIT_K"]), *args, **const, **cfg)
