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

**Packed pair arithmetic** (the GEMV's and the tensor-core operand's 16-bit path, float16 or — ``BF16``
— bfloat16): the same 32-bit op's result *is* a pair of 16-bit floats. The ``f16x2_*`` helpers keep such
pairs as int32 bits and compute on them in inline PTX (``lop3.b32``, ``fma.rn.f16x2``, ``mul.rn.f16x2``,
``add.rn.f16x2``; bfloat16 ``fma.rn.bf16x2`` for all three, the product as ``x·s + (−0)`` and the sum as
``a·1 + b``, which ``sm_80`` has too): one ``LOP3`` / ``HFMA2`` / ``HMUL2`` / ``HADD2`` each, two weights
an instruction. Written as Triton 16-bit ops instead, the compiler splits the pairs (Triton 3.6 re-packs
them with ``PRMT``s; LLVM leaves products scalar when operands are broadcast) and splits ``(w & mask) |
magic`` into two ops. Triton's CPU interpreter runs no PTX, so there (``INTERPRETED``, bound by
:func:`~lightning_quant.kernels._runtime.build_kernels`) the helpers split the halves (bfloat16 through
its float32 bits: the interpreter cannot bitcast bfloat16), compute in float64 (one product and one sum
of 16-bit floats round innocuously there) and round once to nearest even (bfloat16 with integer ops: the
interpreter's own cast truncates): the same values as ``.rn`` on the GPU.
"""

from __future__ import annotations

from lightning_quant.kernels import _runtime

__all__ = [
    "PAIR_HELPERS",
    "as_half2",
    "f16x2_add",
    "f16x2_dequant",
    "f16x2_fma",
    "f16x2_scale_zero",
    "f16x2_sum_rows",
    "f16x2_tile",
    "f16x2_to_f32",
    "f16x2_weights",
    "half2_path",
    "launch_packed",
    "packed_step",
    "pick_column",
    "split_epilogue",
]

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


def _f16x2_halves(bits, BF16: tl.constexpr):
    """Interpreter only: int32 pair bits (float16, or bfloat16 when ``BF16``) -> ``(low, high)`` as float64
    (exact; bfloat16 through its float32 bits, since the interpreter cannot bitcast to bfloat16)."""
    if BF16:
        lo = (bits << 16).to(tl.float32, bitcast=True).to(tl.float64)
        hi = (bits & -65536).to(tl.float32, bitcast=True).to(tl.float64)
    else:
        lo = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
        hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
    return lo, hi


def _bf16_bits(v):
    """Interpreter only: float64 -> the bits (low 16 of an int32) of its bfloat16 rounding, to nearest even:
    through float32 (rounding to 24 then to 8 significant bits is the one rounding to 8, as 24 >= 2·8 + 2),
    then the float32 bits rounded with integer ops (the interpreter's own cast truncates)."""
    b = v.to(tl.float32).to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _f16x2_bits(lo, hi, BF16: tl.constexpr):
    """Interpreter only: two float64 tensors, each rounded once to float16 (bfloat16) -> their int32 pair bits."""
    if BF16:
        lo16 = _bf16_bits(lo)
        hi16 = _bf16_bits(hi)
    else:
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi16 << 16)


def _pair_const(shape, value: tl.constexpr, BF16: tl.constexpr):
    """An int32 tensor of ``shape`` holding the pair ``(value, value)`` (a float: 1.0 or -0.0) as bits."""
    if BF16:
        bits: tl.constexpr = 0x3F80 if value == 1.0 else 0x8000
    else:
        bits: tl.constexpr = 0x3C00 if value == 1.0 else 0x8000
    return tl.full(shape, bits | (bits << 16), tl.int32)


def f16x2_dequant(w, mask, magic, mul, neg_base, s, BF16: tl.constexpr):
    """``(((w & mask) | magic)·mul + neg_base)·s`` on 16-bit float pairs held as int32 bits (the operands of
    :func:`f16x2_weights`; float16, or bfloat16 when ``BF16``): the ``LOP3`` makes the magic pair, the fused
    multiply-add is exact, the product rounds once. Compiled (inline PTX, so that no compiler splits the
    ``LOP3``): ``LOP3``, ``HFMA2``, ``HMUL2`` (bfloat16: two ``HFMA2.BF16``, the product as ``x·s + (−0)``,
    which ``sm_80`` has too); the interpreter computes in float64 and rounds the same way."""
    if INTERPRETED:
        t0, t1 = _f16x2_halves((w & mask) | magic, BF16)
        m0, m1 = _f16x2_halves(mul, BF16)
        n0, n1 = _f16x2_halves(neg_base, BF16)
        s0, s1 = _f16x2_halves(s, BF16)
        return _f16x2_bits((t0 * m0 + n0) * s0, (t1 * m1 + n1) * s1, BF16)
    if BF16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xEA; fma.rn.bf16x2 t, t, $4, $5; fma.rn.bf16x2 $0, t, $6, $7; }",
            "=r,r,r,r,r,r,r,r", [w, mask, magic, mul, neg_base, s, _pair_const(w.shape, -0.0, BF16)],
            dtype=tl.int32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xEA; fma.rn.f16x2 t, t, $4, $5; mul.rn.f16x2 $0, t, $6; }",
        "=r,r,r,r,r,r,r", [w, mask, magic, mul, neg_base, s], dtype=tl.int32, is_pure=True, pack=1)


