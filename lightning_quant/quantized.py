"""``QuantizedWeight``: the one result type of every quantization algorithm.

RTN, GPTQ, AWQ and QAT conversion return it; packed layers are built from it; exporters write it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.spec import QuantSpec

__all__ = ["QuantizedWeight"]


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer codes and their quantization parameters for one ``[out, in]`` weight.

    Attributes:
        codes: ``uint8 [out, in]`` unsigned codes in ``[0, 2^bits)``, in the *original* column order.
        scales: ``float32 [out, G]``, values exactly representable in ``spec.scale_dtype``.
        zeros: ``float32 [out, G]`` integer-valued zero points, or ``None`` when ``spec.symmetric``
            (the implicit zero is ``2^(bits-1)``).
        spec: the :class:`~lightning_quant.spec.QuantSpec` the codes follow.
        g_idx: optional ``int64 [in]``, the group of each input column. ``None`` means the default
            ``j // group_size``. Act-order GPTQ (without static groups) sets it.
        perm: optional ``int64 [in]``, the order in which a solver processed the columns
            (act-order). Informational: the math needs only ``g_idx``.
        dtype: the float dtype of the original weight; :meth:`dequantize` returns it.

    Frozen (validated once, never patched): derive a changed copy with :func:`dataclasses.replace`. What a
    method knows beyond the weight (AWQ's scalings, LLM.int8's row absmax, figures such as ``gptq_loss``)
    travels in its :class:`~lightning_quant.methods.registry.MethodResult`, not here.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
    spec: QuantSpec
    g_idx: Tensor | None = None
    perm: Tensor | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}.")
        out_f, in_f = self.codes.shape
        for name in ("g_idx", "perm"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (in_f,):
                raise ValueError(f"{name} must have shape [in] = ({in_f},), got {tuple(t.shape)}.")
        n_groups = self.spec.num_groups(in_f) if self.g_idx is None else int(self.g_idx.max()) + 1
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}.")
        if tuple(self.scales.shape) != (out_f, n_groups):
            raise ValueError(f"scales must be [out, G] = {(out_f, n_groups)}, got {tuple(self.scales.shape)}.")
        if self.spec.symmetric != (self.zeros is None):
            raise ValueError("zeros must be None exactly when the spec is symmetric.")
        if self.zeros is not None and tuple(self.zeros.shape) != (out_f, n_groups):
            raise ValueError(f"zeros must be [out, G] = {(out_f, n_groups)}, got {tuple(self.zeros.shape)}.")
        if self.codes.numel() and int(self.codes.max()) > self.spec.qmax:
            raise ValueError(f"codes exceed {self.spec.qmax}, the largest {self.spec.bits}-bit code.")

    # ---- shape ------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def group_index(self) -> Tensor:
        """``int64 [in]``: the group of each input column (``g_idx`` or the default)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return P.default_group_index(self.in_features, self.spec, self.codes.device)

    @property
    def has_trivial_groups(self) -> bool:
        """True when columns are grouped in their natural order (no act-order ``g_idx``)."""
        if self.g_idx is None:
            return True
        return bool(torch.equal(self.g_idx.long(), self.group_index_default()))

    def group_index_default(self) -> Tensor:
        return P.default_group_index(self.in_features, self.spec, self.codes.device)

    # ---- math -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight ``(codes − z)·s``, ``[out, in]`` in ``dtype`` (default: original)."""
        return P.dequantize(self.codes, self.scales, self.zeros, self.spec, self.g_idx, dtype or self.dtype)

    def zeros_or_midpoint(self) -> Tensor:
        """float32 ``[out, G]`` zero points: ``zeros``, or the implicit ``2^(bits−1)`` when symmetric
        (:func:`~lightning_quant.primitives.zeros_or_midpoint`) — what formats that always store zeros write."""
        return P.zeros_or_midpoint(self.zeros, self.scales, self.spec)

    def bits_per_weight(self) -> float:
        """Storage cost including scales (and zeros) per weight element."""
        n = self.codes.numel()
        scale_bits = torch.finfo(self.spec.torch_scale_dtype).bits
        extra = self.scales.numel() * scale_bits
        if self.zeros is not None:
            extra += self.zeros.numel() * self.spec.bits
        if self.g_idx is not None:
            extra += self.in_features * 32
        return (n * self.spec.bits + extra) / n

    def select_rows(self, index: Tensor) -> QuantizedWeight:
        """The output rows ``index`` (``int64 [out']``) in that order: codes, scales and zeros move together.

        Groups run along the input dim, so a row permutation (e.g. llama.cpp's rotary layout of q/k)
        keeps every group intact and ``dequantize()`` of the result is ``dequantize()[index]`` exactly.
        """
        index = index.to(device=self.codes.device, dtype=torch.long)
        return replace(self, codes=self.codes[index], scales=self.scales[index],
                       zeros=None if self.zeros is None else self.zeros[index])

    def to(self, device: torch.device | str) -> QuantizedWeight:
        def mv(t):
            return None if t is None else t.to(device)

        return replace(self, codes=mv(self.codes), scales=mv(self.scales), zeros=mv(self.zeros),
                       g_idx=mv(self.g_idx), perm=mv(self.perm))

    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        spec: QuantSpec,
        scales: Tensor,
        zeros: Tensor | None,
        g_idx: Tensor | None = None,
        perm: Tensor | None = None,
    ) -> QuantizedWeight:
        """Quantize ``weight [out, in]`` with given qparams (no search)."""
        codes = P.quantize(weight, scales, zeros, spec, g_idx)
        return cls(codes=codes, scales=scales.float(), zeros=None if zeros is None else zeros.float(),
                   spec=spec, g_idx=g_idx, perm=perm, dtype=weight.dtype)
