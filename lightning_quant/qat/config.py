"""``QATConfig``: every QAT option, validated once; shared by the callback, the precision plugin and
:func:`lightning_quant.qat.inject`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_quant.adapters import LORA_MODES, check_lora_mode
from lightning_quant.observers import check_observer
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, check_patterns

__all__ = ["ACT_QUANT_WEIGHT_BITS", "LORA_MODES", "QATConfig"]

#: activation fake quant is defined for the W4A8 / W8A8 schemes only
ACT_QUANT_WEIGHT_BITS = (4, 8)


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training options.

    Args:
        spec: weight :class:`QuantSpec`.
        act_spec: optional :class:`ActivationSpec` (int8 per-token dynamic) for W4A8 / W8A8.
        include / exclude: module-name filters (see :mod:`lightning_quant.targets`); ``lm_head`` is
            excluded by default and embeddings are never linear-like.
        observer: a name registered in :data:`lightning_quant.observers.OBSERVERS`.
        lora: ``"merged"`` fake-quantizes ``W + scaling·B@A``; ``"separate"`` only the frozen base ``W``.
        start_step: first optimizer step (``trainer.global_step``) that runs fake quant.
    """

    spec: QuantSpec
    act_spec: ActivationSpec | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = DEFAULT_EXCLUDE
    observer: str = "minmax"
    lora: Literal["merged", "separate"] = "merged"
    start_step: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(self.spec).__name__}; e.g. QuantSpec(bits=4, group_size=128).")
        if self.act_spec is not None:
            if not isinstance(self.act_spec, ActivationSpec):
                raise TypeError(f"act_spec must be an ActivationSpec or None, got {type(self.act_spec).__name__}.")
            if self.spec.bits not in ACT_QUANT_WEIGHT_BITS:
                raise ValueError(
                    f"Activation quantization is supported for W4A8 / W8A8 only, but the weight spec has "
                    f"bits={self.spec.bits}; use bits in {ACT_QUANT_WEIGHT_BITS} or act_spec=None."
                )
        object.__setattr__(self, "include", check_patterns(self.include, "include") or None)
        object.__setattr__(self, "exclude", check_patterns(self.exclude, "exclude"))
        check_observer(self.observer)
        check_lora_mode(self.lora)
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"start_step must be an int >= 0 (0 = fake-quantize from the first step), got {self.start_step!r}.")
