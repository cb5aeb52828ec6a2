"""Triton kernels under ``TRITON_INTERPRET=1`` vs their references, on small odd shapes.

Not collected directly (Triton must be imported *after* ``TRITON_INTERPRET=1`` is set, so these run
in a fresh interpreter): ``tests/kernels/test_interpreter.py`` runs this file in a subprocess.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lightning_quant import QuantSpec
from lightning_quant.kernels import _packed, _runtime
from lightning_quant.kernels import int8_matmul as i8
from lightning_quant.kernels._packed import half2_path
from lightning_quant.kernels._runtime import _WORKSPACES
from lightning_quant.kernels.int8_matmul import (
    int8_matmul_reference,
    int8_matmul_scaled_reference,
    int8_matmul_scaled_triton,
    int8_matmul_triton,
    int8_outlier_matmul,
)
from lightning_quant.kernels.wq_dequant import dequantize_packed_triton
from lightning_quant.kernels.wq_gemv import GEMV_MAX_ROWS
from lightning_quant.kernels.wq_matmul import dequantize_packed, wq_linear_reference, wq_linear_triton
from tests.kernels._cases import magnitude_bound, packed_operands

if not _runtime.interpreting():  # a hard error, not a skip: this file only makes sense interpreted
    raise RuntimeError("Run with TRITON_INTERPRET=1 (tests/kernels/test_interpreter.py does).")

GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}
SPLITK = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 3}
GEMV = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}  # 2 splits: the workspace / arrival-counter epilogue
PREFILL = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}  # the dequantization kernel's blocks
CONFIGS = {"gemm": GEMM, "splitk": SPLITK, "gemv": GEMV, "prefill": PREFILL}
# (bits, group_size, symmetric, act_order, M, K, N): odd M, N not a multiple of BLOCK_N, groups
# aligned with BLOCK_K (32), whole groups inside it (16: broadcast rows), straddling it (48: per-element
# gather), per channel (-1), partial (96 = 64 + 32).
CASES = [
    (4, 32, True, False, 1, 64, 40), (4, 32, False, True, 3, 96, 72), (4, 16, False, False, 17, 64, 40),
    (4, 48, True, True, 3, 96, 40), (4, -1, False, False, 17, 96, 72), (4, 64, False, False, 5, 96, 40),
    (8, 32, False, False, 3, 64, 72), (8, -1, True, False, 17, 96, 40), (8, 16, True, True, 1, 64, 40),
    (2, 32, False, False, 3, 64, 40), (4, 16, False, False, 5, 72, 40),  # 72: 4.5 groups of 16, last K block partial
]


def _case_id(c):
    return "W{}g{}{}{}-M{}K{}N{}".format(c[0], c[1], "" if c[2] else "a", "-ao" if c[3] else "", *c[4:])


# the GEMV takes at most GEMV_MAX_ROWS (8) rows: the M=17 cases run on the two tensor-core paths only
PATH_CASES = [(p, c) for p in ("gemm", "splitk", "gemv", "prefill") for c in CASES
              if p != "gemv" or c[4] <= GEMV_MAX_ROWS]


@pytest.mark.parametrize("path,case", PATH_CASES, ids=lambda v: v if isinstance(v, str) else _case_id(v))
def test_wq_kernel_matches_reference(case, path):
    bits, gs, sym, act_order, m, k, n = case
    spec = QuantSpec(bits, gs, sym)
    qw, qweight, scales, qzeros, perm = packed_operands(n, k, spec, act_order)
    x, bias = torch.randn(m, k), torch.randn(n)
    y = wq_linear_triton(x, qweight, scales, qzeros, perm, bias, bits, gs, path, CONFIGS[path])
    ref = wq_linear_reference(x, qweight, scales, qzeros, perm, bias, bits, gs)
    # float32 in, float32 accumulation in a different order: error <= 1e-6 of |x|·|W|
    bound = 1e-6 * (magnitude_bound(x, qw.dequantize()) + bias.abs())
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y - ref).abs() <= bound).all(), (y - ref).abs().max()


@pytest.mark.parametrize("path", ["gemm", "splitk", "gemv", "prefill"])
def test_wq_kernel_half_precision(path):
    spec = QuantSpec(4, 32, symmetric=False)
    qw, qweight, scales, qzeros, perm = packed_operands(72, 96, spec, act_order=True)
    x = torch.randn(3, 96).half()
    y = wq_linear_triton(x, qweight, scales, qzeros, perm, None, 4, 32, path, CONFIGS[path])
    exact = x.float() @ qw.dequantize(torch.float16).float().t()
    assert y.dtype == torch.float16
    # only the final float16 rounding (2^-11 relative) and fp32 summation order differ
    assert ((y.float() - exact).abs() <= 2.0**-10 * magnitude_bound(x, qw.dequantize())).all()


@pytest.mark.parametrize("dtype,bits,sym,act_order", [
    (torch.float16, 2, True, False), (torch.float16, 4, False, True), (torch.float16, 8, False, False),
    (torch.bfloat16, 2, False, True), (torch.bfloat16, 4, True, False)], ids=str)
def test_gemv_half2_rounding_bound(dtype, bits, sym, act_order):
    """The GEMV's packed pair path (16-bit activations and scales, one scale row per step) against the exact
    product of the reference's 16-bit weights. Each product ``x·w`` enters one step's 16-bit partial by a
    fused multiply-add, then meets at most ``PER/2 − 1`` later multiply-adds of its word-row chain and the
    ``log2(WR)`` additions of the tree over the step's ``WR = BLOCK_K / PER`` word rows: ``d = PER/2 +
    log2(WR)`` roundings, so a step's partial is off by at most ``γ_d·Σ|x·w|`` over its terms (``γ_d =
    d·u / (1 − d·u)``, ``u = 2^-11`` float16, ``2^-8`` bfloat16); the float32 sum of the steps adds
    ``steps·2^-24·Σ|x·w|``, the final cast ``u·|y|`` (``2u`` for bfloat16 here: the interpreter's cast
    truncates; the docstring of :mod:`lightning_quant.kernels.wq_gemv`). Activations of magnitude up to
    8 keep the float16 partials normal (its subnormals would add an absolute ``2^-25`` per rounding)."""
    spec = QuantSpec(bits, 64, sym, scale_dtype=str(dtype)[6:])
    k, n, m, block_k = 256, 40, 3, 64
    _, qweight, scales, qzeros, perm = packed_operands(n, k, spec, act_order)
    x = (torch.randn(m, k) * 3).clamp(-8, 8).to(dtype)
    y = wq_linear_triton(x, qweight, scales, qzeros, perm, None, bits, 64, "gemv",
                         {"BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 2})
    w = dequantize_packed(qweight, scales, qzeros, bits, 64, k, dtype, perm).double()
    exact = x.double() @ w.t()
    per = 32 // bits
    d = per // 2 + (block_k // per).bit_length() - 1
    u = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    cast = u if dtype == torch.float16 else 2 * u
    gamma = d * u / (1 - d * u)
    magnitude = x.double().abs() @ w.abs().t()
    bound = (gamma + (k // block_k) * 2.0**-24) * magnitude + cast * (exact.abs() + gamma * magnitude)
    err = (y.double() - exact).abs()
    assert y.dtype == dtype and (err <= bound).all(), (err / bound).max()


# (bits, group_size, symmetric, act_order, BLOCK_K): one scale row per step (g32/g64/per channel with
# BLOCK_K 32) and a scale per element (g16 and g48 with BLOCK_K 32), in both half dtypes
MAGIC_CASES = [(4, 32, False, True, 32), (4, 16, True, False, 32), (8, -1, False, False, 32), (2, 64, True, False, 32),
               (4, 48, False, True, 32), (8, 32, True, True, 16)]


def _expected_weights(qweight, scales, qzeros, perm, bits, gs, k, dtype, block_k, pair_bits=(2, 4, 8)):
    """The weights ``[N, K]`` a kernel step of ``block_k`` columns must produce under the interpreter: the
    reference's, except bfloat16 off the packed pair path (``pair_bits``: the widths the kernel pairs),
    where the interpreter's float32 -> bfloat16 cast truncates (see the magic test's docstring)."""
    w = dequantize_packed(qweight, scales, qzeros, bits, gs, k, dtype, perm)  # [N, K] original order
    group = 1 << 30 if gs == -1 else gs
    if dtype == torch.bfloat16 and not (bits in pair_bits and half2_path(2, bits, group, block_k)):
        w32 = dequantize_packed(qweight, scales, qzeros, bits, gs, k, torch.float32, perm)
        w = (w32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MAGIC_CASES, ids=lambda c: "W{}g{}{}{}-bk{}".format(
    c[0], c[1], "" if c[2] else "a", "-ao" if c[3] else "", c[4]))
def test_gemv_magic_dequant_is_bit_exact(case, dtype):
    """The magic-number dequantization (``q | 0x6400`` / ``q | 0x4300`` minus ``MAGIC + z``, times ``s``)
    gives the reference's weights bit for bit: with one-hot rows ``x = e_k`` every output is the
    single product ``1 · w[n, k]`` (exact in float32, exact again when cast back to ``dtype``), so
    ``y[m] == dequantize_packed(...)[:, k_m]`` must hold with atol = 0 for every ``k``.

    bfloat16 on the packed pair path (W2/W4, a step inside one group: ``_packed.half2_path``) rounds to
    nearest even in its own arithmetic, so the expected weights are the reference's. On the float32
    magic path (W8, groups smaller than the step) the weight is cast: Triton's CPU interpreter casts
    float32 to bfloat16 by truncation even with ``fp_downcast_rounding="rtne"`` (the GPU rounds to
    nearest even, as torch does), so there the expected weights are the exact float32 ``(q − z)·s``
    truncated to bfloat16; that cast is checked on the GPU (``test_cuda_kernels_match_reference``)."""
    bits, gs, sym, act_order, block_k = case
    k, n = 96, 40
    spec = QuantSpec(bits, gs, sym, scale_dtype={torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype])
    _, qweight, scales, qzeros, perm = packed_operands(n, k, spec, act_order)
    assert scales.dtype == dtype  # the magic path needs scales in the activation dtype
    w = _expected_weights(qweight, scales, qzeros, perm, bits, gs, k, dtype, block_k)
    eye = torch.eye(k, dtype=dtype)
    for rows in eye.split(GEMV_MAX_ROWS):
        y = wq_linear_triton(rows, qweight, scales, qzeros, perm, None, bits, gs, "gemv",
                             {"BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 2})
        assert y.dtype == dtype
        cols = rows.argmax(1)
        assert torch.equal(y, w[:, cols].t()), (y.float() - w[:, cols].t().float()).abs().max()


# (bits, group_size, symmetric, act_order): the packed half2 tile (W2/W4, one scale row per K block:
# g32/g64/per channel; g16 with split-K's BLOCK_K 16) and W8 and g16 with the GEMM's BLOCK_K 32, which keep the
# float32 dequantization
HALF2_TILE_CASES = [(4, 32, False, True), (2, 64, True, False), (4, -1, True, True), (8, 32, False, False),
                    (4, 16, True, False)]


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)  # bfloat16: test_half2_tile_is_the_reference_operand
@pytest.mark.parametrize("path", ["gemm", "splitk"])
@pytest.mark.parametrize("case", HALF2_TILE_CASES, ids=lambda c: "W{}g{}{}{}".format(
    c[0], c[1], "" if c[2] else "a", "-ao" if c[3] else ""))
def test_tensor_core_16bit_weights_are_bit_exact(case, path, dtype):
    """16-bit activations with scales of their dtype on the tensor-core paths: with one-hot rows ``x = e_k``
    each output is the single product ``1 · w[n, k]`` (exact in the float32 accumulator and again in the
    16-bit output), so ``y == dequantize_packed(...)[:, k]`` at atol 0 — the ``_packed.f16x2_tile`` weights
    (joined into the ``tl.dot`` operand) are the reference's bit for bit, in the right ``K`` order.
    float16 only: Triton's interpreter multiplies the bit patterns of bfloat16 ``tl.dot`` operands (an
    identity times 2.0 gives 2.7e8), so the bfloat16 tile is checked without the dot, below."""
    bits, gs, sym, act_order = case
    k, n = 96, 40
    spec = QuantSpec(bits, gs, sym, scale_dtype=str(dtype)[6:])
    _, qweight, scales, qzeros, perm = packed_operands(n, k, spec, act_order)
    w = _expected_weights(qweight, scales, qzeros, perm, bits, gs, k, dtype, CONFIGS[path]["BLOCK_K"], (2, 4))
    rows = torch.eye(k, dtype=dtype)[torch.randperm(k)[:48]]
    y = wq_linear_triton(rows, qweight, scales, qzeros, perm, None, bits, gs, path, CONFIGS[path])
    assert y.dtype == dtype
    assert torch.equal(y, w[:, rows.argmax(1)].t()), (y.float() - w[:, rows.argmax(1)].t().float()).abs().max()


@triton.jit
def _tile_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_zg, BITS: tl.constexpr, ASYM: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BF16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores the ``tl.dot`` weight operand ``_packed.f16x2_tile`` of K block ``program_id(0)`` (kernel order)."""
    PER: tl.constexpr = 32 // BITS
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
    words = tl.load(qw_ptr + offs_w[None, :, None] * N + offs_n[None, None, :], mask=mask_n[None, None, :], other=0)
    s2, z = _packed.f16x2_scale_zero(s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS, ASYM, GROUP_SIZE, BF16)
    tile = _packed.f16x2_tile(words, s2, z, BITS, BF16, BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], tile, mask=mask_n[None, :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, False), (4, -1, True), (2, 64, False)])