def f16x2_fma(acc, x, w, BF16: tl.constexpr):
    """``x·w + acc`` on 16-bit float pairs held as int32 bits, rounded once (``fma.rn.f16x2`` /
    ``fma.rn.bf16x2``: one ``HFMA2``; the interpreter computes in float64 — one product and one sum of
    16-bit floats round there innocuously, 53 >= 2·11 + 2 — and rounds once)."""
    if INTERPRETED:
        a0, a1 = _f16x2_halves(acc, BF16)
        x0, x1 = _f16x2_halves(x, BF16)
        w0, w1 = _f16x2_halves(w, BF16)
        return _f16x2_bits(x0 * w0 + a0, x1 * w1 + a1, BF16)
    if BF16:
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [x, w, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [x, w, acc], dtype=tl.int32,
                                     is_pure=True, pack=1)


def f16x2_add(a, b, BF16: tl.constexpr):
    """``a + b`` on 16-bit float pairs held as int32 bits, rounded once (``add.rn.f16x2``; bfloat16
    ``a·1 + b`` by ``fma.rn.bf16x2``: one ``HADD2`` / ``HFMA2``)."""
    if INTERPRETED:
        a0, a1 = _f16x2_halves(a, BF16)
        b0, b1 = _f16x2_halves(b, BF16)
        return _f16x2_bits(a0 + b0, a1 + b1, BF16)
    if BF16:
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                         [a, _pair_const(a.shape, 1.0, BF16), b], dtype=tl.int32, is_pure=True,
                                         pack=1)
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


def f16x2_to_f32(bits, BF16: tl.constexpr):
    """The sum of the two 16-bit floats of each int32 pair, in float32 (bfloat16: their float32 bits are
    the pair's halves moved up, no conversion)."""
    if BF16:
        lo = (bits << 16).to(tl.float32, bitcast=True)
        hi = (bits & -65536).to(tl.float32, bitcast=True)
    else:
        lo = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo + hi


def f16x2_sum_rows(t, ROWS: tl.constexpr, BF16: tl.constexpr):
    """``t [A, ROWS, C]`` (16-bit float pairs as int32, ``ROWS`` a power of two, held in-thread) -> ``[A, C]``:
    a pairwise tree of ``log2(ROWS)`` levels of :func:`f16x2_add`."""
    for _ in tl.static_range(ROWS.bit_length() - 1):
        lo, hi = tl.split(tl.permute(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2, t.shape[2])), (0, 1, 3, 2)))
        t = f16x2_add(lo, hi, BF16)
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


