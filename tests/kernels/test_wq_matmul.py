import pytest
import torch

from lightning_quant import QuantSpec
from lightning_quant.kernels import _runtime
from lightning_quant.kernels.wq_matmul import dequantize_packed, wq_linear
from tests.kernels._cases import magnitude_bound, packed_operands, pair_gamma

SPECS = [QuantSpec(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32, 64) for s in (True, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_is_dequantize_then_matmul(spec, act_order):
    """The packed reference == ``F.linear(x, QuantizedWeight.dequantize(), b)`` bit for bit (K=96: partial g64)."""
    qw, qweight, scales, qzeros, perm = packed_operands(40, 96, spec, act_order)
    x, b = torch.randn(2, 5, 96), torch.randn(40)
    w = dequantize_packed(qweight, scales, qzeros, spec.bits, spec.group_size, 96, torch.float32, perm)
    assert torch.equal(w, qw.dequantize())
    y = wq_linear(x, qweight, scales, qzeros, bits=spec.bits, group_size=spec.group_size, perm=perm, bias=b)
    assert torch.equal(y, torch.nn.functional.linear(x, qw.dequantize(), b))


def test_reference_in_half_precision_dequantizes_in_float32_then_casts():
    spec = QuantSpec(4, 32, symmetric=False)
    qw, qweight, scales, qzeros, _ = packed_operands(24, 64, spec)
    w16 = dequantize_packed(qweight, scales, qzeros, 4, 32, 64, torch.bfloat16)
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, qw.dequantize().to(torch.bfloat16))


def test_gradient_flows_to_the_input_only():
    spec = QuantSpec(4, 32)
    qw, qweight, scales, qzeros, perm = packed_operands(24, 64, spec, act_order=True)
    x = torch.randn(3, 64, requires_grad=True)
    y = wq_linear(x, qweight, scales, qzeros, bits=4, group_size=32, perm=perm)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ qw.dequantize(), rtol=0, atol=1e-6)


def test_torch_compile_traces_the_op_without_graph_breaks():
    spec = QuantSpec(4, 32, symmetric=False)
    _, qweight, scales, qzeros, perm = packed_operands(24, 64, spec, act_order=True)

    def f(x):
        return torch.relu(wq_linear(x, qweight, scales, qzeros, bits=4, group_size=32, perm=perm)) * 2

    x = torch.randn(3, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def test_force_reference_argument_overrides_environment(monkeypatch):
    monkeypatch.delenv(_runtime.FORCE_REFERENCE_ENV, raising=False)
    assert not _runtime.reference_forced(None) and _runtime.reference_forced(True)
    monkeypatch.setenv(_runtime.FORCE_REFERENCE_ENV, "1")
    assert _runtime.reference_forced(None) and not _runtime.reference_forced(False)


def test_wrapper_rejects_bad_operands():
    spec = QuantSpec(4, 32, symmetric=False)
    _, qweight, scales, qzeros, perm = packed_operands(24, 64, spec, act_order=True)
    x = torch.randn(3, 64)
    kw = {"bits": 4, "group_size": 32}
    with pytest.raises(TypeError, match="float16/bfloat16/float32 activations"):
        wq_linear(x.long(), qweight, scales, qzeros, **kw)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[ceil\(K·b/32\), N\] = \(8, 24\) for K=64"):
        wq_linear(x, qweight[:-1], scales, qzeros, **kw)
    with pytest.raises(ValueError, match="qweight must be int32"):
        wq_linear(x, qweight.long(), scales, qzeros, **kw)
    with pytest.raises(ValueError, match=r"scales must be \[G, N\] with G = ceil\(K / group_size\) = 4"):
        wq_linear(x, qweight, scales, qzeros, bits=4, group_size=16)
    with pytest.raises(ValueError, match="qzeros must be int32"):
        wq_linear(x, qweight, scales, qzeros[:, :1], **kw)
    with pytest.raises(ValueError, match=r"perm must be int64 \[K\] = \(64,\)"):
        wq_linear(x, qweight, scales, qzeros, perm=perm.int(), **kw)
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] = \(24,\)"):
        wq_linear(x, qweight, scales, qzeros, bias=torch.zeros(23), **kw)
    with pytest.raises(ValueError, match="scales must be contiguous"):
        wq_linear(x, qweight, scales.t().contiguous().t(), qzeros, **kw)
    with pytest.raises(ValueError, match="path='fast' is not one of 'auto', 'gemv', 'splitk', 'gemm', 'prefill'"):
        wq_linear(x, qweight, scales, qzeros, path="fast", **kw)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        wq_linear(x, qweight, scales, qzeros, bits=5, group_size=32)


