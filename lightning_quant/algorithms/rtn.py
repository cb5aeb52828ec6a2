"""Round-to-nearest (RTN): min-max qparams per group (optionally grid-searched), then round. The baseline
every other method must beat, and the quantizer GPTQ falls back to when its Cholesky factorisation fails."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QParamSearch, QuantSpec

__all__ = ["RTNConfig", "rtn_quantize"]


@dataclass(frozen=True)
class RTNConfig:
    """RTN settings: ``qparam_search`` — ``None`` for min-max qparams, or a
    :class:`~lightning_quant.spec.QParamSearch` with the ``"weight"`` objective (RTN sees no data)."""

    qparam_search: QParamSearch | None = None

    def __post_init__(self) -> None:
        _check_search(self.qparam_search, "RTNConfig.qparam_search")


def _check_search(search: QParamSearch | None, what: str) -> None:
    if search is None:
        return
    if not isinstance(search, QParamSearch):
        raise TypeError(f"{what} must be a lightning_quant.spec.QParamSearch or None, got {type(search).__name__}.")
    if search.objective != "weight":
        raise ValueError(f"{what}: RTN has no calibration data, so QParamSearch(objective={search.objective!r}) "
                         "cannot be evaluated; use objective='weight', or method='gptq'/'awq' for the Hessian objective.")


def rtn_quantize(weight: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0, name: str = "weight",
                 search: QParamSearch | None = None) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with per-group min-max qparams, shrunk by ``clip`` (scalar or
    ``[out, G]``) or by the factors a ``search`` (:class:`~lightning_quant.spec.QParamSearch`, ``"weight"``
    objective) picks.

    Per element, ``|dequantize(q) − w| <= s/2`` for every ``w`` inside the (clipped) range.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: RTN takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}.")
    P.check_finite(weight, name)
    if search is not None:
        _check_search(search, f"rtn_quantize({name})")
        if not (isinstance(clip, float) and clip == 1.0):
            raise ValueError(f"rtn_quantize({name}): pass either clip= or search=, not both (the search picks the clip).")
        clip = P.search_clip(weight, spec, search)
    scales, zeros = P.compute_qparams(weight, spec, clip=clip)
    return QuantizedWeight.from_float(weight, spec, scales, zeros)
