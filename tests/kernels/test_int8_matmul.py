import pytest
import torch

from lightning_quant.algorithms.llm_int8 import absmax_quantize_rows, outlier_columns
from lightning_quant.kernels.int8_matmul import (
    int8_matmul,
    int8_matmul_reference,
    int8_matmul_scaled,
    int8_outlier_matmul,
)


def _unfused_outlier_matmul(x, codes, scb, threshold, max_outliers=128, bias=None, out_dtype=None):
    """``int8_outlier_matmul`` as it was before the fused epilogue (2026-12-02): int8 matmul, then torch
    elementwise ops for the rescale, the outlier product, the bias and the cast. The numerics to keep."""
    xf = x.float()
    outliers = outlier_columns(xf, threshold)
    width = min(x.shape[-1], max_outliers) if threshold > 0.0 else 0
    if width:
        kept = outliers & (torch.cumsum(outliers, 0) <= width)
        idx = torch.nonzero_static(kept, size=width, fill_value=0).squeeze(1)
        valid = torch.arange(width, device=x.device) < kept.sum()
        x_o = xf.index_select(1, idx) * valid
        x_rest = xf.masked_fill(kept, 0.0)
    else:
        x_rest = xf
    a_codes, a_absmax = absmax_quantize_rows(x_rest)
    acc = int8_matmul(a_codes, codes)
    y = acc.float() * (a_absmax / 127.0).unsqueeze(1) * (scb.float() / 127.0).unsqueeze(0)
    if width:
        w_o = codes.index_select(1, idx).float() * (scb.float() / 127.0).unsqueeze(1)
        y = y + x_o @ w_o.t()
    if bias is not None:
        y = y + bias.float()
    return (y if out_dtype is None else y.to(out_dtype)), outliers


def test_reference_is_exact_integer_matmul():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 100), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (7, 100), dtype=torch.int8, generator=g)
    exact = [[sum(int(a[i, t]) * int(b[j, t]) for t in range(100)) for j in range(7)] for i in range(5)]
    assert torch.equal(int8_matmul(a, b), torch.tensor(exact, dtype=torch.int32))
    extreme = torch.full((1, 4096), -128, dtype=torch.int8)  # 4096·128² = 2^26: no int32 overflow
    assert int(int8_matmul(extreme, extreme)) == 4096 * 128 * 128


def test_op_traces_under_torch_compile():
    a = torch.randint(-128, 128, (3, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (9, 64), dtype=torch.int8)
    f = torch.compile(lambda a, b: int8_matmul(a, b).float() * 0.5, backend="aot_eager", fullgraph=True)
    assert torch.equal(f(a, b), int8_matmul_reference(a, b).float() * 0.5)


def test_rejects_bad_inputs():
    a = torch.zeros(3, 64, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8_matmul takes int8 tensors"):
        int8_matmul(a.float(), a)
    with pytest.raises(ValueError, match=r"needs a \[M, K\] and b \[N, K\]"):
        int8_matmul(a, torch.zeros(4, 63, dtype=torch.int8))


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, None)], ids=str)
@pytest.mark.parametrize("threshold,max_outliers,bias", [(6.0, 128, True), (6.0, 2, False), (0.0, 128, True),
                                                         (1.0, 128, True)])
