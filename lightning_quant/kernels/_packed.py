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

**Packed half2 arithmetic** (the GEMV's float16 path): the same 32-bit op's result *is* a pair of
float16 values. The ``f16x2_*`` helpers keep such pairs as int32 bits and compute on them in inline PTX
(``lop3.b32``, ``fma.rn.f16x2``, ``mul.rn.f16x2``, ``add.rn.f16x2``: one ``LOP3`` / ``HFMA2`` / ``HMUL2`` /
``HADD2`` each, two weights an instruction). Written as Triton float16 ops instead, the compiler splits
the pairs (Triton 3.6 re-packs them with ``PRMT``s; LLVM leaves products scalar when operands are
broadcast) and splits ``(w & mask) | magic`` into two ops. Triton's CPU interpreter runs no PTX, so there
(``INTERPRETED``, bound by :func:`~lightning_quant.kernels._runtime.build_kernels`) the helpers split the
halves, compute in float64 (exact for one product and one sum of float16 values) and round once to
float16: the same values as ``.rn`` on the GPU.
"""

from __future__ import annotations

from lightning_quant.kernels import _runtime

__all__ = ["f16x2_add", "f16x2_dequant", "f16x2_fma", "f16x2_scale_zero", "f16x2_sum_rows", "f16x2_to_f32",
           "f16x2_weights", "launch_packed", "packed_step", "pick_column", "split_epilogue"]

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


def _f16x2_halves(bits):
    """Interpreter only: int32 float16-pair bits -> ``(low, high)`` as float64 (exact)."""
    lo = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
    hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
    return lo, hi


def _f16x2_bits(lo, hi):
    """Interpreter only: two float64 tensors, each rounded once to float16 -> their int32 pair bits."""
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo16 | (hi16 << 16)


def f16x2_dequant(w, mask, mul, neg_base, s):
    """``(((w & mask) | 0x64006400)·mul + neg_base)·s`` on float16 pairs held as int32 bits (the operands of
    :func:`f16x2_weights`): the ``LOP3`` makes the magic pair, the fused multiply-add is exact, the product
    rounds once to float16. Compiled: ``LOP3``, ``HFMA2``, ``HMUL2`` (in inline PTX, so that no compiler
    splits the ``LOP3``); the interpreter computes in float64 and rounds the same way."""
    if INTERPRETED:
        t0, t1 = _f16x2_halves((w & mask) | 0x64006400)
        m0, m1 = _f16x2_halves(mul)
        n0, n1 = _f16x2_halves(neg_base)
        s0, s1 = _f16x2_halves(s)
        return _f16x2_bits((t0 * m0 + n0) * s0, (t1 * m1 + n1) * s1)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xEA; fma.rn.f16x2 t, t, $4, $5; mul.rn.f16x2 $0, t, $6; }",
        "=r,r,r,r,r,r,r", [w, mask, tl.full(w.shape, 0x64006400, tl.int32), mul, neg_base, s], dtype=tl.int32,
        is_pure=True, pack=1)


def f16x2_fma(acc, x, w):
    """``x·w + acc`` on float16 pairs held as int32 bits, rounded once (``fma.rn.f16x2``: one ``HFMA2``;
    the interpreter computes in float64 — the product and sum of two float16 values are exact there —
    and rounds once)."""
    if INTERPRETED:
        a0, a1 = _f16x2_halves(acc)
        x0, x1 = _f16x2_halves(x)
        w0, w1 = _f16x2_halves(w)
        return _f16x2_bits(x0 * w0 + a0, x1 * w1 + a1)
    return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [x, w, acc], dtype=tl.int32,
                                     is_pure=True, pack=1)


def f16x2_add(a, b):
    """``a + b`` on float16 pairs held as int32 bits, rounded once (``add.rn.f16x2``: one ``HADD2``)."""
    if INTERPRETED:
        a0, a1 = _f16x2_halves(a)
        b0, b1 = _f16x2_halves(b)
        return _f16x2_bits(a0 + b0, a1 + b1)
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


def f16x2_to_f32(bits):
    """The sum of the two float16 values of each int32 pair, in float32."""
    lo = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo + hi


def f16x2_sum_rows(t, ROWS: tl.constexpr):
    """``t [A, ROWS, C]`` (float16 pairs as int32, ``ROWS`` a power of two, held in-thread) -> ``[A, C]``:
    a pairwise tree of ``log2(ROWS)`` levels of :func:`f16x2_add`."""
    for _ in tl.static_range(ROWS.bit_length() - 1):
        lo, hi = tl.split(tl.permute(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2, t.shape[2])), (0, 1, 3, 2)))
        t = f16x2_add(lo, hi)
    return tl.reshape(t, (t.shape[0], t.shape[2]))


def _half_of(t, bit: tl.constexpr):
    """``t [A, B, C]`` -> ``[A, B, C / 2]``: the columns whose index has bit 0 equal to ``bit`` (an
    in-thread split)."""
    even, odd = tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 2, 2)))
    if bit == 0:
        out = even
    else:
        out = odd
    return out


def pick_column(t, j: tl.constexpr, COLS: tl.constexpr):
    """Column ``j`` (``[A, B]``) of ``t [A, B, COLS]`` (``COLS`` 2, 4 or 8, held in-thread): halving splits."""
    t = _half_of(t, j % 2)
    if COLS >= 4:
        t = _half_of(t, (j // 2) % 2)
    if COLS >= 8:
        t = _half_of(t, (j // 4) % 2)
    return tl.reshape(t, (t.shape[0], t.shape[1]))


def f16x2_weights(words, s2, z, j: tl.constexpr, BITS: tl.constexpr):
    """The reference's float16 weights of codes ``j`` (low half) and ``j + PER/2`` (high half) of ``words``
    (int32, any shape), as int32 pair bits: ``s2`` the scale pair's bits, ``z`` the zero codes (int32,
    broadcastable). Per word pair one ``LOP3`` and the two ops of :func:`f16x2_dequant`; one shift per
    word serves ``10 // BITS`` code pairs (2 for W4, 1 for W8, 5 for W2):

    code ``j`` sits at bit ``j·b = SHIFT + O`` with ``O + b <= 10``, so ``((w >> SHIFT) & (QMASK << O)) |
    0x6400`` (per half) is the float16 ``1024 + q·2^O`` (the code inside the mantissa); times ``2^-O``
    minus ``1024·2^-O + z`` is the exact integer ``q − z`` (one fused, exact ``HFMA2``), and the product with
    ``s`` rounds once: ``((q − z)·s).to(float16)``, the reference's weight bit for bit."""
    QMASK: tl.constexpr = (1 << BITS) - 1
    G: tl.constexpr = 10 // BITS  # code offsets per shift that stay inside the float16 mantissa
    SHIFT: tl.constexpr = (j // G) * G * BITS
    O: tl.constexpr = (j % G) * BITS
    MASK: tl.constexpr = (QMASK << O) * 0x10001
    MUL: tl.constexpr = ((15 - O) << 10) * 0x10001  # the float16 pair (2^-O, 2^-O)
    nz = 0x8000 | ((25 - O) << 10) | (z << O)  # float16 −(1024·2^-O + z): exponent 25 − O, z in the mantissa
    return f16x2_dequant(words >> SHIFT, tl.full(words.shape, MASK, tl.int32), tl.full(words.shape, MUL, tl.int32),
                         nz | (nz << 16), s2)


def as_half2(bits):
    """int32 ``[...]`` -> float16 ``[..., 2]``: the low and the high half of each word, reinterpreted
    (compiled: a ``mov.b32`` the assembler removes; split with Triton ops under the interpreter)."""
    if INTERPRETED:
        lo = bits.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.join(lo, hi)
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [tl.join(bits, bits)], dtype=tl.float16,
                                     is_pure=True, pack=2)


