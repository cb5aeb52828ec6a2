"""Weight-only quantized matmul (W4A16 / W8A16, also W2A16): fused dequantize-GEMM in Triton.

``y [M, N] = x [M, K] @ W^T + b`` where ``W [N, K]`` lives as packed integer codes:

* ``qweight`` int32 ``[ceil(K·b/32), N]`` — :func:`~lightning_quant.packing.pack_rows` layout (the GPTQ
  ``qweight`` layout: ``32/b`` consecutive input features per word, LSB first), in *kernel order*;
* ``scales`` ``[G, N]`` (float16/bfloat16/float32);
* ``qzeros`` int32 ``[G, ceil(N·b/32)]`` (:func:`~lightning_quant.packing.pack_cols`) or ``None``
  (symmetric: implicit zero ``2^(b-1)``);
* ``perm`` int64 ``[K]`` or ``None`` — act-order: kernel column ``k`` multiplies input feature
  ``perm[k]``. The fused tensor-core paths gather the input once per call, the GEMV inside the kernel,
  and the prefill dequantization writes the weight back in input order (no gather); the group of kernel column ``k`` is always ``k // group_size`` (contiguous groups), so scales are
  never gathered by ``g_idx``.

Dequantization is ``w = (q − z)·s`` in float32 (the project's one convention, see
:mod:`lightning_quant.spec`), cast to the activation dtype, then multiplied with float32 accumulation
(the "W4A16" scheme of GPTQ, Frantar et al. 2023, and AWQ, Lin et al. 2024). Per ``BLOCK_K`` step
each packed word is loaded once (``[BLOCK_K·b/32, BLOCK_N]`` int32) and unpacked in registers; the
scales come as one row when the block lies inside a group, as one row per group broadcast over
the block when whole groups fit in it, and per element only for groups straddling blocks (e.g. 48).

**16-bit activations with scales of their dtype, W2/W4, one scale row per K block** (``HALF`` 1 float16,
2 bfloat16; W4 g128 with ``BLOCK_K`` up to 128) build the ``tl.dot`` operand with the GEMV's packed pair
dequantization (:func:`lightning_quant.kernels._packed.f16x2_tile`: per pair of codes one ``LOP3``, an
exact ``HFMA2``, one ``HMUL2`` — the reference's weights bit for bit): the pairs are joined in each
word's code order (``PRMT``s: a pair holds codes ``j`` and ``j + PER/2``) into a ``[BLOCK_N, BLOCK_K]``
tile (a word's codes consecutive along ``K``) that is transposed for the dot, so the operand goes to
shared memory ``K``-major, one word per 16-byte store where Triton's layout gives a thread whole words
(64x256x64 on 4 warps, kept for this path only; the 128x256x64 8-warp tile still stores 2 bytes at a
time). W8 keeps the float32 dequantization (Triton 3.9's dot-operand pass rejects its 4-code tile's
shared layout).

Four launch paths, dispatched by rows (:func:`select_path`):

* ``"gemv"`` (decode, ``M <= 8``): :mod:`lightning_quant.kernels.wq_gemv`, no tensor cores, one
  launch per call (act-order gather, bias and cast inside the kernel);
* ``"splitk"`` (``8 < M <= DECODE_MAX_ROWS = 64``): this kernel with one row tile for all rows
  (``BLOCK_M`` 16, 32 or 64 by the row bucket, so the weight streams once) and the ``K`` loop split over
  ``SPLIT_K`` programs, enough for the SMs that ``N / BLOCK_N`` tiles leave idle. The splits
  ``atomic_add`` (relaxed) float32 partials into the persistent workspace of
  :func:`~lightning_quant.kernels._runtime.split_workspace` and the tile's last split (arrival counter)
  adds the bias, casts, stores and re-zeroes it, as the GEMV does; act-order is gathered in the kernel
  (``x[m, perm[k]]``) — **one launch per call**. The 64-row bound is unmeasured (no GPU read yet);
* ``"gemm"`` (``64 < M < PREFILL_MIN_ROWS``): 2-D tiles over ``(M, N)``, the full ``K`` loop per program
  (act-order: one input gather per call);
* ``"prefill"`` (``M >= PREFILL_MIN_ROWS``): :mod:`lightning_quant.kernels.wq_dequant` writes the weight
  once in the activation dtype (bit for bit :func:`dequantize_packed`, act-order rows already in the
  input order), then ``F.linear`` (cuBLAS) with the bias — two launches. The crossover
  :data:`PREFILL_MIN_ROWS` is a placeholder until the GPU benchmark measures it.

Row and output offsets are int64 (``M·K`` or ``M·N`` may pass ``2^31``: a 128k-vocabulary head at
16k tokens).

The pure-torch :func:`wq_linear_reference` (dequantize, then ``F.linear``) is the CPU path and the
tests' oracle. The ``torch.library`` op ``lightning_quant::wq_linear`` runs the reference on CPU and
the Triton kernel on CUDA for float16/bfloat16 activations (float32 ones take the reference, see
:data:`KERNEL_DTYPES`); its fake implementation lets ``torch.compile`` trace it. Every autotune
config compiles for ``sm_90`` without register spills and within shared memory, which
:mod:`lightning_quant.kernels.aot` checks on a CPU-only machine.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_quant import packing
from lightning_quant import primitives as P
from lightning_quant.kernels import _packed, _runtime
from lightning_quant.kernels.wq_dequant import dequantize_packed_triton
from lightning_quant.kernels.wq_gemv import GEMV_MAX_ROWS, wq_gemv
from lightning_quant.spec import QuantSpec

__all__ = [
    "DECODE_MAX_ROWS",
    "KERNEL_BITS",
    "KERNEL_DTYPES",
    "PATHS",
    "PREFILL_MIN_ROWS",
    "SPLITK_ROW_TILES",
    "dequantize_packed",
    "select_path",
    "splitk_row_tile",
    "wq_linear",
    "wq_linear_reference",
    "wq_linear_triton",
]

#: Code widths the Triton kernel handles (codes never straddle words); 3-bit uses the reference.
KERNEL_BITS = (2, 4, 8)
#: Activation dtypes the op sends to the kernel on CUDA. float32 takes the reference (dequantize, then
#: cuBLAS, honouring ``torch.backends.cuda.matmul.allow_tf32``): without tensor cores the kernel's
#: float32 build runs on FMA units and spills registers (``python -m lightning_quant.kernels.aot --dtype float32``).
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
#: Inputs with more rows than the GEMV takes and at most this many take the tensor-core split-K path
#: (issue 14: at M = 64 on 14336 x 4096 the tiled GEMM launches 32-112 programs for 132 SMs). **Unmeasured**
#: on a GPU, like :data:`PREFILL_MIN_ROWS`.
DECODE_MAX_ROWS = 64
#: Inputs with at least this many rows take the prefill path (dequantize once, then cuBLAS) under
#: ``path="auto"``. **Unmeasured**: 1024 is a placeholder, not a crossover read off a GPU; the GPU session
#: (``benchmarks/kernels.py --session``: ``gemm`` vs ``prefill`` at M = 512 and 4096) is where it gets set.
PREFILL_MIN_ROWS = 1024
#: Launch paths of :func:`wq_linear`.
PATHS = ("auto", "gemv", "splitk", "gemm", "prefill")
_PER_CHANNEL_GROUP = 1 << 30  # "one group": k // 2^30 == 0 for every column, aligned with any BLOCK_K
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
tl = None  # triton.language, bound on the first kernel build (lazy import)
split_epilogue = None  # _packed.split_epilogue jitted, bound on the first kernel build
f16x2_scale_zero = f16x2_tile = None  # likewise


# ---- reference ----------------------------------------------------------------------------


def dequantize_packed(qweight: Tensor, scales: Tensor, qzeros: Tensor | None, bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype, perm: Tensor | None = None) -> Tensor:
    """The float weight ``[N, K]`` (original input order) of packed codes; ``(q − z)·s`` in float32, then ``dtype``.

    ``group_size = -1`` means one group (per channel); otherwise kernel column ``k`` uses group ``k // group_size``.
    The words are unpacked with :mod:`lightning_quant.packing` and dequantized by
    :func:`lightning_quant.primitives.dequantize` — the formula, groups and implicit zero every other
    dequantization uses, so this reference equals ``QuantizedWeight.dequantize(dtype)`` bit for bit.
    """
    spec = _packed_spec(bits, group_size, qzeros)
    codes = packing.unpack_rows(qweight, bits, in_features).t().contiguous()  # [K, N] -> [N, K] (kernel order)
    zeros = None if qzeros is None else packing.unpack_cols(qzeros, bits, scales.shape[1]).t()  # [G, N] -> [N, G]
    w = P.dequantize(codes, scales.t(), zeros, spec, dtype=dtype)  # [N, K], kernel order
    if perm is not None:  # kernel column k holds input feature perm[k]: undo it
        w = w.index_select(1, torch.argsort(perm))
    return w


def _packed_spec(bits: int, group_size: int, qzeros: Tensor | None) -> QuantSpec:
    """The code convention of packed operands (symmetric: no ``qzeros``). ``scale_dtype`` is unused by
    dequantization (it takes the scales as given); float32 holds every scale dtype exactly."""
    return QuantSpec(bits=bits, group_size=group_size, symmetric=qzeros is None, scale_dtype="float32")


def wq_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor | None, perm: Tensor | None,
                        bias: Tensor | None, bits: int, group_size: int) -> Tensor:
    """Dequantize then ``F.linear`` in ``x.dtype``: ``x [M, K] -> [M, N]`` (bit-exact CPU path)."""
    w = dequantize_packed(qweight, scales, qzeros, bits, group_size, x.shape[-1], x.dtype, perm)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---- Triton kernel (built lazily) -----------------------------------------------------------


def _wq_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, p_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, M_BUCKET, stride_zg,
               BITS: tl.constexpr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
               GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over the ``K`` range of split ``program_id(2)``; ``HAS_PERM``
    gathers ``x[m, perm[k]]`` in the kernel (split-K path), else ``x`` comes in kernel order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    WORD_ROWS: tl.constexpr = BLOCK_K // PER
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = tl.arange(0, PER) * BITS  # [PER]: code j of a word sits at bits [j·b, (j+1)·b)
    n_words = tl.cdiv(K, PER)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_span, BLOCK_K):
        k0 = pid_k * k_span + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:  # act-order: kernel column k reads input feature perm[k]
            src = tl.load(p_ptr + offs_k, mask=mask_k, other=0)
        else:
            src = offs_k
        a = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + src[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # each packed word is loaded once and unpacked in registers: [BLOCK_K/PER, BLOCK_N] words ->
        # [BLOCK_K/PER, PER, BLOCK_N] codes -> [BLOCK_K, BLOCK_N] (row r·PER + j = code j of word row r)
        offs_w = k0 // PER + tl.arange(0, WORD_ROWS)
        if HALF >= 1 and BITS != 8 and GROUP_SIZE % BLOCK_K == 0:  # 16-bit pairs, one scale row (_packed.f16x2_tile)
            words3 = tl.load(qw_ptr + offs_w.to(tl.int64)[None, :, None] * N + offs_n[None, None, :],
                             mask=(offs_w < n_words)[None, :, None] & mask_n[None, None, :], other=0)
            s2, z2 = f16x2_scale_zero(s_ptr, z_ptr, k0, offs_n, mask_n, N, K, stride_zg, BITS, ASYM, GROUP_SIZE,
                                      HALF == 2)
            acc = tl.dot(a, f16x2_tile(words3, s2, z2, BITS, HALF == 2, BLOCK_K, BLOCK_N), acc)
        else:
            words = tl.load(qw_ptr + offs_w.to(tl.int64)[:, None] * N + offs_n[None, :],
                            mask=(offs_w < n_words)[:, None] & mask_n[None, :], other=0)
            codes = (words[:, None, :] >> shifts[None, :, None]) & QMASK
            q = tl.reshape(codes, (BLOCK_K, BLOCK_N)).to(tl.float32)
            if GROUP_SIZE % BLOCK_K == 0:  # the whole K block lies in one group: load one scale row
                g = k0 // GROUP_SIZE
                row_mask = mask_n & ((offs_n * 0 + k0) < K)  # tensor-shaped: the interpreter needs it
                s = tl.load(s_ptr + g * N + offs_n, mask=row_mask, other=0.0).to(tl.float32)[None, :]
                if ASYM:
                    zw = tl.load(z_ptr + g * stride_zg + offs_n // PER, mask=row_mask, other=0)
                    z = ((zw >> ((offs_n % PER) * BITS)) & QMASK).to(tl.float32)[None, :]
                else:
                    z = 1 << (BITS - 1)
                w = (q - z) * s
            elif BLOCK_K % GROUP_SIZE == 0:  # whole groups inside the K block: one scale row per group, broadcast
                GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
                offs_g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
                mgn = (offs_g < tl.cdiv(K, GROUP_SIZE))[:, None] & mask_n[None, :]
                s = tl.load(s_ptr + offs_g[:, None] * N + offs_n[None, :], mask=mgn, other=0.0).to(tl.float32)
                q3 = tl.reshape(q, (GROUPS, GROUP_SIZE, BLOCK_N))  # [BLOCK_K, BLOCK_N] -> [groups, group, BLOCK_N]
                if ASYM:
                    zw = tl.load(z_ptr + offs_g[:, None] * stride_zg + (offs_n // PER)[None, :], mask=mgn, other=0)
                    z = ((zw >> ((offs_n % PER) * BITS)[None, :]) & QMASK).to(tl.float32)
                    w = tl.reshape((q3 - z[:, None, :]) * s[:, None, :], (BLOCK_K, BLOCK_N))
                else:
                    w = tl.reshape((q3 - (1 << (BITS - 1))) * s[:, None, :], (BLOCK_K, BLOCK_N))
            else:  # groups straddling K blocks (e.g. 48): gather a scale per element
                mkn = mask_k[:, None] & mask_n[None, :]
                g2 = (offs_k // GROUP_SIZE)[:, None]
                s = tl.load(s_ptr + g2 * N + offs_n[None, :], mask=mkn, other=0.0).to(tl.float32)
                if ASYM:
                    zw = tl.load(z_ptr + g2 * stride_zg + (offs_n // PER)[None, :], mask=mkn, other=0)
                    z = ((zw >> ((offs_n % PER) * BITS)[None, :]) & QMASK).to(tl.float32)
                else:
                    z = 1 << (BITS - 1)
                w = (q - z) * s
            w = w.to(x_ptr.dtype.element_ty)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # int64: M·N may reach 2^31
    mask_out = mask_m[:, None] & mask_n[None, :]
    # SPLIT_K > 1: the GEMV's epilogue (workspace, arrival counter per (row, column) tile)
    split_epilogue(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, out_off, offs_n, mask_n, mask_out,
                   pid_m * tl.num_programs(1) + pid_n, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_K)


def _gemm_configs(triton):
    c = triton.Config
    shapes = [(64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
              (32, 64, 128, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4)]
    return [c({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": 1}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


#: ``(BLOCK_M, BLOCK_N, BLOCK_K, warps)`` of the configs kept only for the packed pair dequantization
#: (``HALF`` 1 or 2, W2/W4): its 64x256 tile per 4 warps holds 16 words a thread without spilling; the float32
#: dequantization spills there.
_HALF_ONLY = {(64, 256, 64, 4)}


#: ``BLOCK_M`` of the split-K configs, one per row bucket (``M`` rounded up to a power of two, at least 16).
SPLITK_ROW_TILES = (16, 32, 64)


def _splitk_configs(triton):
    """Per row tile: ``(BLOCK_N, BLOCK_K, SPLIT_K, warps, stages)``; one ``BLOCK_M`` covers all rows of a
    call (the weight is streamed once), ``SPLIT_K`` fills the SMs that ``N / BLOCK_N`` tiles leave idle."""
    c = triton.Config
    shapes = {16: [(64, 128, 4, 4, 3), (128, 128, 2, 4, 3), (64, 256, 4, 4, 3), (32, 256, 8, 4, 3),
                   (128, 256, 2, 8, 3), (64, 128, 8, 4, 4), (256, 128, 1, 8, 3), (32, 128, 16, 4, 3)],
              32: [(64, 128, 4, 4, 3), (128, 64, 4, 4, 3), (128, 128, 2, 8, 3), (64, 128, 8, 4, 3)],
              64: [(64, 64, 4, 4, 3), (128, 64, 4, 4, 3), (128, 64, 2, 8, 3), (64, 128, 4, 4, 3)]}
    return [c({"BLOCK_M": bm, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bm in SPLITK_ROW_TILES for n, k, sk, w, s in shapes[bm]]


def prune_by_group(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune pre-filter: keep the configs whose ``BLOCK_K`` and the group size divide one another
    (one scale row per K block, or whole groups broadcast inside it: no per-element scale gather),
    unless none does (groups like 48 straddle every K block); the :data:`_HALF_ONLY` tiles only where the
    kernel takes the packed half2 dequantization; split-K configs (``SPLIT_K > 1`` among them) keep the
    row tile of the call's row bucket ``M_BUCKET``."""
    group = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    half, bits = kwargs.get("HALF", named_args.get("HALF", 0)), kwargs.get("BITS", named_args.get("BITS"))
    configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
               not in _HALF_ONLY or (bits != 8 and _packed.half2_path(half, bits, group, c.kwargs["BLOCK_K"]))]
    aligned = [c for c in configs if group is not None
               and (group % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] % group == 0)] or list(configs)
    bucket = kwargs.get("M_BUCKET", named_args.get("M_BUCKET"))
    if bucket is None or not any(c.kwargs["SPLIT_K"] > 1 for c in configs):
        return aligned
    return [c for c in aligned if c.kwargs["BLOCK_M"] == splitk_row_tile(bucket)] or aligned


