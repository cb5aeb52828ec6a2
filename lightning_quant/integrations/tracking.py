"""Send quantization figures to whatever loggers the Trainer has.

Every logger receives the scalar figures (``log_metrics``). A :class:`~lightning.pytorch.loggers.WandbLogger`
additionally receives tables (``wandb.Table``), images and artifacts; other loggers receive the
table as per-row scalars (``<key>/<row>/<column>``) and images where they can hold them
(TensorBoard). Nothing here imports wandb: a W&B logger is recognised by its class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["is_wandb", "log_artifact", "log_images", "log_scalars", "log_table"]


def _loggers(trainer) -> list:
    return list(getattr(trainer, "loggers", []) or [])


def is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def _is_tensorboard(logger) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def log_scalars(trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Scalars to every logger (rank zero only, as Lightning's loggers expect)."""
    if not getattr(trainer, "is_global_zero", True):
        return
    step = trainer.global_step if step is None else step
    for lg in _loggers(trainer):
        lg.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_table(trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], row_key: int = 0) -> None:
    """A table: a W&B Table for W&B, per-row scalars ``key/<row[row_key]>/<column>`` for others."""
    if not getattr(trainer, "is_global_zero", True):
        return
    for lg in _loggers(trainer):
        if is_wandb(lg):
            lg.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
            continue
        flat = {}
        for r in rows:
            for c, v in zip(columns, r):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    flat[f"{key}/{r[row_key]}/{c}"] = float(v)
        lg.log_metrics(flat, step=trainer.global_step)


def log_images(trainer, key: str, paths: Sequence[str | Path]) -> None:
    """PNG files to loggers that hold images (W&B, TensorBoard); others are told where the files are."""
    if not getattr(trainer, "is_global_zero", True):
        return
    for lg in _loggers(trainer):
        if is_wandb(lg):
            lg.log_image(key=key, images=[str(p) for p in paths], step=trainer.global_step)
        elif _is_tensorboard(lg):
            import matplotlib.image as mpimg

            for p in paths:
                lg.experiment.add_image(f"{key}/{Path(p).stem}", mpimg.imread(str(p)), trainer.global_step, dataformats="HWC")
        else:
            log.info("%s cannot store images; the plots are at %s", type(lg).__name__, ", ".join(map(str, paths)))


def log_artifact(trainer, path: str | Path, name: str, kind: str = "model") -> None:
    """A directory as a W&B artifact; other loggers record its path as a hyperparameter."""
    if not getattr(trainer, "is_global_zero", True):
        return
    path = Path(path)
    for lg in _loggers(trainer):
        if is_wandb(lg):
            import wandb

            art = wandb.Artifact(name=name, type=kind)
            if path.is_dir():
                art.add_dir(str(path))
            else:
                art.add_file(str(path))
            lg.experiment.log_artifact(art)
        else:
            lg.log_hyperparams({f"{kind}_artifact/{name}": str(path)})
