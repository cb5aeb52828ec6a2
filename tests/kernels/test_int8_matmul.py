import pytest
import torch

from lightning_quant.kernels.int8_matmul import int8_matmul, int8_matmul_reference


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