def _half2_weights(words, s2, z, j: tl.constexpr, BITS: tl.constexpr):
    """float16 ``[..., 2]``: :func:`f16x2_weights` of code pair ``j``, reinterpreted (low half first)."""
    return as_half2(f16x2_weights(words, s2, z, j, BITS))


def _merge(a, b):
    """``join`` then flatten the two last axes: ``[..., C]`` x 2 -> ``[..., 2·C]`` (``b`` interleaved after ``a``)."""
    t = tl.join(a, b)
    return tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2], t.shape[3] * 2))


def f16x2_tile(words, s2, z, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float16 weight tile ``[BLOCK_K, BLOCK_N]`` of ``words [1, BLOCK_K / PER, BLOCK_N]`` (one scale row:
    ``s2``, ``z`` as :func:`f16x2_scale_zero`), the reference's weights bit for bit (:func:`f16x2_weights`):
    the pairs are joined so that the last axis runs ``half, j`` — code ``half·PER/2 + j``, the word's own
    order — then moved before ``N``."""
    PER: tl.constexpr = 32 // BITS
    if BITS == 8:  # j = j0
        t = _merge(_half2_weights(words, s2, z, 0, BITS), _half2_weights(words, s2, z, 1, BITS))
    elif BITS == 4:  # j = j0 + 2·j1: join on j1, then j0
        t = _merge(_merge(_half2_weights(words, s2, z, 0, BITS), _half2_weights(words, s2, z, 2, BITS)),
                   _merge(_half2_weights(words, s2, z, 1, BITS), _half2_weights(words, s2, z, 3, BITS)))
    else:  # BITS == 2, j = j0 + 2·j1 + 4·j2
        t = _merge(_merge(_merge(_half2_weights(words, s2, z, 0, BITS), _half2_weights(words, s2, z, 4, BITS)),
                          _merge(_half2_weights(words, s2, z, 2, BITS), _half2_weights(words, s2, z, 6, BITS))),
                   _merge(_merge(_half2_weights(words, s2, z, 1, BITS), _half2_weights(words, s2, z, 5, BITS)),
                          _merge(_half2_weights(words, s2, z, 3, BITS), _half2_weights(words, s2, z, 7, BITS))))
    t = tl.reshape(tl.permute(tl.reshape(t, (BLOCK_K // PER, BLOCK_N, PER)), (1, 0, 2)), (BLOCK_N, BLOCK_K))
    return tl.trans(t)  # [BLOCK_N, BLOCK_K] (k = r·PER + i, each word's codes consecutive) -> [BLOCK_K, BLOCK_N]


def f16x2_scale_zero(s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS: tl.constexpr, ASYM: tl.constexpr,
                     GROUP_SIZE: tl.constexpr):
    """``(s2, z)`` of kernel column ``k0``'s group for outputs ``offs_n``, both int32 ``[1, 1, BLOCK_N]``: the
    bits of the float16 scale pair ``(s, s)`` and the zero codes (the constant ``2^(b−1)`` when symmetric),
    the operands of :func:`f16x2_weights`."""
    PER: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    g_off = (k0 // GROUP_SIZE + offs_n * 0)[None, None, :]
    s_mask = (mask_n & ((offs_n * 0 + k0) < K))[None, None, :]
    s = tl.load(s_ptr + g_off * N + offs_n[None, None, :], mask=s_mask, other=0.0)  # [1, 1, BLOCK_N]
    if ASYM:
        zw = tl.load(z_ptr + g_off * stride_zg + (offs_n // PER)[None, None, :], mask=s_mask, other=0)
        z = (zw >> ((offs_n % PER) * BITS)[None, None, :]) & QMASK
    else:
        z = tl.full((1, 1, 1), 1 << (BITS - 1), tl.int32)
    sb = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return sb | (sb << 16), z


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
