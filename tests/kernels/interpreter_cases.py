"""Triton kernels under ``TRITON_INTERPRET=1`` vs their references, on small odd shapes.

Not collected directly (Triton must be imported *after* ``TRITON_INTERPRET=1`` is set, so these run
in a fresh interpreter): ``tests/kernels/test_interpreter.py`` runs this file in a subprocess.
"""

from __future__ import annotations

import pytest
import torch

from lightning_quant import QuantSpec
from lightning_quant.kernels import _runtime
from lightning_quant.kernels.int8_matmul import int8_matmul_reference, int8_matmul_triton
from lightning_quant.kernels.wq_matmul import wq_linear_reference, wq_linear_triton
from tests.kernels._cases import magnitude_bound, packed_operands

if not _runtime.interpreting():  # a hard error, not a skip: this file only makes sense interpreted
    raise RuntimeError("Run with TRITON_INTERPRET=1 (tests/kernels/test_interpreter.py does).")

GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}
SPLITK = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 3}
# (bits, group_size, symmetric, act_order, M, K, N): odd M, N not a multiple of BLOCK_N, groups
# aligned with BLOCK_K (32), whole groups inside it (16: broadcast rows), straddling it (48: per-element
# gather), per channel (-1), partial (96 = 64 + 32).
CASES = [
    (4, 32, True, False, 1, 64, 40), (4, 32, False, True, 3, 96, 72), (4, 16, False, False, 17, 64, 40),
    (4, 48, True, True, 3, 96, 40), (4, -1, False, False, 17, 96, 72), (4, 64, False, False, 5, 96, 40),
    (8, 32, False, False, 3, 64, 72), (8, -1, True, False, 17, 96, 40), (8, 16, True, True, 1, 64, 40),
    (2, 32, False, False, 3, 64, 40), (4, 16, False, False, 5, 72, 40),  # 72: 4.5 groups of 16, last K block partial
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "W{}g{}{}{}-M{}K{}N{}".format(
    c[0], c[1], "" if c[2] else "a", "-ao" if c[3] else "", *c[4:]))
@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_wq_kernel_matches_reference(case, path):
    bits, gs, sym, act_order, m, k, n = case
    spec = QuantSpec(bits, gs, sym)
    qw, qweight, scales, qzeros, perm = packed_operands(n, k, spec, act_order)
    x, bias = torch.randn(m, k), torch.randn(n)
    cfg = GEMM if path == "gemm" else SPLITK
    y = wq_linear_triton(x, qweight, scales, qzeros, perm, bias, bits, gs, path, cfg)
    ref = wq_linear_reference(x, qweight, scales, qzeros, perm, bias, bits, gs)
    # float32 in, float32 accumulation in a different order: error <= 1e-6 of |x|·|W|
    bound = 1e-6 * (magnitude_bound(x, qw.dequantize()) + bias.abs())
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y - ref).abs() <= bound).all(), (y - ref).abs().max()


@pytest.mark.parametrize("path", ["gemm", "splitk"])
def test_wq_kernel_half_precision(path):
    spec = QuantSpec(4, 32, symmetric=False)
    qw, qweight, scales, qzeros, perm = packed_operands(72, 96, spec, act_order=True)
    x = torch.randn(5, 96).half()
    y = wq_linear_triton(x, qweight, scales, qzeros, perm, None, 4, 32, path, GEMM if path == "gemm" else SPLITK)
    exact = x.float() @ qw.dequantize(torch.float16).float().t()
    assert y.dtype == torch.float16
    # only the final float16 rounding (2^-11 relative) and fp32 summation order differ
    assert ((y.float() - exact).abs() <= 2.0**-10 * magnitude_bound(x, qw.dequantize())).all()


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (3, 96, 72), (17, 80, 56)])
def test_int8_kernel_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    c = int8_matmul_triton(a, b, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})
    assert c.dtype == torch.int32 and torch.equal(c, int8_matmul_reference(a, b))


def test_interpreter_needs_a_config():
    _, qweight, scales, _, _ = packed_operands(40, 64, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="Under TRITON_INTERPRET=1 pass config="):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 4, 32)
    with pytest.raises(ValueError, match="path='gemm' needs SPLIT_K=1"):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 4, 32, "gemm", SPLITK)
    with pytest.raises(ValueError, match="The Triton kernel handles bits in"):
        wq_linear_triton(torch.randn(2, 64), qweight, scales, None, None, None, 3, 32, "gemm", GEMM)


def test_empty_batches():
    _, qweight, scales, _, _ = packed_operands(40, 64, QuantSpec(4, 32))
    y = wq_linear_triton(torch.randn(0, 64), qweight, scales, None, None, None, 4, 32, "gemm", GEMM)
    c = int8_matmul_triton(torch.zeros(0, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8), {})
    assert y.shape == (0, 40) and c.shape == (0, 5)