def test_half2_tile_is_the_reference_operand(bits, gs, sym, dtype):
    """The tensor-core weight operand itself (``_packed.f16x2_tile``, what ``tl.dot`` receives), stored
    instead of multiplied: every weight, in both 16-bit dtypes, is the reference's bit for bit at its
    kernel ``K`` row — the pairs' joins put each word's codes in order."""
    from lightning_quant.kernels import wq_matmul

    wq_matmul._build(True)  # binds the jitted helpers into _packed
    k, n, block_k = 96, 40, 32
    spec = QuantSpec(bits, gs, sym, scale_dtype=str(dtype)[6:])
    _, qweight, scales, qzeros, _ = packed_operands(n, k, spec, False)
    out = torch.empty(k, n, dtype=dtype)
    _tile_kernel[(k // block_k,)](qweight, scales, qweight if qzeros is None else qzeros, out, n, k,
                                  0 if qzeros is None else qzeros.shape[1], bits, qzeros is not None,
                                  1 << 30 if gs == -1 else gs, dtype == torch.bfloat16, block_k, 64)
    assert torch.equal(out.t(), dequantize_packed(qweight, scales, qzeros, bits, gs, k, dtype))


# (bits, group_size, symmetric, act_order, K, BLOCK_K): every code width; one scale row per step (g32, g64
# with BLOCK_K 32, per channel), groups smaller than the step (g16), straddling it (g48), partial (K = 96 = 64 + 32;
# 72 = 4.5 groups of 16 with a partial last step); sym/asym; act-order
DEQUANT_CASES = [(4, 32, False, True, 96, 32), (4, 16, True, False, 72, 32), (4, 48, False, True, 96, 32),
                 (4, 64, True, False, 96, 32), (8, -1, False, False, 96, 32), (8, 32, True, True, 96, 16),
                 (2, 64, False, False, 96, 32), (2, -1, True, True, 96, 16)]
# (weight dtype, scale dtype): float16 magic (HALF), float32 magic with a float16 weight, bfloat16, float32
DEQUANT_DTYPES = [(torch.float16, "float16"), (torch.float16, "float32"), (torch.bfloat16, "bfloat16"),
                  (torch.float32, "float32")]


@pytest.mark.parametrize("dtypes", DEQUANT_DTYPES, ids=lambda d: f"{str(d[0])[6:]}-s{d[1]}")
@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: "W{}g{}{}{}-K{}-bk{}".format(
    c[0], c[1], "" if c[2] else "a", "-ao" if c[3] else "", c[4], c[5]))
