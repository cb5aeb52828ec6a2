"""Our integer grids as llama.cpp weight blocks: ``Q4_0``, ``Q4_1``, ``Q8_0`` (ggml's block layouts).

A ggml block covers 32 consecutive weights of one row along the *input* dim (``K``), little-endian:

=========  =====  ======================================================  ==========================
type       bytes  layout                                                  value of element ``j``
=========  =====  ======================================================  ==========================
``Q4_0``   18     ``d`` f16, ``qs`` 16 B: byte ``i`` = ``q[i] | q[i+16]<<4``  ``(q_j − 8)·d``
``Q4_1``   20     ``d`` f16, ``m`` f16, ``qs`` 16 B (as Q4_0)              ``q_j·d + m``
``Q8_0``   34     ``d`` f16, ``qs`` 32 × int8                              ``qs_j·d``
=========  =====  ======================================================  ==========================

Our codes are unsigned with ``w = (q − z)·s`` (:mod:`lightning_quant.spec`), so with the block's group
scale ``s`` (a group of ``32·k`` columns is ``k`` blocks sharing ``s``; a partial last group of
``32·k'`` columns is ``k'`` blocks):

* W4 symmetric (``z = 8``): ``Q4_0`` with ``d = s``, nibbles = our codes — exact;
* W8 symmetric (``z = 128``): ``Q8_0`` with ``d = s``, ``qs = q − 128`` — exact;
* W4 asymmetric: ``Q4_1`` with ``d = s``, ``m = −z·s`` rounded to float16. ``z·s`` needs up to
  4 + 11 significant bits, float16 holds 11, so ``m`` is off by at most half an ulp:
  ``|m − (−z·s)| ≤ 2⁻¹¹·z·s`` (``≤ 2⁻²⁵`` absolute in float16's subnormal range), the same for every
  weight of the block; :func:`q4_1_min_error` measures it.

Requirements (else :class:`ValueError` naming :data:`SUPPORTED`): ``in_features`` a multiple of 32,
group size ``-1`` or a multiple of 32, scales exactly representable in float16, and groups in natural
column order (act-order GPTQ without static groups has column groups the row blocks cannot express).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec

__all__ = ["BLOCK", "SUPPORTED", "block_type", "encode_blocks", "q4_1_min_error", "quantize_q8_0"]

#: weights per ggml block (QK4_0 = QK4_1 = QK8_0)
BLOCK = 32
#: (bits, symmetric) -> ggml type name
_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
SUPPORTED = ("W4 symmetric -> Q4_0, W4 asymmetric -> Q4_1, W8 symmetric -> Q8_0; group_size -1 (per channel) or "
             "a multiple of 32 (32, 64, 128, ...), in_features a multiple of 32, float16 scales, no act-order g_idx "
             "(GPTQConfig(act_order=True, static_groups=True) or act_order=False)")


def block_type(spec: QuantSpec, name: str = "layer") -> str:
    """The ggml type (``"Q4_0"``, ``"Q4_1"``, ``"Q8_0"``) that holds ``spec`` exactly; raises otherwise."""
    kind = _TYPES.get((spec.bits, spec.symmetric))
    if kind is None:
        raise ValueError(f"GGUF export cannot hold layer {name!r} ({spec}: bits={spec.bits}, "
                         f"symmetric={spec.symmetric}); supported: {SUPPORTED}.")
    if spec.group_size != -1 and spec.group_size % BLOCK:
        raise ValueError(f"GGUF export cannot hold layer {name!r} with group_size={spec.group_size}: llama.cpp blocks "
                         f"are {BLOCK} weights wide; supported: {SUPPORTED}.")
    return kind


def _check(qw: QuantizedWeight, name: str) -> str:
    kind = block_type(qw.spec, name)
    if qw.in_features % BLOCK:
        raise ValueError(f"GGUF export cannot hold layer {name!r}: in_features={qw.in_features} is not a multiple of "
                         f"{BLOCK} (llama.cpp's block width); supported: {SUPPORTED}.")
    if not qw.has_trivial_groups:
        raise ValueError(f"Layer {name!r} has an act-order g_idx (groups not in column order), which llama.cpp's "
                         "row blocks cannot express; quantize with GPTQConfig(act_order=True, static_groups=True) "
                         "(same processing order, groups in column order) or act_order=False.")
    if not torch.equal(qw.scales.to(torch.float16).float(), qw.scales.float()):
        raise ValueError(f"Layer {name!r} has scales that float16 does not hold exactly (scale_dtype="
                         f"{qw.spec.scale_dtype!r}); GGUF blocks store float16 scales: quantize with "
                         "QuantSpec(scale_dtype='float16').")
    return kind


def _block_params(qw: QuantizedWeight, t: Tensor) -> Tensor:
    """``[out, G] -> [out, in/32]``: each block's value of a per-group tensor (groups are 32·k wide)."""
    first_col = torch.arange(0, qw.in_features, BLOCK, device=t.device)  # first column of each block
    return t.index_select(1, qw.group_index()[first_col].to(t.device))