def splitk_row_tile(rows: int) -> int:
    """The split-K ``BLOCK_M`` for ``rows`` (their power-of-two bucket, within :data:`SPLITK_ROW_TILES`)."""
    return min(max(triton_next_pow2(rows), SPLITK_ROW_TILES[0]), SPLITK_ROW_TILES[-1])


def kernel_constants(bits: int, asym: bool, has_bias: bool, group_size: int, dtype: torch.dtype,
                     has_perm: bool, scale_dtype: torch.dtype | None = None) -> dict:
    """The kernel's constexpr arguments besides the block sizes (one specialisation per distinct dict);
    ``has_perm``: act-order gathered in the kernel (the split-K path); ``HALF`` = 1 (float16) or 2 (bfloat16)
    for 16-bit activations with scales of their dtype (``scale_dtype``, default ``dtype``): the packed pair
    dequantization."""
    half = {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0) if (scale_dtype or dtype) == dtype else 0
    return {"BITS": bits, "ASYM": asym, "HAS_BIAS": has_bias, "HAS_PERM": has_perm,
            "GROUP_SIZE": _PER_CHANNEL_GROUP if group_size == -1 else group_size,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32", "HALF": half}


@functools.cache
def _build(interpret: bool):
    """``{"jit": kernel, "gemm": autotuned, "splitk": autotuned}`` for the compiled or interpreted mode."""
    key = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"]
    prune = {"early_config_prune": prune_by_group}
    return _runtime.build_kernels(globals(), _wq_kernel, interpret, {
        "gemm": (_gemm_configs, {"key": key, "prune_configs_by": prune}),
        "splitk": (_splitk_configs, {"key": key, "prune_configs_by": prune}),  # the kernel re-zeroes its workspace
    }, helpers=(_packed.split_epilogue, *_packed.PAIR_HELPERS))


def wq_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor | None, perm: Tensor | None,
                     bias: Tensor | None, bits: int, group_size: int, path: str = "auto",
                     config: dict | None = None) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); inputs as :func:`wq_linear`.

    ``config`` (``BLOCK_M/N/K``, ``SPLIT_K``; for ``"gemv"`` and ``"prefill"`` ``BLOCK_N/K``, ``SPLIT_K``)
    skips autotuning; it is required under the interpreter. ``"prefill"`` takes any activation dtype here
    (float32 too, for the interpreter tests); the op sends it float16/bfloat16 only.
    """
    if bits not in KERNEL_BITS:
        raise ValueError(f"The Triton kernel handles bits in {KERNEL_BITS}, got {bits}; use wq_linear_reference.")
    m, k = x.shape
    n = scales.shape[1]
    path = select_path(m) if path == "auto" else path
    if path == "gemv":  # one launch: act-order gather, bias and cast inside the kernel
        return wq_gemv(x, qweight, scales, qzeros, perm, bias, bits, group_size, config)
    if path == "prefill":  # dequantize once (input order, act-order included), then cuBLAS with the bias
        if m == 0:
            return x.new_empty(0, n)
        w = dequantize_packed_triton(qweight, scales, qzeros, perm, bits, group_size, k, x.dtype, config)  # [N, K]
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    split = path == "splitk"
    if perm is not None and not split:
        x = x.index_select(1, perm)  # the tiled GEMM: one gather of the input per call, kernel order
    x = x.contiguous()
    out = x.new_empty(m, n)
    if m == 0:
        return out
    kernels = _build(_runtime.interpreting())
    const = kernel_constants(bits, qzeros is not None, bias is not None, group_size, x.dtype, split and perm is not None,
                             scales.dtype)
    # split-K: one launch (workspace, arrival counters, bias and cast in the kernel); at most one counter
    # per (16-row, 32-column) tile, the smallest of any config
    ws, cnt = _runtime.split_workspace(x.device, _cdiv(m, 16) * 16 * n, _cdiv(m, 16) * _cdiv(n, 32)) if split \
        else (out, out)
    args = (x, qweight, scales, qweight if qzeros is None else qzeros, x if bias is None else bias,
            x if perm is None or not split else perm, out, ws, cnt, m, n, k, min(triton_next_pow2(m), 4096),
            0 if qzeros is None else qzeros.shape[1])
    if config is not None or "gemm" not in kernels:
        if config is None:
            raise ValueError("Under TRITON_INTERPRET=1 pass config={'BLOCK_M':..,'BLOCK_N':..,'BLOCK_K':..,'SPLIT_K':..}.")
        if not split and config.get("SPLIT_K", 1) != 1:
            raise ValueError("path='gemm' needs SPLIT_K=1; use path='splitk' to split K.")
        config = {"SPLIT_K": 1, **config}
        if split and (config["BLOCK_M"] < 16 or config["BLOCK_N"] < 32):
            raise ValueError("path='splitk' needs BLOCK_M >= 16 and BLOCK_N >= 32 (the workspace's tile counters).")
        grid = (_cdiv(m, config["BLOCK_M"]), _cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
        with _runtime.on_device(x):
            _runtime.launch(kernels["jit"], grid, *args, **const, **config)
    else:
        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]), _cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

        with _runtime.on_device(x):
            _runtime.launch(kernels[path], grid, *args, **const)
    return out


def select_path(rows: int) -> str:
    """``path="auto"``: the GEMV up to :data:`~lightning_quant.kernels.wq_gemv.GEMV_MAX_ROWS` rows, the
    tensor-core split-K up to :data:`DECODE_MAX_ROWS`, the tiled GEMM below :data:`PREFILL_MIN_ROWS`
    (an unmeasured placeholder, see there), dequantize-then-cuBLAS from there on."""
    if rows <= GEMV_MAX_ROWS:
        return "gemv"
    if rows <= DECODE_MAX_ROWS:
        return "splitk"
    return "gemm" if rows < PREFILL_MIN_ROWS else "prefill"


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---- torch.library op -------------------------------------------------------------------------


@torch.library.custom_op("lightning_quant::wq_linear", mutates_args=())
def _wq_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor | None, perm: Tensor | None,
                  bias: Tensor | None, bits: int, group_size: int, path: str) -> Tensor:
    if x.device.type == "cuda" and bits in KERNEL_BITS and x.dtype in KERNEL_DTYPES:
        return wq_linear_triton(x, qweight, scales, qzeros, perm, bias, bits, group_size, path)
    return wq_linear_reference(x, qweight, scales, qzeros, perm, bias, bits, group_size)


@_wq_linear_op.register_fake
def _(x, qweight, scales, qzeros, perm, bias, bits, group_size, path):
    return x.new_empty(x.shape[0], scales.shape[1])


def _setup_context(ctx, inputs, output):
    x, qweight, scales, qzeros, perm, _bias, bits, group_size, _path = inputs
    ctx.save_for_backward(qweight, scales, qzeros, perm)
    ctx.meta = (bits, group_size, x.shape[1])


def _backward(ctx, grad):
    """``∂L/∂x = ∂L/∂y · W`` with the dequantized weight; packed buffers get no gradient."""
    qweight, scales, qzeros, perm = ctx.saved_tensors
    bits, group_size, k = ctx.meta
    w = dequantize_packed(qweight, scales, qzeros, bits, group_size, k, grad.dtype, perm)
    return grad @ w, None, None, None, None, None, None, None, None


_wq_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public wrapper ---------------------------------------------------------------------------


def _check(x, qweight, scales, qzeros, perm, bias, bits, group_size, path) -> None:
    _runtime.check_device(x, qweight, scales, qzeros, perm, bias)
    if x.dtype not in _FLOATS:
        raise TypeError(f"wq_linear takes float16/bfloat16/float32 activations, got {x.dtype}.")
    if bits not in packing._PACK_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {packing._PACK_BITS}.")
    k, n = x.shape[-1], scales.shape[-1]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (packing.packed_len(k, bits), n):
        raise ValueError(f"qweight must be int32 [ceil(K·b/32), N] = {(packing.packed_len(k, bits), n)} for K={k}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}; pack with packing.pack_rows(codes.T, bits).")
    n_groups = 1 if group_size == -1 else _cdiv(k, group_size)
    if group_size == 0 or group_size < -1 or scales.dim() != 2 or scales.shape[0] != n_groups:
        raise ValueError(f"scales must be [G, N] with G = ceil(K / group_size) = {n_groups} "
                         f"(group_size={group_size}, K={k}), got {tuple(scales.shape)}.")
    if qzeros is not None and (qzeros.dtype != torch.int32
                               or tuple(qzeros.shape) != (n_groups, packing.packed_len(n, bits))):
        raise ValueError(f"qzeros must be int32 [G, ceil(N·b/32)] = {(n_groups, packing.packed_len(n, bits))}, "
                         f"got {qzeros.dtype} {tuple(qzeros.shape)}.")
    if perm is not None and (perm.dtype != torch.int64 or tuple(perm.shape) != (k,)):
        raise ValueError(f"perm must be int64 [K] = ({k},), got {perm.dtype} {tuple(perm.shape)}.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [N] = ({n},), got {tuple(bias.shape)}.")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() once when building the layer.")
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {', '.join(map(repr, PATHS))}.")
    if path == "gemv" and x.numel() // max(k, 1) > GEMV_MAX_ROWS:
        raise ValueError(f"path='gemv' takes at most {GEMV_MAX_ROWS} rows, got {x.numel() // max(k, 1)}; use 'auto'.")


def wq_linear(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor | None = None, *, bits: int,
              group_size: int, perm: Tensor | None = None, bias: Tensor | None = None,
              force_reference: bool | None = None, path: str = "auto") -> Tensor:
    """``x [..., K] -> [..., N]`` through packed weights (layouts in the module docstring).

    Triton on CUDA (``path="auto"``: the GEMV for ``<= 8`` rows, split-K for ``<= 64``, the tiled GEMM
    below :data:`PREFILL_MIN_ROWS`, dequantize-then-cuBLAS from there; see :func:`select_path`), the
    reference on CPU; ``force_reference=True`` or ``LIGHTNING_QUANT_FORCE_REFERENCE=1`` forces the
    reference. Differentiable in ``x`` (LoRA on a packed base needs that).
    """
    _check(x, qweight, scales, qzeros, perm, bias, bits, group_size, path)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _runtime.reference_forced(force_reference) and x2.device.type != "cpu":
        y = wq_linear_reference(x2, qweight, scales, qzeros, perm, bias, bits, group_size)
    else:
        y = _wq_linear_op(x2, qweight, scales, qzeros, perm, bias, bits, group_size, path)
    return y.reshape(*lead, y.shape[-1])
