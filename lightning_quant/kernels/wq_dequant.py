"""Prefill: dequantize packed weights once into a scratch buffer, then one cuBLAS GEMM.

At thousands of rows ``y [M, N] = x [M, K] @ W^T + b`` is compute-bound, and a dense GEMM library
beats a fused dequantize-GEMM whose tensor cores wait on the unpacking. This module writes the weight
once per call in the activation dtype; :func:`lightning_quant.kernels.wq_matmul.wq_linear_triton`
(``path="prefill"``) then calls ``torch.nn.functional.linear`` (cuBLAS on the GPU) with the bias:
two launches per call, act-order included.

The kernel (operands as :mod:`lightning_quant.kernels.wq_matmul`: ``qweight`` int32 ``[ceil(K·b/32), N]``,
``scales [G, N]``, ``qzeros [G, ceil(N·b/32)]`` or ``None``, act-order ``perm [K]``):

* writes ``W^T`` as a contiguous ``[K, N]`` buffer (the packed layout's own orientation: consecutive
  outputs are consecutive words on the read side and consecutive elements on the write side, so both
  are coalesced without a transpose; the compiled kernel stages 2–8 KiB of shared memory only to
  regroup registers for 16-byte stores); :func:`dequantize_packed_triton` returns it
  as the ``[N, K]`` view ``buffer.t()``, which ``F.linear`` hands to cuBLAS as a non-transposed
  operand (no copy);
* **act-order** costs nothing: kernel row ``k`` of the codes is written to row ``perm[k]`` of the
  buffer (a scatter of whole contiguous rows), so the weight comes out in the *original* input order
  and multiplies ``x`` as it is (no input gather);
* dequantizes with magic numbers, no integer-to-float conversion instruction, bit for bit the
  reference :func:`~lightning_quant.kernels.wq_matmul.dequantize_packed` (``(q − z)·s`` in float32,
  then ``.to(dtype)``): the step (word load, scales, zeros, unpacking) is
  :func:`lightning_quant.kernels._packed.packed_step`, shared with the decode GEMV; float16 weight
  from float16 scales (``HALF = 1``) is its float16 tile, any other its float32 value cast once;
* one program owns ``BLOCK_N`` outputs and a ``K / SPLIT_K`` slice of rows (``SPLIT_K`` programs
  along ``K``, each writing its own rows: no reduction), one ``[BLOCK_K·b/32, BLOCK_N]`` word load per
  step; a step lies inside one group when ``BLOCK_K`` divides the group size (one scale row), else
  scales are gathered per element. Offsets into ``qweight`` and the buffer are int64.

Under ``TRITON_INTERPRET=1`` float32 → bfloat16 casts truncate (Triton's CPU interpreter ignores the
rounding mode; the GPU's ``cvt.rn.bf16.f32`` rounds to nearest even, as torch does), so there a
bfloat16 weight equals the exact float32 ``(q − z)·s`` truncated; float16 and float32 are the
reference's bits under the interpreter as on the GPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_quant.kernels import _packed, _runtime

__all__ = ["dequant_configs", "dequant_constants", "dequantize_packed_triton", "prune_dequant"]

_PER_CHANNEL_GROUP = 1 << 30
tl = None  # triton.language, bound on the first kernel build (lazy import)
packed_step = None  # _packed.packed_step jitted, bound on the first kernel build


def _wq_dequant_kernel(qw_ptr, s_ptr, z_ptr, p_ptr, out_ptr, N, K, stride_zg,
                       BITS: tl.constexpr, ASYM: tl.constexpr, HAS_PERM: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Rows of ``W^T [K, N]`` for outputs tile ``program_id(0)`` and ``K`` slice ``program_id(1)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)  # K steps per program
    k_begin = pid_k * steps * BLOCK_K
    for step in range(steps):
        w, offs_k, mask_k = packed_step(qw_ptr, s_ptr, z_ptr, k_begin + step * BLOCK_K, offs_n, mask_n, N, K,
                                        stride_zg, BITS, ASYM, GROUP_SIZE, HALF, BLOCK_N, BLOCK_K)
        if HAS_PERM:  # kernel column k is input feature perm[k]: write its row there
            dst = tl.load(p_ptr + offs_k, mask=mask_k, other=0)
        else:
            dst = offs_k
        tl.store(out_ptr + dst.to(tl.int64)[:, :, None] * N + offs_n[None, None, :],
                 w.to(out_ptr.dtype.element_ty), mask=mask_k[:, :, None] & mask_n[None, None, :])


def dequant_configs(triton) -> list:
    """``(BLOCK_N, BLOCK_K, SPLIT_K, warps)``; ``BLOCK_N = 128·warps`` gives each thread 4 consecutive
    words per word row (one 16-byte load) and 4 consecutive outputs per written row."""
    shapes = [(512, 32, 16, 4), (512, 32, 8, 4), (256, 32, 32, 2), (1024, 32, 16, 8), (512, 16, 32, 4),
              (256, 16, 64, 2)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": sk}, num_warps=w, num_stages=3)
            for n, k, sk, w in shapes]


def prune_dequant(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune pre-filter: ``BLOCK_K`` holds whole words (``>= 32/bits`` codes); prefer the configs whose
    ``BLOCK_K`` divides the group size (one scale row per step), else keep the whole-word ones."""
    group = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    per = 32 // kwargs.get("BITS", named_args.get("BITS", 4))
    whole = [c for c in configs if c.kwargs["BLOCK_K"] >= per]
    return [c for c in whole if group is not None and group % c.kwargs["BLOCK_K"] == 0] or whole


