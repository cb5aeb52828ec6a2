"""``FakeQuantLinear``: a linear layer that trains through simulated quantization.

``y = Q_a(x) @ Q_w(W)ᵀ + b`` where ``Q_w`` is :func:`~lightning_quant.primitives.fake_quantize` with the
qparams of an :mod:`observer <lightning_quant.observers>` and ``Q_a`` is the optional dynamic per-token
:func:`~lightning_quant.primitives.fake_quantize_activation` (Jacob et al. 2018; Esser et al. 2020 for the
straight-through gradients). No other rounding code exists here, so :meth:`FakeQuantLinear.quantized_weight`
followed by ``PackedLinear.from_quantized`` reproduces the fake-quant forward.

The module *adopts* the original layer's ``weight`` / ``bias`` parameters (same ``Parameter`` objects,
same ``state_dict`` keys), adds ``observer.*`` and the boolean buffer ``enabled`` (False = plain float
forward, e.g. during a float warm-up), and :meth:`to_linear` rebuilds the original module type
(``nn.Linear`` or GPT-2 ``Conv1D``, whose weight is stored ``[in, out]``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant import primitives as P
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.observers import build_observer
from lightning_quant.qat import lora as L
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import linear_kind

__all__ = ["FakeQuantLinear"]


class FakeQuantLinear(nn.Module):
    """Fake-quantized replacement of a linear-like module; build it with :meth:`from_linear`.

    Attributes:
        weight: the original parameter (``[out, in]``, or ``[in, out]`` for ``Conv1D``).
        bias: the original bias ``[out]`` or ``None``.
        spec / act_spec: weight and (optional) activation quantization specs.
        observer: the :class:`~lightning_quant.observers.Observer` giving the weight qparams.
        enabled: bool buffer; fake quant runs only when True.
        lora_mode: ``None`` (no adapter), ``"merged"`` or ``"separate"`` (see :mod:`lightning_quant.qat.lora`).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, spec: QuantSpec, kind: str,
                 act_spec: ActivationSpec | None = None, observer: str = "minmax",
                 lora_host: nn.Module | None = None, lora: str = "merged", transposed: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.spec = spec
        self.act_spec = act_spec
        self.kind = kind
        self.transposed = transposed  # weight stored [in, out] (GPT-2 Conv1D)
        self.lora_mode: str | None = None if lora_host is None else lora
        self.__dict__["_lora_host"] = lora_host  # plain attribute: not a submodule (no state_dict cycle)
        with torch.no_grad():
            self.observer = build_observer(observer, spec, self.effective_weight().detach())
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool, device=weight.device))

    # ---- surgery ----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, module: nn.Module, spec: QuantSpec, act_spec: ActivationSpec | None = None,
                    observer: str = "minmax", lora_host: nn.Module | None = None,
                    lora: str = "merged") -> FakeQuantLinear:
        """Wrap ``module`` (``nn.Linear`` or ``Conv1D``); ``lora_host`` is the peft layer around it, if any."""
        kind = linear_kind(module)
        if kind is None:
            raise TypeError(f"FakeQuantLinear.from_linear takes nn.Linear or transformers Conv1D (or a type added "
                            f"with targets.register_linear_kind), got {type(module).__name__}.")
        if act_spec is not None and not kind.plain_input:
            raise TypeError(f"act_spec needs a layer whose input is a plain activation [..., in]; linear kind "
                            f"{kind.name!r} is registered with plain_input=False. Exclude it or set act_spec=None.")
        w_oi = kind.weight(module)  # the registry says how to read [out, in]
        transposed = w_oi is not module.weight
        if transposed and not (w_oi.shape == module.weight.t().shape and torch.equal(w_oi, module.weight.t())):
            raise TypeError(f"Linear kind {kind.name!r} reads its weight neither as stored nor transposed; "
                            "FakeQuantLinear supports only those two layouts.")
        fq = cls(module.weight, module.bias, spec, kind.name, act_spec, observer, lora_host, lora, transposed)
        fq.__dict__["_orig_kind"] = kind  # plain attribute: how to rebuild the original module
        fq.train(module.training)
        return fq

    def to_linear(self) -> nn.Module:
        """A module of the original kind holding this module's ``weight`` / ``bias`` parameters (built by the
        linear kind's ``build``, :class:`~lightning_quant.targets.LinearKind`)."""
        kind = self.__dict__.get("_orig_kind")
        if kind is None or kind.build is None:
            raise TypeError(f"FakeQuantLinear of kind {self.kind!r} cannot be turned back into its original module: "
                            "register its linear kind with build=(weight, bias) -> module "
                            "(lightning_quant.targets.LinearKind.build).")
        return kind.build(self.weight, self.bias).train(self.training)

    # ---- math -------------------------------------------------------------------------
    def _weight_oi(self) -> Tensor:
        return self.weight.t() if self.transposed else self.weight  # [out, in]

    def effective_weight(self) -> Tensor:
        """The weight the fake quant sees ``[out, in]``: ``W + Σ scaling·B@A`` in merged LoRA mode, else ``W``."""
        host = self._lora_host if self.lora_mode == "merged" else None
        return L.merged_weight(self._weight_oi(), host)

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.enabled):
            return nn.functional.linear(x, self._weight_oi().to(x.dtype), self._bias(x))
        w = self.effective_weight()
        if self.training:
            self.observer.observe(w)
        scale, zero = self.observer.qparams(w)
        w_q = P.fake_quantize(w, scale, zero, self.spec)
        x_q = x if self.act_spec is None else P.fake_quantize_activation(x, self.act_spec)
        y = nn.functional.linear(x_q, w_q.to(x.dtype), self._bias(x))
        if self.lora_mode == "merged":
            adapters = L.adapter_output(self._lora_host, x)  # the host adds this back
            if adapters is not None:
                y = y - adapters.to(y.dtype)
        return y

    def _bias(self, x: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    @torch.no_grad()
    def to_packed(self) -> tuple[PackedLinear, QuantizedWeight]:
        """The :class:`PackedLinear` this layer deploys as (its :meth:`quantized_weight`, bias and
        ``act_spec``), computing in the weight's dtype, and that weight."""
        qw = self.quantized_weight()
        bias = None if self.bias is None else self.bias.detach()
        return PackedLinear.from_quantized(qw, bias, act_spec=self.act_spec), qw

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """Codes and qparams the forward currently simulates (of the LoRA-merged weight in merged mode)."""
        w = self.effective_weight()
        scale, zero = self.observer.qparams(w)
        return QuantizedWeight.from_float(w.detach(), self.spec, scale.detach(),
                                          None if zero is None else zero.detach())

    def extra_repr(self) -> str:
        out_f, in_f = self._weight_oi().shape
        return (f"in_features={in_f}, out_features={out_f}, spec={self.spec}, act_spec={self.act_spec}, "
                f"kind={self.kind}, lora={self.lora_mode}")
