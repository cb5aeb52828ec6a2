"""Shared builders for the kernel tests: packed operands from a real RTN/act-order quantization."""

from __future__ import annotations

import torch

from lightning_quant import QuantSpec, packing
from lightning_quant import primitives as P
from lightning_quant.quantized import QuantizedWeight


def packed_operands(n: int, k: int, spec: QuantSpec, act_order: bool = False, seed: int = 0, device="cpu"):
    """``(qw, qweight, scales, qzeros, perm)``: a quantized ``[n, k]`` weight and its kernel-order packing.

    With ``act_order`` the columns are grouped GPTQ-style (``g_idx[perm[i]] = i // group_size``).
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    g_idx = perm = None
    if act_order and spec.group_size != -1:
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // spec.group_size
    scale, zero = P.compute_qparams(w, spec, g_idx)
    qw = QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)
    codes = qw.codes
    if g_idx is not None:
        perm = torch.argsort(g_idx, stable=True)
        codes = codes[:, perm]
    qweight = packing.pack_rows(codes.t(), spec.bits)  # [K, N] -> [K·b/32, N]
    scales = qw.scales.t().contiguous().to(spec.torch_scale_dtype)
    qzeros = None if spec.symmetric else packing.pack_cols(qw.zeros.t().to(torch.uint8), spec.bits)
    mv = (lambda t: None if t is None else t.to(device))
    return qw, mv(qweight), mv(scales), mv(qzeros), mv(perm)


def magnitude_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``|x| @ |W|^T`` ``[M, N]``: the scale of the rounding error of a dot product, in float32."""
    return x.abs().float() @ w.abs().float().t()


def pair_gamma(spec: QuantSpec, dtype: torch.dtype, scale_dtype: torch.dtype, block_k: int) -> float:
    """``γ_d`` of a GEMV step of ``block_k`` columns on the packed pair path, which sums the step in 16-bit
    floats (``d = PER/2 + log2(WR)`` roundings per product, :mod:`lightning_quant.kernels.wq_gemv`), on top
    of the output rounding; 0 where the step accumulates in float32."""
    from lightning_quant.kernels._packed import half2_path

    half = {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0) if scale_dtype == dtype else 0
    group = 1 << 30 if spec.group_size == -1 else spec.group_size
    if not half2_path(half, spec.bits, group, block_k):
        return 0.0
    per = 32 // spec.bits
    d = per // 2 + (block_k // per).bit_length() - 1
    u = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    return d * u / (1 - d * u)