def test_reference_decomposition_keeps_its_numerics(threshold, max_outliers, bias, dtype, out_dtype):
    """The CPU path of the fused forward gives today's bits (the unfused decomposition above), atol = 0."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 9, 96, generator=g) * 2).to(dtype).reshape(-1, 96)
    x[1, 5], x[2, 17], x[4, 60], x[6] = 25.0, -40.0, 9.0, 0.0  # outliers and an all-zero token
    codes = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    scb = torch.rand(40, generator=g) + 0.05
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    y, outliers = int8_outlier_matmul(x, codes, scb, threshold, max_outliers, b, out_dtype)
    y_old, outliers_old = _unfused_outlier_matmul(x, codes, scb, threshold, max_outliers, b, out_dtype)
    assert torch.equal(outliers, outliers_old) and y.dtype == y_old.dtype and torch.equal(y, y_old)


def test_scaled_matmul_reference_and_forced_reference():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (5, 64), dtype=torch.int8, generator=g)
    rs, cs, res = torch.rand(3, generator=g), torch.rand(5, generator=g), torch.randn(3, 5, generator=g)
    bias = torch.randn(5, generator=g).half()
    expected = ((int8_matmul_reference(a, b).float() * (rs / 127.0)[:, None] * (cs / 127.0)[None, :] + res)
                + bias.float()).half()
    for force in (None, True):
        y = int8_matmul_scaled(a, b, rs, cs, bias, torch.float16, res, scale_divisor=127.0, force_reference=force)
        assert torch.equal(y, expected)
    assert torch.equal(int8_matmul_scaled(a, b, rs, cs), int8_matmul_reference(a, b).float() * rs[:, None] * cs)


def test_scaled_op_traces_under_torch_compile():
    a = torch.randint(-128, 128, (3, 64), dtype=torch.int8)
    b = torch.randint(-128, 128, (9, 64), dtype=torch.int8)
    rs, cs, bias = torch.rand(3), torch.rand(9), torch.randn(9)

    def f(a, b):
        return torch.relu(int8_matmul_scaled(a, b, rs, cs, bias, torch.float16, scale_divisor=127.0))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a, b), f(a, b))


def test_scaled_matmul_rejects_bad_inputs():
    a, b = torch.zeros(3, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8)
    rs, cs = torch.ones(3), torch.ones(5)
    with pytest.raises(ValueError, match=r"row_scale must be a float tensor of shape \[3\]"):
        int8_matmul_scaled(a, b, torch.ones(5), cs)
    with pytest.raises(ValueError, match=r"col_scale must be a float tensor of shape \[5\], got torch.int64"):
        int8_matmul_scaled(a, b, rs, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \[5\]"):
        int8_matmul_scaled(a, b, rs, cs, bias=torch.ones(4))
    with pytest.raises(ValueError, match=r"residual must be float32 \[M, N\] = \(3, 5\), got torch.float16"):
        int8_matmul_scaled(a, b, rs, cs, residual=torch.zeros(3, 5, dtype=torch.float16))
    with pytest.raises(TypeError, match="out_dtype must be one of torch.float32, torch.float16, torch.bfloat16"):
        int8_matmul_scaled(a, b, rs, cs, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"scale_divisor must be > 0 \(127.0 for absmax scales\), got 0.0"):
        int8_matmul_scaled(a, b, rs, cs, scale_divisor=0.0)
    with pytest.raises(TypeError, match="int8_matmul takes int8 tensors"):
        int8_matmul_scaled(a.float(), b, rs, cs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels compile for GPUs)")
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 77, 512])
def test_cuda_scaled_kernel_matches_the_reference(m, out_dtype):
    """The fused epilogue on the GPU vs the exact product (float64), within the docstring's tolerance:
    float32 scale divisions off by at most 2^-23 relative each (torch's reciprocal vs IEEE), a few float32
    roundings, then one rounding to ``out_dtype``."""
    from lightning_quant.kernels.int8_matmul import int8_matmul_scaled_triton

    dev = "cuda"
    a = torch.randint(-127, 128, (m, 4096), dtype=torch.int8, device=dev)
    b = torch.randint(-127, 128, (1000, 4096), dtype=torch.int8, device=dev)
    rs, cs = torch.rand(m, device=dev) * 40, torch.rand(1000, device=dev) + 0.1
    res, bias = torch.randn(m, 1000, device=dev) * 100, torch.randn(1000, device=dev).half()
    exact = (a.double() @ b.double().t()) * (rs.double() / 127)[:, None] * (cs.double() / 127)[None, :] \
        + res.double() + bias.double()
    ulp = {None: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out_dtype]
    # + 2^-24: float16's subnormal spacing near 0 (a relative bound cannot cover an output that rounds there)
    bound = (ulp + 2.0**-20) * exact.abs() + 2.0**-20 * (res.double().abs() + bias.double().abs()) + 2.0**-24
    config = {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    y = int8_matmul_scaled_triton(a, b, rs, cs, bias, out_dtype, res, 127.0, config)
    assert y.dtype == (out_dtype or torch.float32) and ((y.double() - exact).abs() <= bound).all()
    if m == 77:  # the autotuned op, through the layer's decomposition, vs the CPU reference
        x = torch.randn(m, 4096, device=dev, dtype=torch.float16)
        x[3, 10] = 50.0
        y_gpu, out_gpu = int8_outlier_matmul(x, b, cs, 6.0, bias=bias, out_dtype=out_dtype)
        y_cpu, out_cpu = int8_outlier_matmul(x.cpu(), b.cpu(), cs.cpu(), 6.0, bias=bias.cpu(), out_dtype=out_dtype)
        assert torch.equal(out_gpu.cpu(), out_cpu)
        tol = (ulp + 2.0**-18) * y_cpu.float().abs() + 1e-3 * y_cpu.float().abs().max()
        assert ((y_gpu.cpu().float() - y_cpu.float()).abs() <= tol).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels compile for GPUs)")
@pytest.mark.parametrize("m", [1, 16, 77, 512])
def test_cuda_kernel_is_exact(m):
    """A fixed config per row count (no autotuning in the GPU session), the autotuned op at M = 77."""
    from lightning_quant.kernels.int8_matmul import int8_matmul_triton

    a = torch.randint(-128, 128, (m, 4096), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (1000, 4096), dtype=torch.int8, device="cuda")
    config = {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    assert torch.equal(int8_matmul_triton(a, b, config), int8_matmul_reference(a, b))
    if m == 77:
        assert torch.equal(int8_matmul(a, b), int8_matmul_reference(a, b))


def _rows_with_ties(m=5, k=100, dtype=torch.float32):
    """Rows whose absmax is 127 (so ``x·127/absmax = x``) holding exact .5 ties, an all-zero row, and random rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -126.5])
    x[1] = 0.0
    return x.to(dtype)


