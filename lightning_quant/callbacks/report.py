"""``QuantizationReport``: after fit, compare the converted model with its float self.

Order of events (no reliance on callback order): a float snapshot is taken at ``on_train_end``
(fake-quant layers turned back into float ones with their ``to_linear()``); conversion callbacks
run at ``on_train_end`` / ``on_fit_end``; the report is built in ``teardown("fit")``, which
Lightning calls after every callback's ``on_fit_end``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_quant.calibration.blocks import forward_owner_path
from lightning_quant.calibration.data import to_batches
from lightning_quant.integrations import tracking
from lightning_quant.report import build_report, write_report
from lightning_quant.targets import set_submodule

__all__ = ["QuantizationReport", "float_snapshot", "unpadded_windows"]


def float_snapshot(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with every fake-quant layer (anything with ``to_linear()``) turned back to float."""
    snap = copy.deepcopy(module)
    for name, m in list(snap.named_modules()):
        if name and callable(getattr(m, "to_linear", None)):
            set_submodule(snap, name, m.to_linear())
    return snap.eval()


def unpadded_windows(batches: list) -> list[torch.Tensor]:
    """Token ids ``[B, L]`` of each batch with the padding cut off, all to one length ``L`` (the shortest
    real sequence), so perplexity and KL count real tokens only and batches of different padded lengths
    stack. Right padding keeps the first ``L`` tokens, left padding the last ``L``; a mask with holes
    raises (no silent guess)."""
    spans = []
    for i, b in enumerate(batches):
        ids, mask = b.input_ids, b.attention_mask
        if mask is None:
            spans.append((ids, "right", ids.shape[1]))
            continue
        mask = mask.bool()
        lengths = mask.sum(1)
        pos = torch.arange(ids.shape[1], device=mask.device)
        if torch.equal(mask, pos < lengths[:, None]):
            side = "right"
        elif torch.equal(mask, pos >= ids.shape[1] - lengths[:, None]):
            side = "left"
        else:
            raise ValueError(f"QuantizationReport: validation batch {i} has an attention_mask that is neither right- "
                             "nor left-padding (zeros inside a row); give the report a loader of padded batches.")
        spans.append((ids, side, int(lengths.min())))
    length = min(n for _, _, n in spans)
    if length < 2:
        raise ValueError(f"QuantizationReport: the shortest validation sequence has {length} token(s); perplexity "
                         "needs at least 2. Use longer validation rows or drop the empty ones.")
    return [ids[:, :length] if side == "right" else ids[:, -length:] for ids, side, _ in spans]


class QuantizationReport(Callback):
    """Write ``report.md`` + PNG plots after fit and log the figures and images to the loggers.

    Args:
        output_dir: where to write; default ``<trainer.default_root_dir>/quant_report``.
        num_batches: validation batches used to measure per-layer errors and perplexity (padding cut off:
            every row is measured on the shortest real length, see :func:`unpadded_windows`).
        worst_k: layers whose weight/scale histograms are plotted.
    """

    def __init__(self, output_dir: str | None = None, num_batches: int = 2, worst_k: int = 3) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}.")
        if not isinstance(worst_k, int) or worst_k < 1:
            raise ValueError(f"worst_k must be a positive int, got {worst_k!r}.")
        self.output_dir = output_dir
        self.num_batches = num_batches
        self.worst_k = worst_k
        self._float = None
        self.paths: dict[str, Path] = {}
        self.data = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the module that runs on token ids: the LightningModule, or its model attribute when it has no forward
        self._path = forward_owner_path(pl_module)
        self._float = float_snapshot(pl_module.get_submodule(self._path)).cpu()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._float is None or trainer.interrupted:
            return
        batches = self._batches(trainer)
        model = pl_module.get_submodule(self._path).eval()
        device = next(model.parameters()).device
        self.data = build_report(self._float.to(device), model, [b.to(device) for b in batches],
                                 self.worst_k).with_prefix(self._path)  # layer names as the LightningModule has them
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "quant_report")
        if trainer.is_global_zero:
            self.paths = write_report(self.data, out)
        self._log(trainer)
        self._float = None

    def _batches(self, trainer: Trainer) -> list[torch.Tensor]:
        loader = trainer.val_dataloaders
        if loader is None:
            dm = trainer.datamodule
            loader = dm.val_dataloader() if dm is not None and hasattr(dm, "val_dataloader") else None
        if loader is None:
            raise ValueError("QuantizationReport needs validation data: give the Trainer a val dataloader or datamodule.")
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        return unpadded_windows(to_batches(loader, max_batches=self.num_batches))

    def _log(self, trainer: Trainer) -> None:
        tracking.log_scalars(trainer, self.data.summary())
        cols = ["layer", "rows", "cols", "spec", "bits_per_weight", "relative_error", "sqnr_db"]
        rows = [[r.layer, r.shape[0], r.shape[1], r.spec, r.bits_per_weight, r.relative_error, r.sqnr_db] for r in self.data.rows]
        tracking.log_table(trainer, "quant/layers", cols, rows)
        if self.paths:
            tracking.log_images(trainer, "quant/report", [self.paths[k] for k in ("errors", "histograms", "bits")])
