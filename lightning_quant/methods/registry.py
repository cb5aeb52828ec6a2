"""Registry of model-level quantization methods (``"rtn"``, ``"gptq"``, ``"awq"``, ``"awq+gptq"``, ``"int8"``).

A method is a callable ``(model, targets, spec, calibration, config) -> MethodResult`` where ``targets``
maps qualified names to the linear-like modules to quantize. It must not change the model (``"awq+gptq"``
folds AWQ's scales into the float model, outputs unchanged): swapping modules is done by
:func:`lightning_quant.quantize_model`, which hands the method's :class:`MethodResult` to its ``swap``
(default: :func:`swap_in_packed`). A :class:`MethodResult` holds a frozen
:class:`~lightning_quant.quantized.QuantizedWeight` per layer, the method's own layer-construction data
(``layers``: AWQ's scalings, LLM.int8's exact row absmax and threshold) that only its ``swap`` reads, and
``figures`` (per-layer floats such as ``gptq_loss``) that are only logged. A method whose result is not a
:class:`~lightning_quant.layers.packed.PackedLinear` (LLM.int8's ``Int8OutlierLinear``) or that needs
more model surgery (AWQ's scale folding) registers its own ``swap(model, result) -> {name: replaced
module}``. A method that can only produce one spec (LLM.int8's row-wise W8) registers it as
``fixed_spec``: ``quantize_model(model, method=...)`` then takes it when no spec is given, and the method
itself raises for a spec it cannot honour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

from lightning_quant.algorithms.rtn import RTNConfig, rtn_quantize
from lightning_quant.calibration.distributed import full_tensor
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import get_layer, linear_kind, linear_weight, replace_layer

__all__ = ["METHODS", "Method", "MethodResult", "get_method", "layer_bias", "register_method", "swap_in_packed"]

#: A method's per-layer construction data (``MethodResult.layers``): any frozen value its ``swap`` reads.
LayerData = TypeVar("LayerData")
#: A figure a method reports for a layer (logged only): a float, or a bool flag such as ``gptq_fallback``.
Figure = float | bool


@dataclass(frozen=True, eq=False)
class MethodResult(Mapping[str, QuantizedWeight], Generic[LayerData]):
    """What a quantization method returns: read as ``{layer name: QuantizedWeight}`` (a ``Mapping``).

    Attributes:
        weights: ``{name: QuantizedWeight}`` of every converted layer (frozen values).
        layers: ``{name: data}``, the method's own layer-construction data (e.g.
            :class:`~lightning_quant.methods.awq.AWQLayerScaling`, :class:`~lightning_quant.methods.llm_int8.Int8Layer`)
            that its ``swap`` receives; layers without data are absent.
        figures: ``{name: {figure: value}}``, per-layer floats (``gptq_loss``, ``awq_ratio``, ...) for logging only.
    """

    weights: Mapping[str, QuantizedWeight]
    layers: Mapping[str, LayerData] = field(default_factory=dict)
    figures: Mapping[str, Mapping[str, Figure]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what in ("layers", "figures"):
            extra = sorted(set(getattr(self, what)) - set(self.weights))
            if extra:
                raise ValueError(f"MethodResult.{what} names layer(s) {extra[:4]} that have no weight; a method "
                                 "reports data only for the layers it converted.")
        for name, figs in self.figures.items():
            bad = {k: v for k, v in figs.items() if not isinstance(v, (int, float))}
            if bad:
                raise TypeError(f"MethodResult.figures[{name!r}] must hold numbers (logged as metrics), got {bad}.")
        object.__setattr__(self, "weights", dict(self.weights))
        object.__setattr__(self, "layers", dict(self.layers))
        object.__setattr__(self, "figures", {n: dict(f) for n, f in self.figures.items()})

    def __getitem__(self, name: str) -> QuantizedWeight:
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def subset(self, names: Iterable[str]) -> MethodResult:
        """The result restricted to ``names`` (weights, layer data and figures together)."""
        keep = list(names)
        return MethodResult({n: self.weights[n] for n in keep}, {n: self.layers[n] for n in keep if n in self.layers},
                            {n: self.figures[n] for n in keep if n in self.figures})

    def float_figures(self) -> dict[str, dict[str, float]]:
        """``{layer: {figure: float}}``: the numeric figures as floats (bool flags such as ``gptq_fallback`` are not)."""
        return {n: {k: float(v) for k, v in figs.items() if not isinstance(v, bool)} for n, figs in self.figures.items()}

    def log_figures(self, prefix: str) -> dict[str, float]:
        """``{"<prefix>/<layer>/<figure>": value}`` of :meth:`float_figures`, for the loggers."""
        return {f"{prefix}/{n}/{k}": v for n, figs in self.float_figures().items() for k, v in figs.items()}


MethodFn = Callable[[nn.Module, dict[str, nn.Module], QuantSpec, Any, Any], MethodResult]
SwapFn = Callable[[nn.Module, MethodResult], dict[str, nn.Module]]


def layer_bias(module: nn.Module) -> Tensor | None:
    """The bias of a linear-like ``module`` (``None`` without one), detached and gathered (FSDP: full)."""
    kind = linear_kind(module)
    bias = kind.bias(module) if kind is not None else getattr(module, "bias", None)
    return None if bias is None else full_tensor(bias.detach())


def swap_in_packed(model: nn.Module, weights: Mapping[str, QuantizedWeight]) -> dict[str, nn.Module]:
    """Replace each named linear-like module by a :class:`PackedLinear` built from its weight (``weights``: a
    :class:`MethodResult` or any ``{name: QuantizedWeight}``; the default swap needs no layer data).

    Returns the modules that were replaced (so callers can swap them back).
    """
    return {name: replace_layer(model, name, PackedLinear.from_quantized(qw, layer_bias(get_layer(model, name))))
            for name, qw in weights.items()}


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    needs_calibration: bool
    config_type: type | None = None
    #: replaces the converted modules in the model; ``None`` means :func:`swap_in_packed`
    swap: SwapFn | None = None
    #: the only spec the method honours (taken by ``quantize_model`` when ``spec=None``); ``None``: any spec
    fixed_spec: QuantSpec | None = None
    #: raises for a spec the method cannot honour; run before the model is touched
    check_spec: Callable[[QuantSpec], None] | None = None
    #: why the method cannot run on a rotated model (``quantize_model(..., rotation=...)`` raises with it);
    #: ``None``: it can (see :mod:`lightning_quant.methods.rotation`)
    refuses_rotation: str | None = None

    def __post_init__(self) -> None:
        if self.fixed_spec is not None and not isinstance(self.fixed_spec, QuantSpec):
            raise TypeError(f"Method {self.name!r}: fixed_spec must be a QuantSpec or None, "
                            f"got {type(self.fixed_spec).__name__}.")


METHODS: dict[str, Method] = {}


def register_method(name: str, fn: MethodFn, needs_calibration: bool, config_type: type | None = None,
                    swap: SwapFn | None = None, fixed_spec: QuantSpec | None = None,
                    check_spec: Callable[[QuantSpec], None] | None = None,
                    refuses_rotation: str | None = None) -> None:
    METHODS[name] = Method(name, fn, needs_calibration, config_type, swap, fixed_spec, check_spec, refuses_rotation)


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in METHODS:
        raise ValueError(f"Unknown quantization method {name!r}; available: {sorted(METHODS)}.")
    return METHODS[name]


def _rtn_method(model, targets, spec, calibration, config):
    if calibration is not None:
        raise ValueError("method='rtn' uses no calibration data; pass calibration=None or use method='gptq'/'awq'.")
    search = None if config is None else config.qparam_search
    return MethodResult({n: rtn_quantize(linear_weight(m).detach(), spec, name=n, search=search)
                         for n, m in targets.items()})


register_method("rtn", _rtn_method, needs_calibration=False, config_type=RTNConfig)

#: Modules that register further methods when imported (kept lazy: no import-time cost).
_BUILTIN_MODULES = (
    "lightning_quant.methods.gptq",
    "lightning_quant.methods.awq",
    "lightning_quant.methods.awq_gptq",
    "lightning_quant.methods.llm_int8",
)


def _load_builtin_methods() -> None:
    import importlib
    import importlib.util

    for mod in _BUILTIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
