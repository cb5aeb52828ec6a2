"""``PackedLinear``: a linear layer whose weight lives as packed integer codes.

Storage (all buffers, so ``state_dict`` round-trips and ``.to(device)`` works):

* ``qweight``  int32 ``[ceil(in·b/32), out]`` — codes packed along the input dim
  (:func:`~lightning_quant.packing.pack_rows`, the GPTQ ``qweight`` layout) in *kernel order*:
  with a non-trivial ``g_idx`` (act-order GPTQ without static groups) the input features are
  sorted by group once (``perm``), so that in kernel order groups are contiguous.
* ``scales``   ``[G, out]`` in ``spec.scale_dtype``.
* ``qzeros``   int32 ``[G, ceil(out·b/32)]`` (asymmetric only; ``pack_cols``), else absent.
* ``perm``     int64 ``[in]`` (only with a non-trivial ``g_idx``): kernel column ``k`` reads input
  feature ``perm[k]``. ``forward`` gathers the input once per call; scales are never gathered.
* ``g_idx``    int32 ``[in]`` (only with a non-trivial ``g_idx``): the group of each input feature.
* ``input_scale`` ``[in]`` (optional): the layer computes ``W_q (x / input_scale)`` — AWQ's explicit
  input scaling for groups whose scales could not be folded into a preceding op.

``act_spec`` (optional :class:`~lightning_quant.spec.ActivationSpec`): inputs are quantized per
token at runtime (W4A8 / W8A8), exactly as QAT's activation fake quant does.

Forward goes through :func:`lightning_quant.kernels.wq_matmul.wq_linear`: on CPU it is the exact
reference (dequantize, then ``F.linear`` in ``x.dtype``); on CUDA the Triton kernels for 2/4/8-bit
codes (a one-launch GEMV for ``<= 8`` rows, tensor-core split-K up to 16, the tiled GEMM above), the
reference for 3-bit.
``force_reference=True`` (per layer, or per call ``layer(x, force_reference=True)``) or
``LIGHTNING_QUANT_FORCE_REFERENCE=1`` forces the reference.

Act-order weights must have *equal-size groups* once sorted (what GPTQ's ``desc_act`` produces:
``g_idx[perm[i]] = i // group_size``), so that kernel column ``k`` is in group ``k // group_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant import packing
from lightning_quant.kernels.wq_matmul import wq_linear
from lightning_quant.layers.registry import check_layer_config, dtype_from_name, dtype_name, register_layer
from lightning_quant.primitives import fake_quantize_activation
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec

__all__ = ["PackedLinear"]


@register_layer("packed")
class PackedLinear(nn.Module):
    """Linear layer with int2/3/4/8 packed weights, built with :meth:`from_quantized`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        act_spec: ActivationSpec | None = None,
        input_scale: bool = False,
        force_reference: bool | None = None,
    ) -> None:
        super().__init__()
        spec.check_in_features(in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.act_order = act_order
        n_groups = spec.num_groups(in_features)
        b = spec.bits
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(packing.packed_len(in_features, b), out_features, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=spec.torch_scale_dtype, **kw))
        if spec.symmetric:
            self.qzeros = None
        else:
            self.register_buffer("qzeros", torch.zeros(n_groups, packing.packed_len(out_features, b), dtype=torch.int32, **kw))
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, **kw))
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        else:
            self.perm = None
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        if input_scale:
            self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype, **kw))
        else:
            self.input_scale = None
        self.act_spec = act_spec
        self.compute_dtype = dtype
        self.force_reference = force_reference

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: Tensor | None = None,
        act_spec: ActivationSpec | None = None,
        input_scale: Tensor | None = None,
    ) -> PackedLinear:
        """Pack a :class:`QuantizedWeight` (and optional bias, activation spec, input scale) into a new layer."""
        act_order = not qw.has_trivial_groups
        layer = cls(qw.in_features, qw.out_features, qw.spec, bias=bias is not None, act_order=act_order,
                    dtype=qw.dtype, device=qw.codes.device, act_spec=act_spec, input_scale=input_scale is not None)
        if input_scale is not None:
            if tuple(input_scale.shape) != (qw.in_features,):
                raise ValueError(f"input_scale must have shape [in] = ({qw.in_features},), got {tuple(input_scale.shape)}.")
            layer.input_scale.copy_(input_scale.detach())
        codes, g_idx = qw.codes, qw.group_index()
        if act_order:
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], qw.group_index_default()):
                raise ValueError(
                    "PackedLinear needs act-order groups of equal size (g_idx[perm[i]] == i // group_size, as "
                    "GPTQ desc_act produces); this g_idx has groups of other sizes. Re-quantize with "
                    "contiguous groups or use QuantizedWeight.dequantize() in a float nn.Linear."
                )
            codes = codes[:, perm]
            layer.perm.copy_(perm)
            layer.g_idx.copy_(g_idx.to(torch.int32))
        layer.qweight.copy_(packing.pack_rows(codes.t(), qw.spec.bits))  # [in, out] -> [in·b/32, out]
        layer.scales.copy_(qw.scales.t().to(qw.spec.torch_scale_dtype))
        if qw.zeros is not None:
            layer.qzeros.copy_(packing.pack_cols(qw.zeros.t().to(torch.uint8), qw.spec.bits))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def layer_config(self) -> dict:
        """Plain-JSON shape and spec (no tensors): what :meth:`from_config` rebuilds an empty layer from.

        Keys: ``in_features``, ``out_features``, ``bias``, ``dtype`` (the compute dtype), ``spec``
        (:meth:`QuantSpec.to_dict`), ``act_order``, ``act_spec`` (:meth:`ActivationSpec.to_dict` or
        ``None``), ``input_scale`` — the keys of the Lightning checkpoint manifest.
        """
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": dtype_name(self.compute_dtype), "spec": self.spec.to_dict(), "act_order": self.perm is not None,
                "act_spec": None if self.act_spec is None else self.act_spec.to_dict(),
                "input_scale": self.input_scale is not None}

    @classmethod
    def from_config(cls, cfg: dict, device: torch.device | str | None = None) -> PackedLinear:
        """An empty layer (zero codes, unit scales) as :meth:`layer_config` describes; ``load_state_dict`` fills it."""
        c = check_layer_config("packed", cfg, required=("in_features", "out_features", "spec"),
                               defaults={"bias": False, "dtype": "float32", "act_order": False, "act_spec": None,
                                         "input_scale": False})
        act = c["act_spec"]
        return cls(c["in_features"], c["out_features"], QuantSpec.from_dict(c["spec"]), bias=c["bias"],
                   act_order=c["act_order"], dtype=dtype_from_name(c["dtype"]), device=device,
                   act_spec=None if act is None else ActivationSpec(**act), input_scale=c["input_scale"])

    def to_quantized(self) -> QuantizedWeight:
        """Unpack back into a :class:`QuantizedWeight` (exact inverse of :meth:`from_quantized`)."""
        codes = packing.unpack_rows(self.qweight, self.spec.bits, self.in_features).t()  # [out, in] kernel order
        g_idx = None
        if self.perm is not None:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.in_features, device=self.perm.device)
            codes = codes[:, inv]
            g_idx = self.g_idx.long()
        zeros = None
        if self.qzeros is not None:
            zeros = packing.unpack_cols(self.qzeros, self.spec.bits, self.out_features).t().float()
        return QuantizedWeight(codes=codes.contiguous(), scales=self.scales.t().float(), zeros=zeros,
                               spec=self.spec, g_idx=g_idx, dtype=self.compute_dtype)

    # ---- math -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight ``[out, in]`` in the original input order."""
        return self.to_quantized().dequantize(dtype or self.compute_dtype)

    def _prepare_input(self, x: Tensor) -> Tensor:
        """Explicit input scaling, then dynamic per-token activation quant (both optional)."""
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.act_spec is not None:
            x = fake_quantize_activation(x, self.act_spec)
        return x

    def forward(self, x: Tensor, force_reference: bool | None = None) -> Tensor:
        """``x [..., in] -> [..., out]``; see the module docstring for kernel selection."""
        x = self._prepare_input(x)
        force = self.force_reference if force_reference is None else force_reference
        return wq_linear(x, self.qweight, self.scales, self.qzeros, bits=self.spec.bits,
                         group_size=self.spec.group_size, perm=self.perm, bias=self.bias, force_reference=force)

    @property
    def weight(self) -> Tensor:
        """Dequantized float weight, for code that inspects ``module.weight`` (shape, dtype, device)."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}, "
                f"bias={self.bias is not None}, act_order={self.act_order}, act_spec={self.act_spec}, "
                f"input_scale={self.input_scale is not None}")