def test_quantize_rows_reference_op_and_bad_inputs():
    from lightning_quant.kernels.int8_matmul import quantize_rows, quantize_rows_reference

    x = _rows_with_ties()
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[0, 7, 50]] = True
    for m in (None, mask):
        codes, absmax = quantize_rows(x, m)  # CPU: the op runs the reference
        ref_codes, ref_absmax = absmax_quantize_rows(x if m is None else x.masked_fill(m, 0.0))
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
        assert torch.equal(quantize_rows_reference(x, m)[0], ref_codes)
    assert quantize_rows(x)[0][0, :7].tolist() == [127, 2, 4, -2, 0, 0, 2]  # round half to even
    assert not quantize_rows(x)[0][1].any() and quantize_rows(x)[1][1] == 0
    with pytest.raises(ValueError, match=r"takes a float \[M, K\] input"):
        quantize_rows(torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"masked must be a bool \[K\] = \(100,\) column mask"):
        quantize_rows(x, torch.zeros(99, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels compile for GPUs)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_quantize_rows_is_the_reference(dtype):
    from lightning_quant.kernels.int8_matmul import quantize_rows, quantize_rows_reference

    x = _rows_with_ties(77, 4096, dtype).cuda()
    mask = torch.zeros(4096, dtype=torch.bool, device="cuda")
    mask[[5, 900, 4095]] = True
    for m in (None, mask):
        codes, absmax = quantize_rows(x, m)
        ref_codes, ref_absmax = quantize_rows_reference(x.cpu(), None if m is None else m.cpu())
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
