"""The ``"int8"`` method (LLM.int8, Dettmers et al. 2022): row-wise int8 weights, no calibration data,
:class:`~lightning_quant.layers.int8.Int8OutlierLinear` layers with the outlier decomposition.

Registered with its own ``swap`` so :func:`lightning_quant.quantize_model` installs
``Int8OutlierLinear`` (not ``PackedLinear``), and with ``fixed_spec=INT8_METHOD_SPEC`` so no spec is
needed::

    quantize_model(model, method="int8", config=LLMInt8Config(threshold=6.0))
    # or simply
    lightning_quant.api.convert_to_int8(model, threshold=6.0)

The weights are always 8-bit, per output row, symmetric, with float32 scales (``INT8_METHOD_SPEC``);
a spec that differs in any field raises a ``ValueError`` naming the field instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from lightning_quant import primitives as P
from lightning_quant.algorithms.llm_int8 import (
    DEFAULT_THRESHOLD,
    INT8_ROWWISE,
    check_threshold,
    int8_rowwise,
    outlier_columns,
    rowwise_to_quantized,
)
from lightning_quant.calibration.distributed import fsdp_units, full_tensor, layer_gathered
from lightning_quant.layers.int8 import Int8OutlierLinear
from lightning_quant.methods.registry import MethodResult, layer_bias, register_method
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import get_layer, linear_weight, replace_layer

__all__ = ["DEFAULT_THRESHOLD", "INT8_METHOD_SPEC", "Int8Layer", "LLMInt8Config", "check_int8_spec",
           "outlier_statistics", "swap_in_int8"]

#: The only spec ``quantize_model(..., method="int8")`` honours, and the one it takes when ``spec=None``:
#: LLM.int8 weights are always row-wise absmax 8-bit with the exact float32 row absmax (``SCB``) as scale,
#: i.e. ``QuantSpec(bits=8, group_size=-1, symmetric=True, scale_dtype="float32")``.
INT8_METHOD_SPEC = INT8_ROWWISE

#: Why each :class:`QuantSpec` field is fixed for LLM.int8 (the text of the error for a differing value).
_FIXED_BECAUSE = {
    "bits": "LLM.int8 stores 8-bit codes",
    "group_size": "LLM.int8 has one scale per output row (group_size=-1)",
    "symmetric": "LLM.int8 uses absmax codes with no zero point (symmetric=True)",
    "scale_dtype": "LLM.int8 keeps the exact float32 row absmax (SCB) as the scale (scale_dtype='float32')",
}


@dataclass(frozen=True)
class LLMInt8Config:
    """Args:
        threshold: activation magnitude above which an input column takes the float path
            (6.0 as in the paper; 0 disables the outlier path: pure W8A8).
    """

    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold))


@dataclass(frozen=True, eq=False)
class Int8Layer:
    """The ``"int8"`` method's layer data: the exact row absmax ``scb`` (float32 ``[out]``, bitsandbytes' ``SCB``;
    the weight's scales are ``scb / 127`` rounded) and the outlier ``threshold`` of the layer to build."""

    scb: Tensor
    threshold: float


def _int8_method(model: nn.Module, targets: dict[str, nn.Module], spec: QuantSpec, calibration,
                 config: LLMInt8Config | None) -> MethodResult[Int8Layer]:
    if calibration is not None:
        raise ValueError("method='int8' uses no calibration data; pass calibration=None "
                         "(outlier statistics: lightning_quant.methods.llm_int8.outlier_statistics).")
    check_int8_spec(spec)
    config = config or LLMInt8Config()
    weights, layers, units = {}, {}, fsdp_units(model)
    for name, module in targets.items():
        with layer_gathered(model, name, units):  # FSDP: one layer's unit gathered at a time
            w = full_tensor(linear_weight(module).detach())
            codes, scb = int8_rowwise(w, name)
        weights[name] = rowwise_to_quantized(codes, scb, w.dtype)
        layers[name] = Int8Layer(scb.float().clone(), config.threshold)
    return MethodResult(weights, layers)


def check_int8_spec(spec: QuantSpec) -> None:
    """Raise ``ValueError`` naming every field of ``spec`` that differs from ``INT8_METHOD_SPEC`` (none is ignored)."""
    wrong = [f.name for f in fields(QuantSpec) if getattr(spec, f.name) != getattr(INT8_METHOD_SPEC, f.name)]
    if wrong:
        reasons = "; ".join(f"QuantSpec.{n}={getattr(spec, n)!r} cannot be honoured: {_FIXED_BECAUSE[n]}"
                            for n in wrong)
        raise ValueError(f"method='int8' got {spec!r}: {reasons}. Pass spec=INT8_METHOD_SPEC "
                         "(lightning_quant.methods.llm_int8) or omit the spec: "
                         "quantize_model(model, method='int8').")


def swap_in_int8(model: nn.Module, result: MethodResult[Int8Layer]) -> dict[str, nn.Module]:
    """Replace each named linear by an ``Int8OutlierLinear`` (exact ``SCB`` and threshold from ``result.layers``);
    returns the old modules."""
    replaced = {}
    for name, qw in result.weights.items():
        data = result.layers.get(name)
        new = Int8OutlierLinear.from_quantized(qw, layer_bias(get_layer(model, name)),
                                               threshold=DEFAULT_THRESHOLD if data is None else data.threshold,
                                               scb=None if data is None else data.scb)
        replaced[name] = replace_layer(model, name, new)
    return replaced


@torch.no_grad()
def outlier_statistics(model: nn.Module, targets: dict[str, nn.Module], batches, threshold: float,
                       forward=None) -> dict[str, dict[str, float]]:
    """Outlier statistics of the inputs of ``targets`` over ``batches`` (float model, before conversion).

    For each layer: ``outlier_columns`` (mean number of input columns per batch that would take the
    float path), ``outlier_fraction`` (that number / in_features) and ``max_abs`` (largest |input|).
    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    threshold = check_threshold(threshold)
    stats = {n: {"outlier_columns": 0.0, "outlier_fraction": 0.0, "max_abs": 0.0} for n in targets}
    seen = {n: 0 for n in targets}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            P.check_finite(x, f"input of {name}")
            n_out = int(outlier_columns(x, threshold).sum())
            s = stats[name]
            s["outlier_columns"] += n_out
            s["outlier_fraction"] += n_out / x.shape[-1]
            s["max_abs"] = max(s["max_abs"], float(x.abs().max()) if x.numel() else 0.0)
            seen[name] += 1
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        n_batches = 0
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("outlier_statistics got no batches; pass at least one batch of token ids.")
    for n, s in stats.items():
        k = max(seen[n], 1)
        s["outlier_columns"] /= k
        s["outlier_fraction"] /= k
    return stats


register_method("int8", _int8_method, needs_calibration=False, config_type=LLMInt8Config, swap=swap_in_int8,
                fixed_spec=INT8_METHOD_SPEC, check_spec=check_int8_spec,
                refuses_rotation="LLM.int8() keeps the few outlier input features in float, and a rotation spreads "
                                 "each outlier over every feature, leaving none to keep; use rtn, gptq, awq or "
                                 "awq+gptq with a rotation, or int8 without one")
