"""int8 x int8 -> int32 matrix multiply (the core of LLM.int8() / W8A8 layers).

``int8_matmul(a [M, K] int8, b [N, K] int8) -> int32 [M, N]`` computes ``a @ b.T`` exactly in
integer arithmetic (LLM.int8(), Dettmers et al. 2022, eq. 1 before the outer-product rescale).

* :func:`int8_matmul_reference` — pure torch (int64 products, exact for ``K < 2^17``): the CPU path
  and the oracle of the Triton kernel.
* ``lightning_quant::int8_matmul`` — ``torch.library`` op: reference on CPU, Triton on CUDA; a fake
  implementation lets ``torch.compile`` trace it.
* :func:`int8_matmul_scaled` (op ``lightning_quant::int8_matmul_scaled``) — the same product with the
  rescale fused into the kernel's epilogue: ``cast(((C · r/d) · c/d + residual) + bias)`` with per-row
  ``r``, per-column ``c``, an optional float32 ``residual [M, N]`` and ``bias [N]``, one launch
  (see its docstring for the numerics); :func:`int8_matmul_scaled_reference` is its CPU path.
* :func:`int8_outlier_matmul` — LLM.int8's mixed-precision decomposition around ``int8_matmul_scaled`` (the
  forward of ``Int8OutlierLinear``), with a static-width outlier path (no host sync).
* :func:`quantize_rows` (op ``lightning_quant::int8_quantize_rows``) — LLM.int8's per-token absmax
  activation quantization with the outlier columns zeroed, one kernel on CUDA (two passes over each row:
  its absmax, then its codes), :func:`quantize_rows_reference` on CPU, bit for bit the same;
* :func:`int8_matmul_triton` / :func:`int8_matmul_scaled_triton` — the kernel launchers (CUDA, or CPU
  tensors under ``TRITON_INTERPRET=1``): ``[BLOCK_M, BLOCK_N]`` tiles, ``tl.dot`` on int8 operands with an
  int32 accumulator (the tensor cores' IMMA path), autotuned over a small config set keyed by a
  power-of-two row bucket; one ``@triton.jit`` kernel, the epilogue chosen by the ``SCALED`` constexpr.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_quant.algorithms.llm_int8 import ABSMAX_FLOOR, absmax_quantize_rows, outlier_columns
from lightning_quant.kernels import _runtime

__all__ = ["MAX_OUTLIER_COLUMNS", "int8_matmul", "int8_matmul_reference", "int8_matmul_scaled",
           "int8_matmul_scaled_reference", "int8_matmul_scaled_triton", "int8_matmul_triton", "int8_outlier_matmul",
           "quantize_rows", "quantize_rows_reference", "quantize_rows_triton"]

#: Width of the float outlier path of :func:`int8_outlier_matmul` (static, so no host sync decides it);
#: the paper reports at most a few dozen outlier feature dimensions per layer up to 13B parameters.
MAX_OUTLIER_COLUMNS = 128
#: Output dtypes of :func:`int8_matmul_scaled`.
SCALED_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

tl = None  # triton.language, bound on the first kernel build (lazy import)


def int8_matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b.T`` for int8 inputs, accumulated in int32 (via int64 on CPU; no overflow for K < 2^17)."""
    return (a.to(torch.int64) @ b.to(torch.int64).t()).to(torch.int32)


def int8_matmul_scaled_reference(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor,
                                 bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
                                 residual: Tensor | None = None, scale_divisor: float = 1.0) -> Tensor:
    """``cast(((C · r/d)[:, None] · (c/d)[None, :] + residual) + bias)`` in float32 with ``C = a @ b.T``
    exact, each operation in this order and rounded once (torch on CPU): the numerics of LLM.int8's
    rescale as :func:`int8_outlier_matmul` always computed it."""
    y = int8_matmul_reference(a, b).float() * (row_scale.float() / scale_divisor).unsqueeze(1) \
        * (col_scale.float() / scale_divisor).unsqueeze(0)  # [M, N]
    if residual is not None:
        y = y + residual
    if bias is not None:
        y = y + bias.float()
    return y if out_dtype is None else y.to(out_dtype)


