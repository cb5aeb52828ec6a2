"""``QuantizationAwareTraining``: the Lightning adapter for :mod:`lightning_quant.qat` (no math here)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_quant import qat
from lightning_quant.calibration.distributed import check_fsdp1_placement
from lightning_quant.export.fit import ExportConfig, export_after_fit
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec, QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE

__all__ = ["QAT_STRATEGIES", "QuantizationAwareTraining", "check_strategy"]

#: Strategies QAT runs under (class names in ``lightning.pytorch.strategies``): FSDP2 through
#: ``ModelParallelStrategy`` and FSDP1 through ``FSDPStrategy`` included (see docs/distributed.md).
QAT_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy", "FSDPStrategy")


def check_strategy(trainer: pl.Trainer, who: str, supported: tuple[str, ...]) -> None:
    """``TypeError`` naming the supported strategies when ``trainer.strategy`` is none of them (e.g. DeepSpeed)."""
    from lightning.pytorch import strategies

    kinds = tuple(getattr(strategies, n) for n in supported if hasattr(strategies, n))
    if getattr(trainer.strategy, "_tensor_parallel_size", 1) not in (1, "auto"):
        raise TypeError(f"{who} runs under ModelParallelStrategy with data parallelism (FSDP2) only; "
                        f"tensor_parallel_size={trainer.strategy._tensor_parallel_size} shards weights across "
                        "devices inside a layer. Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1).")
    if not isinstance(trainer.strategy, kinds):
        raise TypeError(f"{who} supports the strategies {list(supported)}, not {type(trainer.strategy).__name__}; "
                        "see docs/distributed.md (DeepSpeed ZeRO partitions parameters outside Lightning's FSDP, "
                        "which the one-unit-at-a-time gathering does not cover).")


class QuantizationAwareTraining(Callback):
    """Fake-quantize the model's linear layers during ``fit``; optionally convert to packed layers at the end.

    Injection happens in :meth:`setup` — before DDP/FSDP wrapping and before Lightning loads
    ``ckpt_path`` weights — so a mid-QAT checkpoint (observer state, LSQ scales, ``enabled`` flags)
    resumes through ordinary ``state_dict`` loading.

    Args:
        spec: weight :class:`QuantSpec`.
        act_spec: optional int8 per-token :class:`ActivationSpec` (W4A8 / W8A8).
        include / exclude: module-name filters; ``lm_head`` excluded by default.
        observer: ``"minmax"``, ``"moving_average"``, ``"mse"`` or ``"lsq"`` (see :mod:`lightning_quant.observers`).
        lora: ``"merged"`` (fake-quantize ``W + scaling·B@A``) or ``"separate"`` (base weight only).
        start_step: fake quant runs from this ``trainer.global_step`` on (float warm-up before).
        convert_on_fit_end: swap in :class:`~lightning_quant.layers.packed.PackedLinear` layers built from the
            QAT-learned qparams when ``fit`` ends; the :class:`QuantizedWeight` s land in :attr:`quantized_weights`.
        export_on_fit_end: ``{"format": ..., "path": ...}`` (or an :class:`~lightning_quant.export.ExportConfig`):
            after conversion, export the model (rank 0, atomically) with :func:`lightning_quant.export.export_after_fit`.
    """

    def __init__(self, spec: QuantSpec, act_spec: ActivationSpec | None = None,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                 observer: str = "minmax", lora: str = "merged", start_step: int = 0,
                 convert_on_fit_end: bool = True, export_on_fit_end: dict | ExportConfig | None = None) -> None:
        if not isinstance(convert_on_fit_end, bool):
            raise TypeError(f"convert_on_fit_end must be True or False, got {convert_on_fit_end!r}.")
        self.export_config = ExportConfig.coerce(export_on_fit_end)
        if self.export_config is not None and not convert_on_fit_end:
            raise ValueError("export_on_fit_end needs convert_on_fit_end=True (only packed layers are exported).")
        self.config = qat.QATConfig(spec, act_spec, include, exclude, observer, lora, start_step)
        self.convert_on_fit_end = convert_on_fit_end
        self.quantized_weights: dict[str, QuantizedWeight] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, QAT_STRATEGIES)
        if not qat.fake_quant_modules(pl_module):
            qat.inject_config(pl_module, self.config)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert_on_fit_end:  # FSDP1 has wrapped the model by now: conversion must be possible at the end
            check_fsdp1_placement(trainer, pl_module, list(qat.fake_quant_modules(pl_module)), type(self).__name__)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._observe_in_training(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._update_enabled(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert_on_fit_end:
            self._convert(pl_module)
        if self.export_config is not None:
            export_after_fit(trainer, pl_module, self.export_config)

    @staticmethod
    def _observe_in_training(pl_module: pl.LightningModule) -> None:
        """Fake-quant layers train (observers update) even when the host model was left in eval mode
        (transformers' ``from_pretrained`` returns eval models and Lightning keeps the modes it finds)."""
        for m in qat.fake_quant_modules(pl_module).values():
            m.train()

    def _update_enabled(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        qat.set_enabled(pl_module, trainer.global_step >= self.config.start_step)

    def _convert(self, pl_module: pl.LightningModule) -> None:
        qat.set_enabled(pl_module, True)
        self.quantized_weights = qat.convert(pl_module)
