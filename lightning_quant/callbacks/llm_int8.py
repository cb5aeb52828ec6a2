"""``LLMInt8``: swap in LLM.int8() layers at the end of ``fit`` (a thin :class:`PostTrainingQuantization`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import lightning.pytorch as pl

from lightning_quant.api import quantize_model
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.methods.llm_int8 import DEFAULT_THRESHOLD, INT8_METHOD_SPEC, LLMInt8Config, outlier_statistics
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.targets import DEFAULT_EXCLUDE, select_linears

__all__ = ["LLMInt8"]


class LLMInt8(PostTrainingQuantization):
    """Convert the trained model's linear layers to :class:`~lightning_quant.layers.int8.Int8OutlierLinear`.

    No calibration data is needed. With ``stats_batches > 0`` the callback first runs that many
    batches (from ``dataloader`` / the datamodule / the Trainer's loader, this rank's share under
    DDP) through the float model and logs, per layer, ``int8/<layer>/outlier_columns`` (input columns
    above ``threshold`` per batch), ``outlier_fraction`` and ``max_abs``; they stay in :attr:`outlier_stats`.

    Args:
        threshold: LLM.int8's outlier threshold (6.0; 0 = pure W8A8).
        include / exclude: module-name filters (``lm_head`` excluded by default).
        stats_batches: batches for the optional outlier statistics (0 = none).
        dataloader: explicit batches for the statistics.
        when: ``"fit_end"``, ``"train_end"`` or ``"manual"``.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = DEFAULT_EXCLUDE, stats_batches: int = 0,
                 dataloader: Iterable | None = None, when: str = "fit_end",
                 export_on_fit_end: dict | None = None, *, model: str | None = None, lora: str = "merged") -> None:
        if isinstance(stats_batches, bool) or not isinstance(stats_batches, int) or stats_batches < 0:
            raise ValueError(f"stats_batches must be an int >= 0 (0 disables outlier statistics), got {stats_batches!r}.")
        super().__init__(INT8_METHOD_SPEC, "int8", LLMInt8Config(threshold), include=include, exclude=exclude,
                         num_samples=max(stats_batches, 1), dataloader=dataloader, when=when,
                         export_on_fit_end=export_on_fit_end, model=model, lora=lora)
        self.stats_batches = stats_batches
        self.outlier_stats: dict[str, dict[str, float]] = {}

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, QuantizedWeight]:
        """Optionally gather outlier statistics, then convert ``pl_module`` in place."""
        self.check_not_quantized()
        model = self.target_module(pl_module)
        with self.sharded_scope(trainer, model):
            if self.stats_batches:
                self.outlier_stats = self.collect_statistics(trainer, pl_module)
                self._log(trainer, self.outlier_stats)
            self.quantized_weights = quantize_model(model, self.spec, "int8", include=self.include,
                                                    exclude=self.exclude, config=self.config, lora=self.lora)
        return self.quantized_weights

    def collect_statistics(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        from lightning_quant.calibration import call_model, forward_owner, to_batches

        batches = to_batches(self.calibration_batches(trainer))
        root = self.target_module(pl_module)
        device = next(root.parameters()).device
        targets = select_linears(root, self.include, self.exclude)
        caller = forward_owner(root)
        was_training = root.training
        root.eval()
        try:
            return outlier_statistics(root, targets, batches, self.config.threshold,
                                      forward=lambda m, b: call_model(caller, b.to(device)))
        finally:
            root.train(was_training)

    def _log(self, trainer: pl.Trainer | None, stats: dict[str, dict[str, float]]) -> None:
        if trainer is None:
            return
        metrics = {f"int8/{n}/{k}": v for n, s in stats.items() for k, v in s.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
