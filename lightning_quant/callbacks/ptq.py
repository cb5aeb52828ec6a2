"""``PostTrainingQuantization``: the generic Lightning adapter for calibrated PTQ (GPTQ, AWQ, int8).

The callback only hooks, loops and logs: it gathers calibration batches, takes this rank's share
under DDP, calls :func:`lightning_quant.quantize_model` (which swaps in packed layers) and reports
per-layer figures through the Trainer's loggers. Subclasses (``GPTQ``, ``AWQ``, ...) fix ``method``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_quant.adapters import check_lora_mode
from lightning_quant.api import check_rotation, quantize_model
from lightning_quant.calibration import distributed as dist
from lightning_quant.callbacks.qat import check_strategy
from lightning_quant.export.fit import ExportConfig, export_after_fit
from lightning_quant.methods.registry import MethodResult, get_method
from lightning_quant.methods.rotation import Rotation
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, check_patterns, select_targets

__all__ = ["SHARDED_METHODS", "WHEN", "PostTrainingQuantization"]

#: When the callback quantizes: at the end of ``fit``, at the end of training, or only when
#: :meth:`PostTrainingQuantization.quantize` is called.
WHEN = ("fit_end", "train_end", "manual")
#: Methods that calibrate a model sharded by FSDP2 (``ModelParallelStrategy``), one gathered block at a time.
SHARDED_METHODS = ("gptq", "int8", "awq")


class PostTrainingQuantization(Callback):
    """Quantize the LightningModule's linear layers with a calibrated method after training.

    Args:
        spec: weight :class:`QuantSpec`.
        method: a registered method name (``"gptq"``, ``"awq"``, ...; see ``methods.registry``).
        config: the method's config dataclass, or ``None`` for its defaults.
        include / exclude: module-name filters (``lm_head`` excluded by default).
        num_samples: calibration *batches* in total (over all DDP ranks), taken from ``dataloader``,
            else ``trainer.datamodule.train_dataloader()``, else the Trainer's train dataloader.
        dataloader: an explicit iterable of calibration batches (see :mod:`lightning_quant.calibration.data`).
        when: one of :data:`WHEN`.
        export_on_fit_end: ``{"format": ..., "path": ...}`` (or an :class:`~lightning_quant.export.ExportConfig`;
            a format's own options under ``"options"``, e.g. ``{"format": "onnx", "path": "out/edge",
            "options": {"accuracy_level": 4}}``): export the quantized model at the end of ``fit`` (rank 0,
            atomically) with :func:`lightning_quant.export.export_after_fit`.
        model: dotted attribute path (relative to the LightningModule) of the module to quantize, for
            unusual modules. By default the whole LightningModule is quantized, and calibration calls the
            transformers / peft model that runs the decoder blocks (e.g. ``self.model``), else the
            LightningModule's ``forward`` (see :func:`lightning_quant.calibration.forward_owner`), with the
            batches' ``input_ids`` / ``attention_mask`` (other keys such as ``labels`` are dropped).
        lora: what happens to peft LoRA adapters on the selected layers: ``"merged"`` (default) merges them
            into the float weight, then quantizes; ``"separate"`` quantizes the base and keeps the adapters
            in float on the packed base (see :data:`lightning_quant.adapters.LORA_MODES`).
        rotation: a :class:`~lightning_quant.methods.rotation.Rotation` (e.g. ``Rotation(kind="hadamard")``,
            QuaRot / SpinQuant R1): the residual stream is rotated offline before the method runs (float outputs
            unchanged; adapters on rotated layers are merged under ``lora="merged"``, refused under
            ``"separate"``). Not with ``int8``, and not under FSDP (the rotation rewrites every layer at once).
    """

    def __init__(self, spec: QuantSpec, method: str, config: Any = None, *, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = DEFAULT_EXCLUDE, num_samples: int = 128,
                 dataloader: Iterable | None = None, when: str = "fit_end",
                 export_on_fit_end: dict | ExportConfig | None = None, model: str | None = None,
                 lora: str = "merged", rotation: Rotation | None = None) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, e.g. QuantSpec(bits=4, group_size=128); got {type(spec).__name__}.")
        m = get_method(method)
        if config is not None and m.config_type is not None and not isinstance(config, m.config_type):
            raise TypeError(f"config for method={method!r} must be a {m.config_type.__name__}, got {type(config).__name__}.")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int (calibration batches), got {num_samples!r}.")
        if when not in WHEN:
            raise ValueError(f"when={when!r} is not supported; use one of {WHEN}.")
        if dataloader is not None and (isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable)):
            raise TypeError(f"dataloader must be an iterable of batches (e.g. a DataLoader), got {type(dataloader).__name__}.")
        include, exclude = check_patterns(include, "include") or None, check_patterns(exclude, "exclude")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError(f"model must be a dotted attribute path such as 'model' (or None), got {model!r}.")
        check_rotation(m, rotation)
        self.model_path, self.lora, self.rotation = model, check_lora_mode(lora), rotation
        self.spec, self.method, self.config = spec, method, config
        self.include, self.exclude = include, exclude
        self.num_samples, self.dataloader, self.when = num_samples, dataloader, when
        self.quantized_weights: MethodResult | dict[str, QuantizedWeight] = {}  # the last run's result
        self.restored: list[str] = []  #: layer names a checkpointed run had quantized (see load_state_dict)
        self.export_config = ExportConfig.coerce(export_on_fit_end)
        if self.export_config is not None and when == "manual":
            raise ValueError("export_on_fit_end needs when='fit_end' or 'train_end' (with 'manual' nothing is "
                             "quantized at fit end); call lightning_quant.export.save yourself after quantize().")

    # ---- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

        if self.rotation is not None and isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            raise TypeError(f"{type(self).__name__}(rotation=...) does not run under {type(trainer.strategy).__name__}: "
                            "the rotation rewrites the embeddings and every layer with one [n, n] matrix, which needs "
                            "the whole model on one device. Use strategy='ddp', or drop rotation= (or quantize the "
                            "saved model with quantize_model(..., rotation=...)).")
        if self.method in SHARDED_METHODS and isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            check_strategy(trainer, type(self).__name__, ("ModelParallelStrategy", "FSDPStrategy"))  # no TP
            return  # FSDP: calibrated block by block, one gathered block at a time
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise TypeError(
                f"{type(self).__name__} supports single-device and DDP strategies"
                f"{', ModelParallelStrategy (FSDP2) and FSDPStrategy' if self.method in SHARDED_METHODS else ''}, "
                f"not {type(trainer.strategy).__name__}; under FSDP only {list(SHARDED_METHODS)} calibrate sharded "
                "(docs/distributed.md). Use strategy='ddp', or save the model and quantize it with quantize_model()."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_end":
            self.quantize(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.quantize(trainer, pl_module)
        if self.export_config is not None:
            export_after_fit(trainer, pl_module, self.export_config)

    def state_dict(self) -> dict:
        return {"quantized": sorted(self.quantized_weights or self.restored)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Remember which layers a checkpointed run had quantized (:attr:`restored`): the checkpoint holds
        packed layers then, and quantizing them again is refused."""
        names = state_dict.get("quantized") if isinstance(state_dict, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{type(self).__name__}.load_state_dict expects {{'quantized': [layer names]}} (what "
                             f"state_dict() returns), got {state_dict!r}.")
        self.restored = list(names)

    def check_not_quantized(self) -> None:
        """Raise when this callback already quantized the model, in this run or in the checkpointed one."""
        if self.quantized_weights:
            raise RuntimeError(f"{type(self).__name__} already quantized this model; it runs once per callback.")
        if self.restored:
            raise RuntimeError(f"{type(self).__name__} was restored from a checkpoint taken after it quantized "
                               f"{len(self.restored)} layer(s) (e.g. {self.restored[0]!r}); the model is already "
                               "quantized. Resume from a checkpoint taken before quantization, or drop the callback.")

    # ---- the work -----------------------------------------------------------------------------
    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MethodResult:
        """Calibrate, quantize ``pl_module`` in place (packed layers swapped in) and log per-layer figures."""
        self.check_not_quantized()
        batches = self.calibration_batches(trainer)
        model = self.target_module(pl_module)
        with self.sharded_scope(trainer, model):
            self.quantized_weights = quantize_model(model, self.spec, self.method, include=self.include,
                                                    exclude=self.exclude, calibration=batches, config=self.config,
                                                    lora=self.lora, rotation=self.rotation)
        self.log_layers(trainer, self.quantized_weights)
        return self.quantized_weights

    def sharded_scope(self, trainer: pl.Trainer | None, model):
        """Where the work on ``model`` runs. Under ``FSDPStrategy`` (FSDP1): checks every selected layer lies
        in a nested unit (:func:`~lightning_quant.calibration.distributed.check_fsdp1_placement`) and keeps the
        root unit's own parameters (embeddings, final norm, head) gathered; elsewhere nothing to do."""
        if trainer is not None:
            names = select_targets(model, self.include, self.exclude)
            dist.check_fsdp1_placement(trainer, model, list(names), type(self).__name__)
        return dist.gathered_root(trainer)

    def target_module(self, pl_module: pl.LightningModule):
        """The module to quantize: ``pl_module`` itself, or the submodule named by ``model=``."""
        if self.model_path is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.model_path)
        except AttributeError:
            raise ValueError(f"model={self.model_path!r} is not a submodule of {type(pl_module).__name__}; name "
                             "the attribute that holds the model, e.g. model='model'.") from None

    def calibration_batches(self, trainer: pl.Trainer | None) -> list:
        """This rank's share of ``num_samples`` batches (round-robin over ranks)."""
        loader, presharded = self._source(trainer)
        world = dist.world_size()
        wanted = max(1, self.num_samples // world) if presharded else self.num_samples
        batches = list(itertools.islice(iter(loader), wanted))
        if len(batches) < wanted:
            raise ValueError(
                f"The calibration dataloader yielded only {len(batches)} batch(es), fewer than num_samples="
                f"{self.num_samples}{f' / {world} ranks' if presharded else ''}; lower num_samples or give more data."
            )
        return batches if presharded else dist.shard(batches)

    def _source(self, trainer: pl.Trainer | None) -> tuple[Iterable, bool]:
        if self.dataloader is not None:
            return self.dataloader, False
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and type(dm).train_dataloader is not pl.LightningDataModule.train_dataloader:
            return dm.train_dataloader(), False
        loader = getattr(trainer, "train_dataloader", None)
        if loader is not None:  # Lightning's own (already distributed) loader
            return getattr(loader, "flattened", [loader])[0], True
        raise ValueError(
            f"{type(self).__name__} found no calibration data: pass dataloader=..., or fit with a datamodule "
            "that defines train_dataloader() or with train_dataloaders=..."
        )

    def log_layers(self, trainer: pl.Trainer | None, result: MethodResult) -> None:
        """Send the method's per-layer float figures (e.g. ``gptq_loss``) to the loggers as ``<method>/<layer>/<figure>``."""
        metrics = result.log_figures(self.method)
        if not metrics or trainer is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
