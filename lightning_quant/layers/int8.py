"""``Int8OutlierLinear``: the LLM.int8() layer (Dettmers et al., 2022), pure torch on CPU.

Buffers (bitsandbytes ``Linear8bitLt`` names, ``weight_format`` "row"; see ``shared/FORMATS.md``):

* ``weight`` int8 ``[out, in]``: row-wise absmax codes ``round(w * 127 / absmax_row)``;
* ``SCB``    float32 ``[out]``: the row absmax;
* ``bias``   ``[out]`` (optional, in the original dtype).

``threshold`` (a Python float, default 6.0) is mirrored in the float32 scalar buffer
``outlier_threshold``, so ``state_dict`` (and safetensors files, which hold tensors only) round-trip it. At runtime input columns with ``|x| > threshold`` in any token go through a float matmul with
their dequantized weight columns; the rest through int8 x int8 -> int32
(:func:`lightning_quant.kernels.int8_matmul.int8_matmul`, where the Triton kernel plugs in) with
per-token absmax activation scales. ``threshold = 0`` is pure W8A8.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.algorithms.llm_int8 import DEFAULT_THRESHOLD, INT8_ROWWISE, check_threshold, int8_rowwise
from lightning_quant.kernels.int8_matmul import int8_outlier_matmul
from lightning_quant.layers.registry import check_layer_config, dtype_from_name, dtype_name, register_layer
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.targets import linear_kind

__all__ = ["Int8OutlierLinear"]


@register_layer("int8")
class Int8OutlierLinear(nn.Module):
    """Linear layer with row-wise int8 weights and LLM.int8's outlier decomposition."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float = DEFAULT_THRESHOLD,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}.")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        self.register_buffer("outlier_threshold", torch.zeros((), dtype=torch.float32, device=device))
        self.threshold = threshold
        self.register_load_state_dict_post_hook(Int8OutlierLinear._sync_threshold)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        #: number of outlier columns in the last forward (for logging / tests)
        self.last_outliers: Tensor | None = None

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_linear(cls, module: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> Int8OutlierLinear:
        """Quantize an ``nn.Linear`` or GPT-2 ``Conv1D`` (any registered linear-like module)."""
        kind = linear_kind(module)
        if kind is None:
            raise TypeError(f"Int8OutlierLinear.from_linear takes a linear-like module (nn.Linear, Conv1D), "
                            f"got {type(module).__name__}; register others with targets.register_linear_kind.")
        w = kind.weight(module).detach()
        codes, scb = int8_rowwise(w, type(module).__name__)
        return cls._build(codes, scb, kind.bias(module), threshold, w.dtype)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None, threshold: float = DEFAULT_THRESHOLD,
                       scb: Tensor | None = None) -> Int8OutlierLinear:
        """Build from a row-wise int8 :class:`QuantizedWeight` (``algorithms.llm_int8.int8_rowwise_quantize``);
        ``scb`` (float32 ``[out]``) is the exact row absmax when known (the ``"int8"`` method's
        :class:`~lightning_quant.methods.llm_int8.Int8Layer`), else ``scales · 127``."""
        if qw.spec != INT8_ROWWISE or int(qw.codes.min()) < 1:
            raise ValueError(f"Int8OutlierLinear needs a row-wise absmax int8 weight (spec {INT8_ROWWISE}, codes in "
                             f"[1, 255]); got spec {qw.spec}. Quantize with algorithms.llm_int8.int8_rowwise_quantize.")
        codes = (qw.codes.to(torch.int16) - 128).to(torch.int8)
        scb = qw.scales[:, 0] * 127.0 if scb is None else scb
        return cls._build(codes, scb, bias, threshold, qw.dtype)

    @classmethod
    def _build(cls, codes: Tensor, scb: Tensor, bias: Tensor | None, threshold: float,
               dtype: torch.dtype) -> Int8OutlierLinear:
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, bias=bias is not None, threshold=threshold, dtype=dtype, device=codes.device)
        layer.weight.copy_(codes)
        layer.SCB.copy_(scb.float())
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def layer_config(self) -> dict:
        """Plain-JSON shape (no tensors): ``in_features``, ``out_features``, ``bias``, ``dtype``, ``threshold``."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": dtype_name(self.compute_dtype), "threshold": float(self.threshold)}

    @classmethod
    def from_config(cls, cfg: dict, device: torch.device | str | None = None) -> Int8OutlierLinear:
        """An empty layer as :meth:`layer_config` describes; ``load_state_dict`` fills ``weight`` / ``SCB``."""
        c = check_layer_config("int8", cfg, required=("in_features", "out_features"),
                               defaults={"bias": False, "dtype": "float32", "threshold": DEFAULT_THRESHOLD})
        return cls(c["in_features"], c["out_features"], bias=c["bias"], threshold=c["threshold"],
                   dtype=dtype_from_name(c["dtype"]), device=device)

    # ---- state ------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """Outlier threshold (a float, read without a device sync in ``forward``)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)
        self.outlier_threshold.fill_(self._threshold)

    @staticmethod
    def _sync_threshold(module: Int8OutlierLinear, incompatible_keys) -> None:
        module._threshold = check_threshold(float(module.outlier_threshold))

    # ---- math -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight ``codes * SCB / 127``, ``[out, in]``."""
        w = self.weight.float() * (self.SCB.float() / 127.0).unsqueeze(1)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8OutlierLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}.")
        flat = x.reshape(-1, self.in_features)  # [..., in] -> [M, in]
        y, outliers = int8_outlier_matmul(flat, self.weight, self.SCB, self.threshold, bias=self.bias, out_dtype=x.dtype)
        self.last_outliers = outliers
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")
