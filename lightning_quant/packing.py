"""Integer codes <-> int32 words. Pure torch, vectorised, every layout named.

All layouts pack *LSB-first* and *densely*: code ``k`` along the packed dimension occupies bits
``[k·b, (k+1)·b)`` of the concatenated little-endian bit stream of the words. For 2/4/8 bits that
is the usual "``32/b`` codes per word"; 3-bit codes straddle word boundaries (as GPTQ stores them).
The packed dimension is padded with zero codes up to a whole number of words.

Named layouts used by the formats (see ``shared/FORMATS.md``):

=====================  =================================  ===========================
layout                 codes in -> words out              used by
=====================  =================================  ===========================
``pack_rows``          ``[R, C] -> [ceil(R·b/32), C]``    GPTQ ``qweight`` (codes^T)
``pack_cols``          ``[R, C] -> [R, ceil(C·b/32)]``    GPTQ ``qzeros``, compressed-
                                                          tensors ``weight_packed``
``pack_awq``           ``[R, C] -> [R, C/8]``             AWQ GEMM ``qweight``/``qzeros``
=====================  =================================  ===========================
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "pack",
    "pack_awq",
    "pack_cols",
    "pack_rows",
    "packed_len",
    "unpack",
    "unpack_awq",
    "unpack_cols",
    "unpack_rows",
]

#: AutoAWQ's nibble order: slot ``i`` of a word holds column ``8·c + AWQ_ORDER[i]``.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
_PACK_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in _PACK_BITS:
        raise ValueError(f"Cannot pack {bits}-bit codes; supported widths are {_PACK_BITS}.")


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits."""
    return (n * bits + 31) // 32


def _to_int32(v: Tensor) -> Tensor:
    """int64 values in ``[0, 2^32)`` -> int32 with the same bit pattern."""
    return (v - ((v >> 31) & 1) * (1 << 32)).to(torch.int32)


def _pack_last(x: Tensor, bits: int) -> Tensor:
    """Pack codes along the last dimension: ``[..., n] -> [..., packed_len(n)]``."""
    n = x.shape[-1]
    n_words = packed_len(n, bits)
    x = x.to(torch.int64)
    if 32 % bits == 0:
        per = 32 // bits
        x = torch.nn.functional.pad(x, (0, n_words * per - n))
        shifts = torch.arange(per, device=x.device, dtype=torch.int64) * bits
        words = (x.view(*x.shape[:-1], n_words, per) << shifts).sum(-1)
    else:  # dense bit stream (3-bit)
        bit_pos = torch.arange(bits, device=x.device, dtype=torch.int64)
        stream = ((x.unsqueeze(-1) >> bit_pos) & 1).flatten(-2)  # [..., n·b]
        stream = torch.nn.functional.pad(stream, (0, n_words * 32 - n * bits))
        word_pos = torch.arange(32, device=x.device, dtype=torch.int64)
        words = (stream.view(*x.shape[:-1], n_words, 32) << word_pos).sum(-1)
    return _to_int32(words)


def _unpack_last(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`_pack_last`: ``[..., W] -> uint8 [..., n]``."""
    if words.dtype != torch.int32:
        raise ValueError(f"Packed words must be int32, got {words.dtype}.")
    if words.shape[-1] != packed_len(n, bits):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {n} {bits}-bit codes "
            f"(expected {packed_len(n, bits)}); check the tensor's shape against the layer size."
        )
    w = words.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
        codes = ((w.unsqueeze(-1) >> shifts) & mask).flatten(-2)
    else:
        word_pos = torch.arange(32, device=w.device, dtype=torch.int64)
        stream = ((w.unsqueeze(-1) >> word_pos) & 1).flatten(-2)[..., : n * bits]
        bit_pos = torch.arange(bits, device=w.device, dtype=torch.int64)
        codes = (stream.view(*w.shape[:-1], n, bits) << bit_pos).sum(-1)
    return codes[..., :n].to(torch.uint8)


def pack(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Pack integer codes (values in ``[0, 2^bits)``) along ``dim`` into int32 words."""
    _check_bits(bits)
    if codes.is_floating_point():
        raise ValueError(f"pack() takes integer codes, got {codes.dtype}; quantize first.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"Codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}].")
    return _pack_last(codes.movedim(dim, -1), bits).movedim(-1, dim).contiguous()


def unpack(words: Tensor, bits: int, n: int, dim: int) -> Tensor:
    """Unpack ``n`` codes along ``dim``; returns uint8."""
    _check_bits(bits)
    return _unpack_last(words.movedim(dim, -1), bits, n).movedim(-1, dim).contiguous()


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """``[R, C] -> int32 [ceil(R·b/32), C]`` (consecutive rows share a word; GPTQ ``qweight``)."""
    return pack(codes, bits, dim=0)


def unpack_rows(words: Tensor, bits: int, rows: int) -> Tensor:
    return unpack(words, bits, rows, dim=0)


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """``[R, C] -> int32 [R, ceil(C·b/32)]`` (consecutive columns share a word)."""
    return pack(codes, bits, dim=1)


def unpack_cols(words: Tensor, bits: int, cols: int) -> Tensor:
    return unpack(words, bits, cols, dim=1)


def pack_awq(codes: Tensor) -> Tensor:
    """AWQ GEMM packing of 4-bit ``[R, C]`` codes (C a multiple of 8) -> int32 ``[R, C/8]``."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}.")
    order = torch.tensor(AWQ_ORDER, device=codes.device)
    interleaved = codes.reshape(rows, cols // 8, 8).index_select(2, order)  # [R, C/8, 8]
    return pack_cols(interleaved.reshape(rows, cols), 4)


def unpack_awq(words: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[R, C/8] -> uint8 [R, C]``."""
    rows = words.shape[0]
    if cols % 8 or words.shape[1] * 8 != cols:
        raise ValueError(f"AWQ words of shape {tuple(words.shape)} cannot hold {cols} columns.")
    order = torch.tensor(AWQ_REVERSE_ORDER, device=words.device)
    codes = unpack_cols(words, 4, cols).reshape(rows, cols // 8, 8)
    return codes.index_select(2, order).reshape(rows, cols)