def test_prefill_dequantization_is_bit_exact(case, dtypes):
    """The prefill kernel's weight is ``dequantize_packed(..., dtype)`` bit for bit (atol = 0), in the
    original input order for act-order (the rows are scattered by ``perm``), as the ``[N, K]`` view of
    a contiguous ``[K, N]`` buffer.

    bfloat16: Triton's CPU interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest
    even, as torch does: ``test_cuda_prefill_dequantization_is_bit_exact``), so here the expected weight
    is the exact float32 ``(q − z)·s`` truncated to bfloat16."""
    bits, gs, sym, act_order, k, block_k = case
    dtype, scale_dtype = dtypes
    _, qweight, scales, qzeros, perm = packed_operands(40, k, QuantSpec(bits, gs, sym, scale_dtype=scale_dtype),
                                                       act_order)
    w = dequantize_packed_triton(qweight, scales, qzeros, perm, bits, gs, k, dtype,
                                 {"BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 2})
    expected = dequantize_packed(qweight, scales, qzeros, bits, gs, k, dtype, perm)  # [N, K], input order
    if dtype == torch.bfloat16:  # the interpreter's truncating cast, see the docstring
        w32 = dequantize_packed(qweight, scales, qzeros, bits, gs, k, torch.float32, perm)
        expected = (w32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert w.dtype == dtype and w.shape == (40, k) and w.t().is_contiguous()
    assert torch.equal(w, expected), (w.float() - expected.float()).abs().max()


def test_prefill_path_is_dequantize_then_linear():
    """``path="prefill"`` = ``F.linear(x, W, b)`` with the kernel's weight (act-order: ``x`` not gathered),
    float16 activations, bias in the activation dtype."""
    spec = QuantSpec(4, 32, symmetric=False, scale_dtype="float16")
    _, qweight, scales, qzeros, perm = packed_operands(72, 96, spec, act_order=True)
    x, bias = torch.randn(5, 96).half(), torch.randn(72)
    y = wq_linear_triton(x, qweight, scales, qzeros, perm, bias, 4, 32, "prefill", PREFILL)
    w = dequantize_packed_triton(qweight, scales, qzeros, perm, 4, 32, 96, torch.float16, PREFILL)
    assert y.dtype == torch.float16 and torch.equal(y, torch.nn.functional.linear(x, w, bias.half()))


@pytest.mark.parametrize("path,cfg,m", [("gemv", {"BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 4}, 3),
                                        ("splitk", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 4}, 19)])
def test_split_workspace_is_left_zeroed_and_calls_repeat(path, cfg, m):
    """Split GEMV and split-K calls leave the shared persistent workspace and arrival counters zeroed (the
    last split of each tile resets them), so a second call, or the other path's, gives the same bits."""
    spec = QuantSpec(4, 32, symmetric=False)
    _, qweight, scales, qzeros, perm = packed_operands(72, 96, spec, act_order=True)
    x, bias = torch.randn(m, 96), torch.randn(72)
    first = wq_linear_triton(x, qweight, scales, qzeros, perm, bias, 4, 32, path, cfg)
    second = wq_linear_triton(x, qweight, scales, qzeros, perm, bias, 4, 32, path, cfg)
    assert torch.equal(first, second)
    ws, cnt = _WORKSPACES[("cpu", 0)]
    assert not ws.any() and not cnt.any()
    ref = wq_linear_reference(x, qweight, scales, qzeros, perm, bias, 4, 32)
    assert (first - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_split_k_row_tiles_and_bad_config():
    """Row tiles of 32 and 64 (the split-K configs for 17..64 rows) match the reference; a tile smaller
    than the workspace's counters allow is refused."""
    spec = QuantSpec(4, 32, symmetric=False)
    qw, qweight, scales, qzeros, perm = packed_operands(72, 96, spec, act_order=True)
    for m, bm in ((33, 32), (50, 64)):
        x, bias = torch.randn(m, 96), torch.randn(72)
        cfg = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3}
        y = wq_linear_triton(x, qweight, scales, qzeros, perm, bias, 4, 32, "splitk", cfg)
        ref = wq_linear_reference(x, qweight, scales, qzeros, perm, bias, 4, 32)
        assert ((y - ref).abs() <= 1e-6 * (magnitude_bound(x, qw.dequantize()) + bias.abs())).all()
    with pytest.raises(ValueError, match="path='splitk' needs BLOCK_M >= 16 and BLOCK_N >= 32"):
        wq_linear_triton(x, qweight, scales, qzeros, perm, bias, 4, 32, "splitk",
                         {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2})


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (3, 96, 72), (17, 80, 56)])
def test_int8_kernel_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    c = int8_matmul_triton(a, b, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})
    assert c.dtype == torch.int32 and torch.equal(c, int8_matmul_reference(a, b))


INT8 = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def _bf16_truncated(y32: torch.Tensor) -> torch.Tensor:
    """The interpreter's float32 -> bfloat16 cast (truncation; the GPU rounds to nearest even)."""
    return (y32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,bias,residual,divisor", [(1, 64, 40, True, True, 127.0), (3, 96, 72, False, True, 127.0),
                                                         (17, 80, 56, True, False, 127.0), (5, 64, 40, False, False, 1.0)])
