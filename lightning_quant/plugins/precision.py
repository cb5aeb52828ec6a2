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
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from lightning_quant import qat
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE

__all__ = ["QuantizationPrecision"]

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
    ``model.trainer.global_step`` (automatic optimization).
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
        trainer = getattr(model, "_trainer", None)
        if trainer is not None and self.config.start_step > 0:
            qat.set_enabled(model, trainer.global_step >= self.config.start_step)
        return self.inner.optimizer_step(optimizer, model, closure, **kwargs)

    # ---- plain delegation ---------------------------------------------------------------
    def connect(self, model, optimizers, lr_schedulers):
        return self.inner.connect(model, optimizers, lr_schedulers)

    def tensor_init_context(self) -> AbstractContextManager:
        return self.inner.tensor_init_context()

    def module_init_context(self) -> AbstractContextManager:
        return self.inner.module_init_context()

    def forward_context(self) -> AbstractContextManager:
        return self.inner.forward_context()

    def train_step_context(self) -> AbstractContextManager:
        return self.inner.train_step_context()

    def val_step_context(self) -> AbstractContextManager:
        return self.inner.val_step_context()

    def test_step_context(self) -> AbstractContextManager:
        return self.inner.test_step_context()

    def predict_step_context(self) -> AbstractContextManager:
        return self.inner.predict_step_context()

    def convert_input(self, data: Any) -> Any:
        return self.inner.convert_input(data)

    def convert_output(self, data: Any) -> Any:
        return self.inner.convert_output(data)

    def pre_backward(self, tensor, module):
        return self.inner.pre_backward(tensor, module)

    def backward(self, tensor, model, optimizer, *args: Any, **kwargs: Any) -> None:
        return self.inner.backward(tensor, model, optimizer, *args, **kwargs)

    def post_backward(self, tensor, module):
        return self.inner.post_backward(tensor, module)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        return self.inner.clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    def main_params(self, optimizer):
        return self.inner.main_params(optimizer)

    def unscale_gradients(self, optimizer) -> None:
        return self.inner.unscale_gradients(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def teardown(self) -> None:
        self.inner.teardown()
