"""The operands of onnxruntime's ``com.microsoft::MatMulNBits`` for one :class:`~lightning_quant.layers.packed.PackedLinear`.

Shared by the logits graph (:mod:`lightning_quant.export.onnx`) and the KV-cache decoder
(:mod:`lightning_quant.export.onnx_decoder`): ``B`` uint8 ``[N, K/block, block·bits/8]`` (LSB-first codes in
kernel order, ``N`` outputs by ``K`` inputs), ``scales`` float ``[N·K/block]``, optional packed
``zero_points``, and the attributes ``K``, ``N``, ``bits``, ``block_size``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_quant import packing
from lightning_quant.layers.packed import PackedLinear

__all__ = ["ONNX_BITS", "matmulnbits_operands"]

#: Bit widths MatMulNBits holds.
ONNX_BITS = (2, 4, 8)


def _block_size(layer: PackedLinear, name: str) -> int:
    gs = layer.spec.group_size
    if gs == -1:
        return max(16, 1 << math.ceil(math.log2(layer.in_features)))
    if gs < 16 or gs & (gs - 1):
        raise ValueError(f"onnxruntime's MatMulNBits needs a power-of-two group size >= 16, layer {name!r} has "
                         f"group_size={gs}; quantize with 32, 64 or 128.")
    return gs


def _pack_bytes(codes: Tensor, bits: int) -> Tensor:
    """``[..., n]`` codes -> uint8 ``[..., ceil(n·bits/8)]``, LSB-first within each byte."""
    per = 8 // bits
    n = codes.shape[-1]
    codes = nn.functional.pad(codes.to(torch.int32), (0, (-n) % per))
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (codes.view(*codes.shape[:-1], -1, per) << shifts).sum(-1).to(torch.uint8)


def matmulnbits_operands(layer: PackedLinear, name: str = "layer") -> dict[str, Tensor | int]:
    """``B``, ``scales``, optional ``zero_points`` and the attributes for one layer (kernel column order)."""
    bits = layer.spec.bits
    if bits not in ONNX_BITS:
        raise ValueError(f"ONNX export holds {ONNX_BITS}-bit weights (MatMulNBits); layer {name!r} has bits={bits}. "
                         "Use format='gptq' or 'compressed-tensors' for 3-bit weights.")
    bs = _block_size(layer, name)
    k, n = layer.in_features, layer.out_features
    nb = math.ceil(k / bs)
    codes = packing.unpack_rows(layer.qweight, bits, k).t()  # [in, out] -> [N, K] (kernel order)
    codes = nn.functional.pad(codes, (0, nb * bs - k)).reshape(n, nb, bs)  # [N, nb, bs]
    scales = layer.scales.t().float()  # [G, N] -> [N, G]
    scales = nn.functional.pad(scales, (0, nb - scales.shape[1]), value=1.0)  # per-channel: G=1=nb
    ops: dict[str, Tensor | int] = {"B": _pack_bytes(codes, bits), "scales": scales.reshape(-1).contiguous(),
                                    "K": k, "N": n, "bits": bits, "block_size": bs}
    if layer.qzeros is not None:
        zeros = packing.unpack_cols(layer.qzeros, bits, n).t()  # [N, G]
        ops["zero_points"] = _pack_bytes(zeros, bits).reshape(-1).contiguous()
    return ops