def dequant_constants(bits: int, asym: bool, has_perm: bool, group_size: int, dtype: torch.dtype,
                      scale_dtype: torch.dtype) -> dict:
    """The kernel's constexpr arguments besides the block sizes (one specialisation per distinct dict);
    ``HALF = 1`` (float16 magic numbers) when the weight is written in float16 from float16 scales."""
    half = int(dtype == torch.float16 and scale_dtype == torch.float16)
    return {"BITS": bits, "ASYM": asym, "HAS_PERM": has_perm,
            "GROUP_SIZE": _PER_CHANNEL_GROUP if group_size == -1 else group_size, "HALF": half}


@functools.cache
def _build(interpret: bool):
    return _runtime.build_kernels(globals(), _wq_dequant_kernel, interpret, {"tuned": (dequant_configs, {
        "key": ["N", "K", "BITS", "GROUP_SIZE"], "prune_configs_by": {"early_config_prune": prune_dequant}})},
                                  helpers=(_packed.packed_step,))


def dequantize_packed_triton(qweight: Tensor, scales: Tensor, qzeros: Tensor | None, perm: Tensor | None, bits: int,
                             group_size: int, in_features: int, dtype: torch.dtype,
                             config: dict | None = None) -> Tensor:
    """The float weight ``[N, K]`` in the original input order — the values of
    :func:`~lightning_quant.kernels.wq_matmul.dequantize_packed` — as the transposed view of a
    contiguous ``[K, N]`` buffer written by one launch.

    ``config`` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, optional ``num_warps``) skips autotuning; it is
    required under ``TRITON_INTERPRET=1``.
    """
    k, n = in_features, scales.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)  # W^T, original input order
    if k == 0 or n == 0:
        return out.t()
    kernels = _build(_runtime.interpreting())
    const = dequant_constants(bits, qzeros is not None, perm is not None, group_size, dtype, scales.dtype)
    args = (qweight, scales, qweight if qzeros is None else qzeros, qweight if perm is None else perm, out, n, k,
            0 if qzeros is None else qzeros.shape[1])
    with _runtime.on_device(qweight):
        _packed.launch_packed(kernels, n, bits, args, const, config, "the prefill dequantization")
    return out.t()