def _int8_kernel(a_ptr, b_ptr, c_ptr, rs_ptr, cs_ptr, bias_ptr, res_ptr, M, N, K, M_BUCKET, divisor,
                 SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C[m-tile, n-tile] = sum_k A[m, k] · B[n, k]`` with an int32 accumulator; ``SCALED``: the float32
    epilogue ``cast(((C · r/d) · c/d + residual) + bias)`` instead of the int32 store."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
    out_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # int64: M·N may reach 2^31
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SCALED:  # the reference's float32 operations in its order (launched without FMA contraction)
        rs = tl.math.div_rn(tl.load(rs_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32), divisor)  # IEEE r/d
        cs = tl.math.div_rn(tl.load(cs_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), divisor)
        y = acc.to(tl.float32) * rs[:, None] * cs[None, :]
        if HAS_RESIDUAL:
            y = y + tl.load(res_ptr + out_off, mask=mask_out, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + out_off, y.to(c_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.store(c_ptr + out_off, acc, mask=mask_out)


_SHAPES = [(16, 64, 128, 4, 3), (16, 128, 128, 4, 4), (32, 128, 128, 4, 3), (64, 64, 128, 4, 4),
           (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
#: Tiles the fused epilogue leaves out: 128 x 256 on 8 warps holds 128 int32 accumulators, the float32
#: result and the residual tile per thread and spills (1.5 KiB on sm_90, ``python -m lightning_quant.kernels.aot``).
_SCALED_EXCLUDED = {(128, 256, 64, 8, 3)}


def _configs(triton, scaled: bool = False):
    """The autotune configs of the int32-store kernel, or (``scaled``) of the fused epilogue."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in _SHAPES if not (scaled and (m, n, k, w, s) in _SCALED_EXCLUDED)]


def _scaled_configs(triton):
    return _configs(triton, scaled=True)


@functools.cache
def _build(interpret: bool):
    key = {"key": ["M_BUCKET", "N", "K"]}
    return _runtime.build_kernels(globals(), _int8_kernel, interpret,
                                  {"tuned": (_configs, key), "scaled": (_scaled_configs, key)})


def _launch(a: Tensor, b: Tensor, out: Tensor, epilogue: tuple, const: dict, config: dict | None) -> Tensor:
    """Run the kernel on ``a [M, K]``, ``b [N, K]`` into ``out [M, N]``; ``epilogue`` = the pointers and
    divisor (``rs, cs, bias, residual, d``), ``const`` = ``SCALED`` / ``HAS_BIAS`` / ``HAS_RESIDUAL``."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0:
        return out
    kernels = _build(_runtime.interpreting())
    bucket = min(1 << max(m - 1, 0).bit_length(), 4096)
    args = (a, b, out, *epilogue[:4], m, n, k, bucket, epilogue[4])
    # SCALED: no FMA contraction, so (C·r)·c + residual + bias rounds after every operation, as the reference
    opts = {**const, **({"enable_fp_fusion": False} if const["SCALED"] else {})}
    with _runtime.on_device(a):
        if config is not None or "tuned" not in kernels:
            if config is None:
                raise ValueError("Under TRITON_INTERPRET=1 pass config={'BLOCK_M': .., 'BLOCK_N': .., 'BLOCK_K': ..}.")
            grid = (-(-m // config["BLOCK_M"]), -(-n // config["BLOCK_N"]))
            _runtime.launch(kernels["jit"], grid, *args, **opts, **config)
        else:
            _runtime.launch(kernels["scaled" if const["SCALED"] else "tuned"],
                            lambda meta: (-(-m // meta["BLOCK_M"]), -(-n // meta["BLOCK_N"])), *args, **opts)
    return out


def int8_matmul_triton(a: Tensor, b: Tensor, config: dict | None = None) -> Tensor:
    """Launch the Triton kernel; ``config`` (``BLOCK_M/N/K``) skips autotuning (required when interpreting)."""
    _check(a, b)
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return _launch(a, b, out, (a, a, a, a, 1.0), {"SCALED": False, "HAS_BIAS": False, "HAS_RESIDUAL": False}, config)


def int8_matmul_scaled_triton(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None = None,
                              out_dtype: torch.dtype | None = None, residual: Tensor | None = None,
                              scale_divisor: float = 1.0, config: dict | None = None) -> Tensor:
    """Launch the kernel with the fused epilogue (inputs as :func:`int8_matmul_scaled`); ``config`` as
    :func:`int8_matmul_triton`."""
    _check_scaled(a, b, row_scale, col_scale, bias, out_dtype, residual, scale_divisor)
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype or torch.float32, device=a.device)
    epilogue = (row_scale.contiguous(), col_scale.contiguous(), a if bias is None else bias.contiguous(),
                a if residual is None else residual.contiguous(), float(scale_divisor))
    const = {"SCALED": True, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None}
    return _launch(a, b, out, epilogue, const, config)


def _rowquant_kernel(x_ptr, m_ptr, q_ptr, a_ptr, K, tiny, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row ``program_id(0)`` of ``x [M, K]``: its absmax over the columns not masked, then its int8 codes."""
    row = tl.program_id(0).to(tl.int64)
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: the row's absmax (masked columns read as 0)
        offs = k0 + tl.arange(0, BLOCK_K)
        ok = offs < K
        if HAS_MASK:
            ok = ok & (tl.load(m_ptr + offs, mask=offs < K, other=1) == 0)
        x = tl.load(x_ptr + row * K + offs, mask=ok, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    denom = tl.maximum(amax, tiny)  # the reference's clamp_min(ABSMAX_FLOOR)
    for k0 in range(0, K, BLOCK_K):  # pass 2: round(x · 127 / absmax), clamped to ±127
        offs = k0 + tl.arange(0, BLOCK_K)
        ok = offs < K
        keep = ok
        if HAS_MASK:
            keep = ok & (tl.load(m_ptr + offs, mask=ok, other=1) == 0)
        x = tl.load(x_ptr + row * K + offs, mask=keep, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x * 127.0, denom)  # IEEE, as torch's division
        r = (v + 12582912.0) - 12582912.0  # round half to even (|v| <= 127 << 2^22), as torch.round
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, r.to(tl.int8), mask=ok)
    tl.store(a_ptr + row, amax)


@functools.cache
def _build_rowquant(interpret: bool):
    return _runtime.build_kernels(globals(), _rowquant_kernel, interpret, {})


def quantize_rows_triton(x: Tensor, masked: Tensor | None = None, block_k: int = 1024) -> tuple[Tensor, Tensor]:
    """Launch the row-quantization kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``): the values of
    :func:`quantize_rows_reference` in one launch, one program per row."""
    _check_rows(x, masked)
    x = x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    absmax = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, absmax
    jit = _build_rowquant(_runtime.interpreting())["jit"]
    mask = x if masked is None else masked.to(torch.int8).contiguous()
    with _runtime.on_device(x):  # no FMA contraction: x·127 rounds before the division, as the reference
        _runtime.launch(jit, (m,), x, mask, codes, absmax, k, ABSMAX_FLOOR, HAS_MASK=masked is not None,
                        BLOCK_K=min(block_k, 1 << max(k - 1, 0).bit_length()), enable_fp_fusion=False)
    return codes, absmax


def quantize_rows_reference(x: Tensor, masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LLM.int8's activation quantization: :func:`~lightning_quant.algorithms.llm_int8.absmax_quantize_rows`
    of ``x`` in float32 with the columns of ``masked [K]`` (the outlier path's) set to 0."""
    xf = x.float()
    return absmax_quantize_rows(xf if masked is None else xf.masked_fill(masked, 0.0))


def _check_rows(x: Tensor, masked: Tensor | None) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_rows takes a float [M, K] input, got {x.dtype} {tuple(x.shape)}.")
    if masked is not None and (masked.dtype != torch.bool or tuple(masked.shape) != (x.shape[1],)):
        raise ValueError(f"masked must be a bool [K] = ({x.shape[1]},) column mask, got {masked.dtype} "
                         f"{tuple(masked.shape)}.")
    _runtime.check_device(x, masked)


@torch.library.custom_op("lightning_quant::int8_quantize_rows", mutates_args=())
def _quantize_rows_op(x: Tensor, masked: Tensor | None) -> tuple[Tensor, Tensor]:
    if x.device.type == "cuda":
        return quantize_rows_triton(x, masked)
    return quantize_rows_reference(x, masked)


@_quantize_rows_op.register_fake
def _(x, masked):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


def quantize_rows(x: Tensor, masked: Tensor | None = None, force_reference: bool | None = None) -> tuple[Tensor, Tensor]:
    """``(codes int8 [M, K], absmax float32 [M])`` of ``x [M, K]`` with the ``masked`` columns zeroed: one
    kernel on CUDA (``lightning_quant::int8_quantize_rows``), :func:`quantize_rows_reference` on CPU.

    Numerics: the kernel computes the reference's float32 operations in its order — ``|x|`` max (exact),
    ``x·127`` then an IEEE division by ``max(absmax, tiny)``, round half to even, clamp to ±127 — so the
    codes are bit for bit the reference's (tested under ``TRITON_INTERPRET=1``; on the GPU torch's tensor
    division is IEEE too).
    """
    _check_rows(x, masked)
    if _runtime.reference_forced(force_reference):
        return quantize_rows_reference(x, masked)
    return _quantize_rows_op(x, masked)


@torch.library.custom_op("lightning_quant::int8_matmul", mutates_args=())
def _int8_matmul_op(a: Tensor, b: Tensor) -> Tensor:
    if a.device.type == "cuda":
        return int8_matmul_triton(a, b)
    return int8_matmul_reference(a, b)


@_int8_matmul_op.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


def _check(a: Tensor, b: Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 tensors, got {a.dtype} and {b.dtype}.")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul needs a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}.")
    _runtime.check_device(a, b)


def int8_matmul(a: Tensor, b: Tensor, force_reference: bool | None = None) -> Tensor:
    """``a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N]``: Triton on CUDA, the reference on CPU.

    ``force_reference=True`` or ``LIGHTNING_QUANT_FORCE_REFERENCE=1`` forces the reference.
    """
    _check(a, b)
    if _runtime.reference_forced(force_reference):
        return int8_matmul_reference(a, b)
    return _int8_matmul_op(a.contiguous(), b.contiguous())


@torch.library.custom_op("lightning_quant::int8_matmul_scaled", mutates_args=())
def _int8_matmul_scaled_op(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None,
                           residual: Tensor | None, scale_divisor: float, out_dtype: torch.dtype) -> Tensor:
    if a.device.type == "cuda":
        return int8_matmul_scaled_triton(a, b, row_scale, col_scale, bias, out_dtype, residual, scale_divisor)
    return int8_matmul_scaled_reference(a, b, row_scale, col_scale, bias, out_dtype, residual, scale_divisor)


@_int8_matmul_scaled_op.register_fake
def _(a, b, row_scale, col_scale, bias, residual, scale_divisor, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


def _check_scaled(a, b, row_scale, col_scale, bias, out_dtype, residual, scale_divisor) -> None:
    _check(a, b)
    m, n = a.shape[0], b.shape[0]
    _runtime.check_device(a, b, row_scale, col_scale, bias, residual)
    for name, t, size in (("row_scale", row_scale, m), ("col_scale", col_scale, n), ("bias", bias, n)):
        if t is not None and (tuple(t.shape) != (size,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor of shape [{size}], got {t.dtype} {tuple(t.shape)}.")
    if residual is not None and (residual.dtype != torch.float32 or tuple(residual.shape) != (m, n)):
        raise ValueError(f"residual must be float32 [M, N] = ({m}, {n}), got {residual.dtype} {tuple(residual.shape)}.")
    if out_dtype is not None and out_dtype not in SCALED_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {', '.join(map(str, SCALED_OUT_DTYPES))} or None, got {out_dtype}.")
    if not scale_divisor > 0.0:
        raise ValueError(f"scale_divisor must be > 0 (127.0 for absmax scales), got {scale_divisor}.")


def int8_matmul_scaled(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Tensor | None = None,
                       out_dtype: torch.dtype | None = None, residual: Tensor | None = None, *,
                       scale_divisor: float = 1.0, force_reference: bool | None = None) -> Tensor:
    """``y [M, N] = cast(((C · r/d)[:, None] · (c/d)[None, :] + residual) + bias)`` for int8 ``a [M, K]``,
    ``b [N, K]``, ``C = a @ b.T`` (int32), ``r = row_scale [M]``, ``c = col_scale [N]``, ``d = scale_divisor``
    (``127.0`` when the scales are absmax values, LLM.int8's ``a/127`` and ``SCB/127``); optional float32
    ``residual [M, N]`` and ``bias [N]``; ``y`` in ``out_dtype`` (``None``: float32). One launch on CUDA.

    Numerics. The reference (:func:`int8_matmul_scaled_reference`, the CPU path and
    ``force_reference=True``) is float32 torch, each operation rounded once in the order written. The
    kernel runs the same float32 operations in the same order in its epilogue: ``C`` is exact (int32),
    ``r/d`` and ``c/d`` are IEEE divisions (``div_rn``), and the launch disables FMA contraction, so
    every product and sum is rounded exactly as the reference's — bit for bit with the reference under
    ``TRITON_INTERPRET=1`` (float32 and float16 outputs; bfloat16 there truncates, a limit of the
    interpreter). On the GPU the comparison is with torch's CUDA ops, which divide by a scalar through
    its reciprocal (``x · (1/d)``, up to 1 ulp off ``x/d``): each scale then differs by at most 2^-23
    relative, ``y`` before the cast by at most ``2^-21·|C·r·c| + 2^-24·(|residual| + |bias|)``-ish, and
    after the one rounding at the cast by at most one unit in the last place of ``out_dtype`` more —
    the tolerance the GPU test uses (``2^-20`` relative in float32, one ulp plus that in half precision).
    """
    _check_scaled(a, b, row_scale, col_scale, bias, out_dtype, residual, scale_divisor)
    if _runtime.reference_forced(force_reference):
        return int8_matmul_scaled_reference(a, b, row_scale, col_scale, bias, out_dtype, residual, scale_divisor)
    return _int8_matmul_scaled_op(a.contiguous(), b.contiguous(), row_scale, col_scale, bias, residual,
                                  float(scale_divisor), out_dtype or torch.float32)


def int8_outlier_matmul(x: Tensor, codes: Tensor, scb: Tensor, threshold: float,
                        max_outliers: int = MAX_OUTLIER_COLUMNS, bias: Tensor | None = None,
                        out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """LLM.int8 product ``x [M, in] @ W^T (+ bias)`` for ``W = codes * SCB / 127``: returns ``(y [M, out], outliers [in])``,
    ``y`` float32 (``out_dtype=None``) or cast to ``out_dtype`` after the float32 bias add — the whole
    forward of :class:`~lightning_quant.layers.int8.Int8OutlierLinear` on a flat input.

    ``y = X_o W_o^T + (round(X_r·127/a) @ codes_r^T) · a/127 · SCB/127`` where ``o`` are the outlier
    columns (float path with dequantized weights) and ``r`` the rest (int8 x int8 -> int32, ``a`` the
    per-token absmax of ``X_r``). The int8 product, both rescales, the outlier path's float product
    (added as the residual), the bias and the cast are one :func:`int8_matmul_scaled` (one kernel on
    CUDA; on CPU the same float32 operations as before the fusion, bit for bit).

    Without a host sync: the float path has a static width of ``min(in, max_outliers)`` columns
    (``nonzero_static``; unused slots multiply zeros), so no ``bool(outliers.any())`` waits for the
    GPU. Outlier columns beyond the first ``max_outliers`` (in feature order) stay on the int8 path;
    ``outliers`` still marks every column above the threshold.
    """
    xf = x.float()
    outliers = outlier_columns(xf, threshold)
    width = min(x.shape[-1], max_outliers) if threshold > 0.0 else 0
    residual = None
    if width:
        kept = outliers & (torch.cumsum(outliers, 0) <= width)  # [in]: the first `width` outlier columns
        idx = torch.nonzero_static(kept, size=width, fill_value=0).squeeze(1)  # [width], padded with column 0
        valid = torch.arange(width, device=x.device) < kept.sum()  # [width]: False on the padding
        x_o = xf.index_select(1, idx) * valid  # [M, width]
        w_o = codes.index_select(1, idx).float() * (scb.float() / 127.0).unsqueeze(1)  # [out, width]
        residual = x_o @ w_o.t()  # [M, out] float32
    a_codes, a_absmax = quantize_rows(x, kept if width else None)  # [M, in] int8, [M]: one kernel on CUDA
    y = int8_matmul_scaled(a_codes, codes, a_absmax, scb, bias, out_dtype, residual, scale_divisor=127.0)
    return y, outliers