def test_select_path_by_rows():
    """Decode GEMV, split-K, the fused GEMM, then dequantize-once + cuBLAS from ``PREFILL_MIN_ROWS`` on."""
    from lightning_quant.kernels.wq_matmul import PREFILL_MIN_ROWS, select_path

    assert [select_path(m) for m in (1, 8, 9, 16, 64, 65, PREFILL_MIN_ROWS - 1)] == ["gemv"] * 2 + ["splitk"] * 3 + ["gemm"] * 2
    assert select_path(PREFILL_MIN_ROWS) == select_path(16384) == "prefill"


def test_prefill_path_on_cpu_is_the_reference():
    """``path="prefill"`` is accepted on every device; on CPU the op runs the exact reference."""
    spec = QuantSpec(4, 32, symmetric=False)
    qw, qweight, scales, qzeros, perm = packed_operands(24, 64, spec, act_order=True)
    x, b = torch.randn(3, 64), torch.randn(24)
    y = wq_linear(x, qweight, scales, qzeros, bits=4, group_size=32, perm=perm, bias=b, path="prefill")
    assert torch.equal(y, torch.nn.functional.linear(x, qw.dequantize(), b))


# ---- GPU: the compiled kernels on realistic shapes ----------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels compile for GPUs)")


#: One fixed config per path (no autotuning: the GPU session has minutes, not the ~560 compilations of
#: every config at every shape); ``test_cuda_autotuned_paths_match_reference`` runs the autotuner once.
FIXED = {"gemv": {"BLOCK_N": 128, "BLOCK_K": 16, "SPLIT_K": 4, "num_warps": 1},
         "splitk": {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3},
         "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3},
         "prefill": {"BLOCK_N": 512, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 4}}


def _cuda_case(m, spec, act_order, dtype, n=1376):
    k = 4096  # n: not a multiple of any BLOCK_N
    qw, qweight, scales, qzeros, perm = packed_operands(n, k, spec, act_order, device="cuda")
    x, b = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    w = qw.to("cuda").dequantize(dtype)
    exact = x.float() @ w.float().t() + b.float()
    rel = 2.0**-10 if dtype == torch.float16 else 2.0**-7  # one output rounding + fp32 reordering
    return (x, qweight, scales, qzeros, perm, b), exact, rel * (magnitude_bound(x, w) + b.float().abs())


def _pair_gamma(path: str, spec: QuantSpec, dtype: torch.dtype, scale_dtype: torch.dtype,
                block_k: int | None = None) -> float:
    """:func:`tests.kernels._cases.pair_gamma` for ``path`` (only the GEMV sums in 16-bit floats), at the
    fixed config's ``BLOCK_K`` unless given."""
    return pair_gamma(spec, dtype, scale_dtype, block_k or FIXED["gemv"]["BLOCK_K"]) if path == "gemv" else 0.0


