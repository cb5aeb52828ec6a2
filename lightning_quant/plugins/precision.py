"""``QuantizationPrecision``: QAT as a Lightning precision plugin wrapping an inner precision.

Lightning calls ``convert_module`` in ``Strategy.setup`` *before* wrapping the model in DDP/FSDP, so
``Trainer(plugins=[QuantizationPrecision(spec)], strategy="ddp")`` composes. The injection is the same
:func:`lightning_quant.qat.inject_config` the callback uses; everything else is delegated to the inner
precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``, ``"16-true"``, ``"64-true"``
or a ``Precision`` instance).

Resume caveat: Lightning restores ``ckpt_path`` weights *before* ``convert_module`` for single-device and
DDP strategies, so a mid-QAT checkpoint (with observer keys) cannot be loaded into the still-float model.
Resume with the :class:`~lightning_quant.callbacks.QuantizationAwareTraining` callback, which injects in
``setup`` (before restoring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

from lightning_quant import qat
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE

__all__ = ["DELEGATED", "QuantizationPrecision"]

_INNER = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def _build_inner(inner: str | Precision, device: str | None) -> Precision:
    if isinstance(inner, Precision):
        if isinstance(inner, QuantizationPrecision):
            raise TypeError("inner must not itself be a QuantizationPrecision; pass the precision it should wrap.")
        return inner
    if inner not in _INNER:
        raise ValueError(f"inner={inner!r} is not supported; use one of {_INNER} or a lightning Precision instance.")
    if inner == "32-true":
        return Precision()
    if inner == "64-true":
        return DoublePrecision()
    if inner.endswith("-true"):
        return HalfPrecision(inner)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported for mixed precision; use 'cpu' or 'cuda'.")
    return MixedPrecision(inner, device)


class QuantizationPrecision(Precision):
    """Inject fake quant in ``convert_module``; delegate precision handling to ``inner``.

    Args are those of :class:`~lightning_quant.callbacks.QuantizationAwareTraining` (without conversion), plus
    ``inner`` (the wrapped precision) and ``device`` (autocast device of a mixed inner precision; default:
    ``"cuda"`` when available, else ``"cpu"``). ``start_step`` is applied in :meth:`optimizer_step` from
    ``model.trainer.global_step`` (automatic optimization). Every other :class:`Precision` method (:data:`DELEGATED`)
    is the inner precision's.
    """

    def __init__(self, spec: QuantSpec, act_spec: ActivationSpec | None = None,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                 observer: str = "minmax", lora: str = "merged", start_step: int = 0,
                 inner: str | Precision = "32-true", device: str | None = None) -> None:
        self.config = qat.QATConfig(spec, act_spec, include, exclude, observer, lora, start_step)
        self.inner = _build_inner(inner, device)
        self.precision = self.inner.precision

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if not qat.fake_quant_modules(module):
            qat.inject_config(module, self.config)
        return self.inner.convert_module(module)

    def optimizer_step(self, optimizer, model, closure, **kwargs: Any) -> Any:
        step = _global_step(model)
        if step is not None and self.config.start_step > 0:
            qat.set_enabled(model, step >= self.config.start_step)
        return self.inner.optimizer_step(optimizer, model, closure, **kwargs)


def _global_step(model) -> int | None:
    """The attached Trainer's ``global_step`` (``None`` for a module no Trainer drives, e.g. under Fabric)."""
    try:
        return model.trainer.global_step
    except (AttributeError, RuntimeError):  # LightningModule.trainer raises when no Trainer is attached
        return None


#: The :class:`Precision` methods handed to the inner precision unchanged (every public method the plugin does
#: not define itself; ``tests/plugins`` checks none is left out).
DELEGATED = ("connect", "tensor_init_context", "module_init_context", "forward_context", "train_step_context",
             "val_step_context", "test_step_context", "predict_step_context", "convert_input", "convert_output",
             "pre_backward", "backward", "post_backward", "clip_gradients", "clip_grad_by_norm", "clip_grad_by_value",
             "main_params", "unscale_gradients", "state_dict", "load_state_dict", "on_save_checkpoint",
             "on_load_checkpoint", "teardown")


def _delegate(name: str):
    def method(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``self.inner.{name}(...)``."
    return method


for _name in DELEGATED:
    setattr(QuantizationPrecision, _name, _delegate(_name))