def _f16_bytes(t: Tensor) -> np.ndarray:
    """float tensor ``[...]`` -> uint8 ``[..., 2]`` (little-endian float16)."""
    return t.to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*t.shape, 2)


def _nibbles(codes: Tensor) -> np.ndarray:
    """``[out, nb, 32]`` 4-bit codes -> uint8 ``[out, nb, 16]``: low nibble element ``i``, high ``i + 16``."""
    c = codes.to(torch.uint8)
    return (c[..., : BLOCK // 2] | (c[..., BLOCK // 2:] << 4)).numpy()


def q4_1_min(qw: QuantizedWeight) -> Tensor:
    """``m = −z·s`` per block, rounded to float16 (returned as float32 ``[out, in/32]``)."""
    return (-_block_params(qw, qw.zeros) * _block_params(qw, qw.scales)).to(torch.float16).float()


def q4_1_min_error(qw: QuantizedWeight) -> tuple[float, float]:
    """``(max |m_f16 − (−z·s)|, max of that over s)`` for an asymmetric W4 weight: the only inexact part
    of the Q4_1 mapping (module docstring: at most ``2⁻¹¹·z·s ≤ 15·2⁻¹¹·s``)."""
    exact = (-_block_params(qw, qw.zeros).double() * _block_params(qw, qw.scales).double())
    err = (q4_1_min(qw).double() - exact).abs()
    return float(err.max()), float((err / _block_params(qw, qw.scales).double()).max())


def encode_blocks(qw: QuantizedWeight, name: str = "layer") -> tuple[str, np.ndarray]:
    """``(ggml type name, uint8 [out, in/32 · block bytes])``: the rows of ``qw`` as llama.cpp blocks."""
    kind = _check(qw, name)
    out_f, nb = qw.out_features, qw.in_features // BLOCK
    qw = qw.to("cpu")
    codes = qw.codes.reshape(out_f, nb, BLOCK)  # [out, in] -> [out, nb, 32]
    d = _f16_bytes(_block_params(qw, qw.scales))  # [out, nb, 2]
    if kind == "Q4_0":
        parts = [d, _nibbles(codes)]
    elif kind == "Q4_1":
        parts = [d, _f16_bytes(q4_1_min(qw)), _nibbles(codes)]
    else:  # Q8_0: signed codes q − 128 as int8 bytes
        parts = [d, (codes.to(torch.int16) - qw.spec.midpoint).to(torch.int8).numpy().view(np.uint8)]
    return kind, np.concatenate(parts, axis=-1).reshape(out_f, -1)


#: the grid Q8_0 is written with for float tensors (embeddings, lm_head) on request
Q8_0_SPEC = QuantSpec(bits=8, group_size=BLOCK, symmetric=True, scale_dtype="float16")


def quantize_q8_0(weight: Tensor, name: str = "tensor") -> QuantizedWeight:
    """Round-to-nearest ``W8 g32`` symmetric codes of a float ``[rows, cols]`` tensor (our min-max grid,
    :func:`lightning_quant.primitives.compute_qparams`), ready for :func:`encode_blocks` as ``Q8_0``."""
    w = weight.detach().float().cpu()
    if w.shape[1] % BLOCK:
        raise ValueError(f"float_type='q8_0' needs {name!r}'s row length {w.shape[1]} to be a multiple of {BLOCK}; "
                         "use float_type='f16'.")
    P.check_finite(w, name)
    s, _ = P.compute_qparams(w, Q8_0_SPEC)
    return QuantizedWeight.from_float(w, Q8_0_SPEC, s, None)