def f16x2_weights(words, s2, z, j: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    """The reference's 16-bit weights of codes ``j`` (low half) and ``j + PER/2`` (high half) of ``words``
    (int32, any shape), as int32 pair bits: ``s2`` the scale pair's bits, ``z`` the zero codes (int32,
    broadcastable). Per word pair one ``LOP3`` and the two ops of :func:`f16x2_dequant`.

    With ``F`` mantissa bits (float16 10, bfloat16 7), code ``j`` sits at bit ``j·b = SHIFT + O`` with
    ``O + b <= F``, so ``((w >> SHIFT) & (QMASK << O)) | MAGIC`` (per half; ``MAGIC`` = ``2^F``: float16
    ``0x6400``, bfloat16 ``0x4300``) is ``2^F + q·2^O`` (the code inside the mantissa); times ``2^-O`` minus
    ``2^F·2^-O + z`` is the exact integer ``q − z`` (one fused, exact ``HFMA2``), and the product with ``s``
    rounds once: ``((q − z)·s)`` rounded to the 16-bit dtype, the reference's weight bit for bit (its float32
    product is exact). One shift per word serves ``F // b`` code pairs (float16: 2 for W4, 5 for W2, 1 for
    W8; bfloat16: 1 for W4, 3 for W2; W8 codes do not fit bfloat16's mantissa)."""
    QMASK: tl.constexpr = (1 << BITS) - 1
    F: tl.constexpr = 7 if BF16 else 10  # mantissa bits
    BIAS: tl.constexpr = 127 if BF16 else 15  # exponent bias
    G: tl.constexpr = F // BITS  # code offsets per shift that stay inside the mantissa
    SHIFT: tl.constexpr = (j // G) * G * BITS
    O: tl.constexpr = (j % G) * BITS
    MASK: tl.constexpr = (QMASK << O) * 0x10001
    MAGIC: tl.constexpr = ((BIAS + F) << F) * 0x10001  # the pair (2^F, 2^F)
    MUL: tl.constexpr = ((BIAS - O) << F) * 0x10001  # the pair (2^-O, 2^-O)
    nz = 0x8000 | ((BIAS + F - O) << F) | (z << O)  # −(2^F·2^-O + z): exponent F − O, z in the mantissa
    return f16x2_dequant(words >> SHIFT, tl.full(words.shape, MASK, tl.int32), tl.full(words.shape, MAGIC, tl.int32),
                         tl.full(words.shape, MUL, tl.int32), nz | (nz << 16), s2, BF16)


def as_half2(bits, BF16: tl.constexpr):
    """int32 ``[...]`` -> float16 (bfloat16 when ``BF16``) ``[..., 2]``: the low and the high half of each
    word, reinterpreted (compiled: a ``mov.b32`` the assembler removes; rebuilt with Triton ops under the
    interpreter, bfloat16 through its float32 bits — an exact cast)."""
    if INTERPRETED:
        if BF16:
            lo = (bits << 16).to(tl.float32, bitcast=True).to(tl.bfloat16)
            hi = (bits & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            lo = bits.to(tl.int16).to(tl.float16, bitcast=True)
            hi = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.join(lo, hi)
    if BF16:  # one return per dtype branch: Triton checks that a function's returns agree in type
        out = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [tl.join(bits, bits)], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [tl.join(bits, bits)], dtype=tl.float16,
                                        is_pure=True, pack=2)
    return out


def _half2_weights(words, s2, z, j: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    """16-bit ``[..., 2]``: :func:`f16x2_weights` of code pair ``j``, reinterpreted (low half first)."""
    return as_half2(f16x2_weights(words, s2, z, j, BITS, BF16), BF16)


def _merge(a, b):
    """``join`` then flatten the two last axes: ``[..., C]`` x 2 -> ``[..., 2·C]`` (``b`` interleaved after ``a``)."""
    t = tl.join(a, b)
    return tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2], t.shape[3] * 2))