def test_int8_scaled_epilogue_is_bit_exact(m, k, n, bias, residual, divisor, out_dtype):
    """The fused epilogue runs the reference's float32 operations in its order (IEEE divisions, no FMA
    contraction, one rounding at the cast): equal to :func:`int8_matmul_scaled_reference` with atol = 0
    (bfloat16: the interpreter truncates the cast, so the expected value is the float32 result truncated)."""
    g = torch.Generator().manual_seed(m + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    rs, cs = torch.rand(m, generator=g) * 40, torch.rand(n, generator=g) * 2  # absmax-like
    bias_t = torch.randn(n, generator=g).half() if bias else None
    res = torch.randn(m, n, generator=g) * 10 if residual else None
    y = int8_matmul_scaled_triton(a, b, rs, cs, bias_t, out_dtype, res, divisor, INT8)
    if out_dtype == torch.bfloat16:
        expected = _bf16_truncated(int8_matmul_scaled_reference(a, b, rs, cs, bias_t, None, res, divisor))
    else:
        expected = int8_matmul_scaled_reference(a, b, rs, cs, bias_t, out_dtype, res, divisor)
    assert y.dtype == (out_dtype or torch.float32) and y.shape == (m, n)
    assert torch.equal(y, expected), (y.float() - expected.float()).abs().max()


@pytest.mark.parametrize("out_dtype", [None, torch.float16], ids=str)
@pytest.mark.parametrize("threshold,max_outliers", [(6.0, 128), (6.0, 2), (0.0, 128)])
def test_int8_layer_forward_through_the_fused_kernel_equals_the_reference(threshold, max_outliers, out_dtype,
                                                                          monkeypatch):
    """LLM.int8's decomposition with the fused kernel in place of the op's CPU path (int8 product, both
    rescales, the outlier path as the residual, bias, cast): the same bits as the CPU reference."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 96, generator=g) * 2).clamp(-5, 5).half()
    x[1, 5], x[2, 17], x[4, 60] = 25.0, -40.0, 9.0  # three outlier columns
    codes = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    scb = torch.rand(40, generator=g) + 0.1
    bias = torch.randn(40, generator=g).half()
    ref, ref_out = int8_outlier_matmul(x, codes, scb, threshold, max_outliers, bias, out_dtype)

    def fused(a, b, rs, cs, bias, out_dtype, residual, *, scale_divisor):
        return int8_matmul_scaled_triton(a, b, rs, cs, bias, out_dtype, residual, scale_divisor, INT8)

    monkeypatch.setattr(i8, "int8_matmul_scaled", fused)
    y, outliers = int8_outlier_matmul(x, codes, scb, threshold, max_outliers, bias, out_dtype)
    assert torch.equal(outliers, ref_out) and y.dtype == ref.dtype and torch.equal(y, ref)


def test_interpreter_needs_a_config():
    _, qweight, scales, _, _ = packed_operands(40, 64, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="Under TRITON_INTERPRET=1 pass config="):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 4, 32)
    with pytest.raises(ValueError, match="path='gemm' needs SPLIT_K=1"):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 4, 32, "gemm", SPLITK)
    with pytest.raises(ValueError, match=r"Under TRITON_INTERPRET=1 pass config=\{'BLOCK_N'"):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 4, 32, "gemv")
    with pytest.raises(ValueError, match=f"The GEMV takes at most {GEMV_MAX_ROWS} rows, got 9"):
        wq_linear_triton(torch.randn(9, 64), qweight, scales, None, None, None, 4, 32, "gemv", GEMV)
    with pytest.raises(ValueError, match=r"Under TRITON_INTERPRET=1 pass config=\{'BLOCK_M'"):
        int8_matmul_scaled_triton(torch.zeros(2, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8),
                                  torch.ones(2), torch.ones(5))
    with pytest.raises(ValueError, match="The Triton kernel handles bits in"):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 3, 32, "gemm", GEMM)
    with pytest.raises(ValueError, match=r"Under TRITON_INTERPRET=1 pass config=.* for the prefill dequantization"):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 4, 32, "prefill")
    with pytest.raises(ValueError, match=r"BLOCK_K=4 must be a multiple of 32/bits = 8 \(whole words\)"):
        dequantize_packed_triton(qweight, scales, None, None, 4, 32, 64, torch.float16,
                                 {"BLOCK_N": 32, "BLOCK_K": 4, "SPLIT_K": 1})


def test_empty_batches():
    _, qweight, scales, _, _ = packed_operands(40, 64, QuantSpec(4, 32))
    y = wq_linear_triton(torch.randn(0, 64), qweight, scales, None, None, None, 4, 32, "gemm", GEMM)
    assert wq_linear_triton(torch.randn(0, 64), qweight, scales, None, None, None, 4, 32, "gemv", GEMV).shape == (0, 40)
    assert wq_linear_triton(torch.randn(0, 64), qweight, scales, None, None, None, 4, 32, "prefill").shape == (0, 40)
    c = int8_matmul_triton(torch.zeros(0, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8), {})
    assert y.shape == (0, 40) and c.shape == (0, 5)
    e = int8_matmul_scaled_triton(torch.zeros(0, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8),
                                  torch.ones(0), torch.ones(5), out_dtype=torch.float16)
    assert e.shape == (0, 5) and e.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_row_quantization_kernel_is_the_reference(dtype, masked):
    """LLM.int8's activation quantization kernel: bit for bit the reference's codes and absmax (ties to even,
    an all-zero row, masked outlier columns, K not a multiple of the block)."""
    from lightning_quant.kernels.int8_matmul import quantize_rows_reference, quantize_rows_triton

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 100, generator=g) * 3
    x[0, :8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -126.5])
    x[1] = 0.0
    x = x.to(dtype)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[0, 7, 50, 99]] = True
    m = mask if masked else None
    codes, absmax = quantize_rows_triton(x, m, block_k=32)
    ref_codes, ref_absmax = quantize_rows_reference(x, m)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