def test_pair_gamma_is_the_gemv_pair_paths_depth():
    fp16 = _pair_gamma("gemv", QuantSpec(4, 128), torch.float16, torch.float16)
    d = 4 + 1  # BLOCK_K 16 = 2 word rows of 8 codes: 4 chained pairs, one tree level
    assert fp16 == pytest.approx(d * 2.0**-11 / (1 - d * 2.0**-11))
    assert _pair_gamma("gemm", QuantSpec(4, 128), torch.float16, torch.float16) == 0.0
    assert _pair_gamma("gemv", QuantSpec(4, 128), torch.float16, torch.float32) == 0.0  # float32 scales
    assert _pair_gamma("gemv", QuantSpec(8, -1), torch.bfloat16, torch.bfloat16) == 0.0  # W8 bfloat16: float32


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 3, 7, 16, 64, 333])
@pytest.mark.parametrize("spec,act_order,dtype", [
    (QuantSpec(4, 128), False, torch.float16), (QuantSpec(4, 128, False), True, torch.float16),
    (QuantSpec(8, -1, False), False, torch.float16), (QuantSpec(8, 128), True, torch.float16),
    (QuantSpec(2, 64), False, torch.float16), (QuantSpec(4, 128, False, scale_dtype="bfloat16"), True, torch.bfloat16),
    (QuantSpec(8, -1, scale_dtype="bfloat16"), False, torch.bfloat16)], ids=str)
def test_cuda_kernels_match_reference(m, spec, act_order, dtype):
    from lightning_quant.kernels.wq_gemv import GEMV_MAX_ROWS
    from lightning_quant.kernels.wq_matmul import wq_linear_triton

    (x, qweight, scales, qzeros, perm, b), exact, bound = _cuda_case(m, spec, act_order, dtype)
    paths = [p for p in ("gemv", "splitk", "gemm", "prefill") if p != "gemv" or m <= GEMV_MAX_ROWS]
    mag = magnitude_bound(x, dequantize_packed(qweight, scales, qzeros, spec.bits, spec.group_size, x.shape[1],
                                               torch.float32, perm))
    for path in paths:
        y = wq_linear_triton(x, qweight, scales, qzeros, perm, b, spec.bits, spec.group_size, path, FIXED[path])
        assert y.dtype == dtype and y.shape == (m, 1376)
        assert ((y.float() - exact).abs() <= bound + _pair_gamma(path, spec, x.dtype, scales.dtype) * mag).all(), path
    ref = wq_linear(x, qweight, scales, qzeros, bits=spec.bits, group_size=spec.group_size, perm=perm, bias=b,
                    force_reference=True)
    assert ((ref.float() - exact).abs() <= bound).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("spec,act_order,dtype", [
    (QuantSpec(4, 128, scale_dtype="float16"), False, torch.float16),
    (QuantSpec(4, 128, False, scale_dtype="float16"), True, torch.float16),
    (QuantSpec(8, -1, False, scale_dtype="float32"), False, torch.float16),
    (QuantSpec(2, 64, scale_dtype="float16"), True, torch.float16),
    (QuantSpec(4, 128, False, scale_dtype="bfloat16"), True, torch.bfloat16)], ids=str)
def test_cuda_prefill_dequantization_is_bit_exact(spec, act_order, dtype):
    """The compiled dequantization (float16 magic numbers, or float32 then the GPU's round-to-nearest-even
    cast, which the interpreter cannot check for bfloat16) equals the reference weight bit for bit."""
    from lightning_quant.kernels.wq_dequant import dequantize_packed_triton

    _, qweight, scales, qzeros, perm = packed_operands(1376, 4096, spec, act_order, device="cuda")
    w = dequantize_packed_triton(qweight, scales, qzeros, perm, spec.bits, spec.group_size, 4096, dtype,
                                 FIXED["prefill"])
    ref = dequantize_packed(qweight, scales, qzeros, spec.bits, spec.group_size, 4096, dtype, perm)
    assert torch.equal(w, ref)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
