"""Model-level quantization methods: drivers that feed the solvers of :mod:`lightning_quant.algorithms` from a
model (through the calibration engine) and swap in the layers of :mod:`lightning_quant.layers`.

Each method registers itself by name in :data:`METHODS` (``rtn``, ``gptq``, ``awq``, ``awq+gptq``, ``int8``)
and returns a :class:`MethodResult`; :func:`lightning_quant.quantize_model`, the callbacks and the CLI
look methods up here. Names resolve lazily (PEP 562): ``from lightning_quant.methods import MethodResult``.
"""

from __future__ import annotations

from lightning_quant._lazy import lazy_namespace

_EXPORTS: dict[str, str] = {
    "METHODS": "lightning_quant.methods.registry",
    "Method": "lightning_quant.methods.registry",
    "MethodResult": "lightning_quant.methods.registry",
    "get_method": "lightning_quant.methods.registry",
    "register_method": "lightning_quant.methods.registry",
    "register_rotation_layout": "lightning_quant.methods.rotation_layouts",
    "ROTATION_LAYOUTS": "lightning_quant.methods.rotation_layouts",
    "Rotation": "lightning_quant.methods.rotation",
    "RotationReport": "lightning_quant.methods.rotation",
    "rotate_model": "lightning_quant.methods.rotation",
    "swap_in_packed": "lightning_quant.methods.registry",
}

__all__, __getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
