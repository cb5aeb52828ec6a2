"""The ``"int8"`` method (LLM.int8, Dettmers et al. 2022): row-wise int8 weights, no calibration data,
:class:`~lightning_quant.layers.int8.Int8OutlierLinear` layers with the outlier decomposition.

Registered with its own ``swap`` so :func:`lightning_quant.quantize_model` installs
``Int8OutlierLinear`` (not ``PackedLinear``), and with ``fixed_spec=INT8_METHOD_SPEC`` so no spec is
needed::

    quantize_model(model, method="int8", config=LLMInt8Config(threshold=6.0))
    # or simply
    convert_to_int8(model, threshold=6.0)

The weights are always 8-bit, per output row, symmetric, with float32 scales (``INT8_METHOD_SPEC``);
a spec that differs in any field raises a ``ValueError`` naming the field instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from torch import nn

from lightning_quant.algorithms.llm_int8 import (
    DEFAULT_THRESHOLD,
    INT8_ROWWISE,
    check_threshold,
    int8_rowwise_quantize,
)
from lightning_quant.algorithms.registry import register_method
from lightning_quant.calibration.distributed import fsdp_units, full_tensor, layer_gathered
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, get_layer, linear_kind, linear_weight, replace_layer

__all__ = ["INT8_METHOD_SPEC", "LLMInt8Config", "check_int8_spec", "convert_to_int8", "swap_in_int8"]

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


def _int8_method(model: nn.Module, targets: dict[str, nn.Module], spec: QuantSpec, calibration,
                 config: LLMInt8Config | None) -> dict[str, QuantizedWeight]:
    if calibration is not None:
        raise ValueError("method='int8' uses no calibration data; pass calibration=None "
                         "(outlier statistics: lightning_quant.algorithms.llm_int8.outlier_statistics).")
    check_int8_spec(spec)
    config = config or LLMInt8Config()
    weights, units = {}, fsdp_units(model)
    for name, module in targets.items():
        with layer_gathered(model, name, units):  # FSDP: one layer's unit gathered at a time
            qw = int8_rowwise_quantize(full_tensor(linear_weight(module).detach()), name)
        qw.extras["threshold"] = config.threshold
        weights[name] = qw
    return weights


def check_int8_spec(spec: QuantSpec) -> None:
    """Raise ``ValueError`` naming every field of ``spec`` that differs from ``INT8_METHOD_SPEC`` (none is ignored)."""
    wrong = [f.name for f in fields(QuantSpec) if getattr(spec, f.name) != getattr(INT8_METHOD_SPEC, f.name)]
    if wrong:
        reasons = "; ".join(f"QuantSpec.{n}={getattr(spec, n)!r} cannot be honoured: {_FIXED_BECAUSE[n]}"
                            for n in wrong)
        raise ValueError(f"method='int8' got {spec!r}: {reasons}. Pass spec=INT8_METHOD_SPEC "
                         "(lightning_quant.algorithms.llm_int8_method) or omit the spec: "
                         "quantize_model(model, method='int8').")


def swap_in_int8(model: nn.Module, weights: dict[str, QuantizedWeight]) -> dict[str, nn.Module]:
    """Replace each named linear by an ``Int8OutlierLinear`` (threshold from ``qw.extras``); returns the old modules."""
    from lightning_quant.layers.int8 import Int8OutlierLinear

    replaced = {}
    for name, qw in weights.items():
        old = get_layer(model, name)
        kind = linear_kind(old)
        bias = kind.bias(old) if kind is not None else getattr(old, "bias", None)
        bias = None if bias is None else full_tensor(bias.detach())
        new = Int8OutlierLinear.from_quantized(qw, bias, threshold=qw.extras.get("threshold", DEFAULT_THRESHOLD))
        replaced[name] = replace_layer(model, name, new)
    return replaced


def convert_to_int8(model: nn.Module, threshold: float = DEFAULT_THRESHOLD, *, include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = DEFAULT_EXCLUDE) -> dict[str, QuantizedWeight]:
    """Swap the selected linear layers of ``model`` for ``Int8OutlierLinear`` in place."""
    from lightning_quant.api import quantize_model

    return quantize_model(model, INT8_METHOD_SPEC, "int8", include=include, exclude=exclude,
                          config=LLMInt8Config(threshold))


register_method("int8", _int8_method, needs_calibration=False, config_type=LLMInt8Config, swap=swap_in_int8,
                fixed_spec=INT8_METHOD_SPEC, check_spec=check_int8_spec)