def test_cuda_autotuned_paths_match_reference(m):
    """The autotuner's smoke test: one spec, ``path="auto"`` (GEMV, split-K, GEMM, prefill by rows), called
    twice (the GEMV's workspace must come back zeroed)."""
    spec = QuantSpec(4, 128, False)
    from lightning_quant.kernels.wq_gemv import GEMV_MAX_ROWS

    (x, qweight, scales, qzeros, perm, b), exact, bound = _cuda_case(m, spec, True, torch.float16)
    if m <= GEMV_MAX_ROWS:  # the GEMV: the autotuner may pick BLOCK_K 64, the deepest pair-path step
        w = dequantize_packed(qweight, scales, qzeros, 4, 128, x.shape[1], torch.float32, perm)
        bound = bound + _pair_gamma("gemv", spec, x.dtype, scales.dtype, 64) * magnitude_bound(x, w)
    for _ in range(2):
        y = wq_linear(x, qweight, scales, qzeros, bits=4, group_size=128, perm=perm, bias=b)
        assert ((y.float() - exact).abs() <= bound).all()


def test_autotune_prefilter_keeps_group_aligned_k_blocks():
    from types import SimpleNamespace

    from lightning_quant.kernels.wq_matmul import prune_by_group

    def cfg(k, m=64, n=64, warps=4):
        return SimpleNamespace(kwargs={"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": 1}, num_warps=warps)

    configs = [cfg(k) for k in (64, 128, 256)]
    assert [c.kwargs["BLOCK_K"] for c in prune_by_group(configs, {}, GROUP_SIZE=128)] == [64, 128, 256]
    assert [c.kwargs["BLOCK_K"] for c in prune_by_group(configs, {}, GROUP_SIZE=1 << 30)] == [64, 128, 256]
    odd = [cfg(k) for k in (32, 64, 128)]
    assert [c.kwargs["BLOCK_K"] for c in prune_by_group(odd, {}, GROUP_SIZE=96)] == [32]  # 96 = 3 blocks of 32
    assert prune_by_group(configs, {}, GROUP_SIZE=48) == configs  # none aligned: keep all (gather path)
    # the 64x256x64 4-warp tile only where the kernel takes the packed half2 dequantization
    wide = cfg(64, 64, 256, 4)
    assert wide in prune_by_group([wide, cfg(64)], {}, GROUP_SIZE=128, HALF=1, BITS=4)
    assert wide not in prune_by_group([wide, cfg(64)], {}, GROUP_SIZE=128, HALF=0, BITS=4)  # float32 dequant
    assert wide not in prune_by_group([wide, cfg(64)], {}, GROUP_SIZE=128, HALF=1, BITS=8)
    assert wide not in prune_by_group([wide, cfg(64)], {}, GROUP_SIZE=32, HALF=1, BITS=4)  # group < BLOCK_K


def test_importing_the_package_does_not_import_triton():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, lightning_quant, lightning_quant.layers; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2]).stdout
    assert out.strip() == "False"


def test_gemv_prefilter_whole_words_group_alignment_and_registers():
    from types import SimpleNamespace

    from lightning_quant.kernels.wq_gemv import prune_gemv

    configs = [SimpleNamespace(kwargs={"BLOCK_K": k}) for k in (8, 16, 32, 64)]
    ks = lambda **kw: [c.kwargs["BLOCK_K"] for c in prune_gemv(configs, {}, **kw)]
    assert ks(GROUP_SIZE=128, BLOCK_M=1, BITS=4, HALF=1) == [8, 16, 32, 64]  # the half2 path: 64 columns
    assert ks(GROUP_SIZE=128, BLOCK_M=8, BITS=4) == [8]  # 8 rows x 8 codes: the chunk fits in registers
    assert ks(GROUP_SIZE=48, BLOCK_M=1, BITS=4) == [8, 16]  # steps inside one group of 48
    assert ks(GROUP_SIZE=128, BLOCK_M=8, BITS=2) == [16]  # 16 two-bit codes per word: none fits, the smallest
    assert ks(GROUP_SIZE=128, BLOCK_M=1, BITS=8, HALF=1) == [8, 16, 32]  # at most 8 word rows a thread
    assert ks(GROUP_SIZE=128, BLOCK_M=1, BITS=4, HALF=0) == [8, 16, 32]  # float32 multiply-add: at most 32