def f16x2_tile(words, s2, z, BITS: tl.constexpr, BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The 16-bit weight tile ``[BLOCK_K, BLOCK_N]`` of ``words [1, BLOCK_K / PER, BLOCK_N]`` (W2/W4; one scale
    row: ``s2``, ``z`` as :func:`f16x2_scale_zero`), the reference's weights bit for bit
    (:func:`f16x2_weights`): the pairs are joined so that the last axis runs ``half, j`` — code
    ``half·PER/2 + j``, the word's own order — then moved before ``N``."""
    PER: tl.constexpr = 32 // BITS
    if BITS == 4:  # j = j0 + 2·j1: join on j1, then j0
        t = _merge(_merge(_half2_weights(words, s2, z, 0, BITS, BF16), _half2_weights(words, s2, z, 2, BITS, BF16)),
                   _merge(_half2_weights(words, s2, z, 1, BITS, BF16), _half2_weights(words, s2, z, 3, BITS, BF16)))
    else:  # BITS == 2, j = j0 + 2·j1 + 4·j2
        t = _merge(_merge(_merge(_half2_weights(words, s2, z, 0, BITS, BF16),
                                 _half2_weights(words, s2, z, 4, BITS, BF16)),
                          _merge(_half2_weights(words, s2, z, 2, BITS, BF16),
                                 _half2_weights(words, s2, z, 6, BITS, BF16))),
                   _merge(_merge(_half2_weights(words, s2, z, 1, BITS, BF16),
                                 _half2_weights(words, s2, z, 5, BITS, BF16)),
                          _merge(_half2_weights(words, s2, z, 3, BITS, BF16),
                                 _half2_weights(words, s2, z, 7, BITS, BF16))))
    t = tl.reshape(tl.permute(tl.reshape(t, (BLOCK_K // PER, BLOCK_N, PER)), (1, 0, 2)), (BLOCK_N, BLOCK_K))
    return tl.trans(t)  # [BLOCK_N, BLOCK_K] (k = r·PER + i, each word's codes consecutive) -> [BLOCK_K, BLOCK_N]


def f16x2_scale_zero(s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS: tl.constexpr, ASYM: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, BF16: tl.constexpr):
    """``(s2, z)`` of kernel column ``k0``'s group for outputs ``offs_n``, both int32 ``[1, 1, BLOCK_N]``: the
    bits of the 16-bit scale pair ``(s, s)`` and the zero codes (the constant ``2^(b−1)`` when symmetric),
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
    if BF16:  # a bfloat16 is the top half of its float32 (exact cast; the interpreter cannot bitcast bfloat16)
        sb = (s.to(tl.float32).to(tl.int32, bitcast=True) >> 16) & 0xFFFF
    else:
        sb = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return sb | (sb << 16), z


def half2_path(half: int, bits: int, group_size: int | None, block_k: int) -> bool:
    """Whether a GEMV step takes the packed 16-bit pair arithmetic (the Python twin of the kernel's constexpr
    condition, for the autotune pre-filters): 16-bit activations with scales of the same dtype (``HALF`` 1
    float16, 2 bfloat16), a step inside one group, and codes that fit the mantissa (W8 float16 only). The
    tensor-core tile (:func:`f16x2_tile`) takes W2/W4 only."""
    return half in (1, 2) and group_size is not None and group_size % block_k == 0 and (half == 1 or bits != 8)


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


#: The packed pair helpers, as the kernels that call them bind them (``build_kernels(helpers=...)``).
PAIR_HELPERS = (_f16x2_halves, _bf16_bits, _f16x2_bits, _pair_const, f16x2_dequant, f16x2_fma, f16x2_add,
                f16x2_to_f32, f16x2_sum_rows, _half_of, pick_column, f16x2_weights, as_half2, _half2_weights, _merge,
                f16x2_tile, f16x2_scale_zero)


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
