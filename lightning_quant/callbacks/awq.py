"""``AWQ``: activation-aware weight quantization at the end of ``fit`` (a thin :class:`PostTrainingQuantization`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_quant.algorithms.awq import AWQConfig
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.methods.rotation import Rotation
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE

__all__ = ["AWQ"]


class AWQ(PostTrainingQuantization):
    """Run AWQ (:mod:`lightning_quant.algorithms.awq`) on the trained model and swap in packed layers.

    Same calibration data and DDP behaviour as :class:`~lightning_quant.callbacks.gptq.GPTQ`: each
    rank calibrates on its share of ``num_samples`` batches and the per-group input statistics are
    all-reduced, so every rank finds the same scales. Example::

        trainer = Trainer(callbacks=[AWQ(QuantSpec(bits=4, group_size=128), num_samples=128)])
        trainer.fit(model, datamodule=dm)   # PackedLinear layers afterwards; scales folded into norms

    Logged per layer: ``awq/<layer>/awq_ratio``, ``awq_error``, ``awq_rtn_error``. After quantizing,
    :attr:`summary` says which groups were folded (and into what), which were left unscaled (nothing to
    fold into) and which got explicit input scales (``AWQConfig(unfoldable="explicit")``).
    """

    def __init__(self, spec: QuantSpec | None = None, config: AWQConfig | None = None,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                 num_samples: int = 128, dataloader: Iterable | None = None, when: str = "fit_end",
                 export_on_fit_end: dict | None = None, *, model: str | None = None, lora: str = "merged",
                 rotation: Rotation | None = None) -> None:
        super().__init__(spec if spec is not None else QuantSpec(), "awq", config if config is not None else AWQConfig(),
                         include=include, exclude=exclude, num_samples=num_samples, dataloader=dataloader, when=when,
                         export_on_fit_end=export_on_fit_end, model=model, lora=lora, rotation=rotation)
        self.summary: dict[str, dict[str, str]] = {}

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, QuantizedWeight]:
        from lightning_quant.methods.awq import awq_summary

        weights = super().quantize(trainer, pl_module)
        self.summary = awq_summary(weights)
        rank_zero_info(f"AWQ: {len(self.summary['folded'])} group(s) folded, {len(self.summary['unscaled'])} "
                       f"unscaled, {len(self.summary['explicit'])} with explicit input scales")
        for kind in ("unscaled", "explicit"):
            for group, reason in self.summary[kind].items():
                rank_zero_info(f"AWQ {kind} [{group}]: {reason}")
        return weights
