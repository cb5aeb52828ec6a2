"""Quantization-aware training: fake-quant layers, injection / removal, conversion to packed layers.

Public functions: :func:`inject`, :func:`remove`, :func:`convert`, :func:`fake_quant_modules`,
:func:`set_enabled`, :func:`packed_replacements` (the one fake-quant -> packed conversion, shared with
``PackedValidation``) and :func:`deployable_layers`; the layer :class:`FakeQuantLinear`; options :class:`QATConfig`.
See ``docs/qat.md``.
"""

from lightning_quant.qat.config import QATConfig
from lightning_quant.qat.fake_quant import FakeQuantLinear
from lightning_quant.qat.surgery import (
    convert,
    deployable_layers,
    fake_quant_modules,
    inject,
    inject_config,
    packed_replacements,
    remove,
    set_enabled,
)
from lightning_quant.targets import DEFAULT_EXCLUDE

__all__ = ["DEFAULT_EXCLUDE", "FakeQuantLinear", "QATConfig", "convert", "deployable_layers", "fake_quant_modules",
           "inject", "inject_config", "packed_replacements", "remove", "set_enabled"]
