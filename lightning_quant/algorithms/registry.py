"""Registry of model-level quantization methods (``"rtn"``, ``"gptq"``, ``"awq"``, ``"int8"``).

A method is a callable ``(model, targets, spec, calibration, config) -> {name: QuantizedWeight}``
where ``targets`` maps qualified names to the linear-like modules to quantize. It must not
change the model: swapping modules is done by :func:`lightning_quant.api.quantize_model`, which
calls the method's ``swap`` (default: :func:`lightning_quant.api.swap_in_packed`). A method whose
result is not a :class:`~lightning_quant.layers.packed.PackedLinear` (LLM.int8's
``Int8OutlierLinear``) or that needs more model surgery (AWQ's scale folding) registers its own
``swap(model, weights) -> {name: replaced module}``. A method that can only produce one spec (LLM.int8's
row-wise W8) registers it as ``fixed_spec``: ``quantize_model(model, method=...)`` then takes it when no
spec is given, and the method itself raises for a spec it cannot honour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_quant.algorithms.rtn import RTNConfig, rtn_quantize
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import linear_weight

MethodFn = Callable[[nn.Module, dict[str, nn.Module], QuantSpec, Any, Any], dict[str, QuantizedWeight]]
SwapFn = Callable[[nn.Module, dict[str, QuantizedWeight]], dict[str, nn.Module]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    needs_calibration: bool
    config_type: type | None = None
    #: replaces the converted modules in the model; ``None`` means ``api.swap_in_packed``
    swap: SwapFn | None = None
    #: the only spec the method honours (taken by ``quantize_model`` when ``spec=None``); ``None``: any spec
    fixed_spec: QuantSpec | None = None
    #: raises for a spec the method cannot honour; run before the model is touched
    check_spec: Callable[[QuantSpec], None] | None = None

    def __post_init__(self) -> None:
        if self.fixed_spec is not None and not isinstance(self.fixed_spec, QuantSpec):
            raise TypeError(f"Method {self.name!r}: fixed_spec must be a QuantSpec or None, "
                            f"got {type(self.fixed_spec).__name__}.")


METHODS: dict[str, Method] = {}


def register_method(name: str, fn: MethodFn, needs_calibration: bool, config_type: type | None = None,
                    swap: SwapFn | None = None, fixed_spec: QuantSpec | None = None,
                    check_spec: Callable[[QuantSpec], None] | None = None) -> None:
    METHODS[name] = Method(name, fn, needs_calibration, config_type, swap, fixed_spec, check_spec)


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"Unknown quantization method {name!r}; available: {sorted(METHODS)}.")
    return METHODS[name]


def _rtn_method(model, targets, spec, calibration, config):
    if calibration is not None:
        raise ValueError("method='rtn' uses no calibration data; pass calibration=None or use method='gptq'/'awq'.")
    search = None if config is None else config.qparam_search
    return {n: rtn_quantize(linear_weight(m).detach(), spec, name=n, search=search) for n, m in targets.items()}


register_method("rtn", _rtn_method, needs_calibration=False, config_type=RTNConfig)

#: Modules that register further methods when imported (kept lazy: no import-time cost).
_BUILTIN_MODULES = (
    "lightning_quant.algorithms.gptq_method",
    "lightning_quant.algorithms.awq_method",
    "lightning_quant.algorithms.awq_gptq_method",
    "lightning_quant.algorithms.llm_int8_method",
)


def _load_builtin_methods() -> None:
    import importlib
    import importlib.util

    for mod in _BUILTIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
