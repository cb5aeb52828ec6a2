"""Normalising calibration input into :class:`CalibrationBatch` objects.

Accepted forms (anything else raises ``TypeError`` naming them):

* a ``LongTensor [N, T]`` of token ids — split into batches of ``batch_size`` rows;
* an iterable (list, DataLoader, generator) whose items are
  - a ``LongTensor [B, T]`` of token ids,
  - a mapping with ``"input_ids"`` ``[B, T]`` and optional ``"attention_mask"`` ``[B, T]``
    (0 marks padding; padded tokens are excluded from statistics by :class:`BlockContext`),
  - a Lightning-style tuple / list ``(x, y, ...)`` whose first element is one of the above.

Token ids must be an integer tensor; a 1-D tensor is read as a single sequence ``[1, T]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ACCEPTED_FORMS", "CalibrationBatch", "to_batches"]

ACCEPTED_FORMS = (
    "a LongTensor [N, T] of token ids, or an iterable of batches that are LongTensors [B, T], "
    "dicts with 'input_ids' (and optional 'attention_mask'), or (x, y) tuples whose x is one of those"
)


@dataclass
class CalibrationBatch:
    """One batch of calibration tokens: ``input_ids [B, T]`` and optional ``attention_mask [B, T]``."""

    input_ids: Tensor
    attention_mask: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.bool().sum())

    def to(self, device) -> CalibrationBatch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return CalibrationBatch(self.input_ids.to(device), mask)


def _ids(t: Tensor, where: str) -> Tensor:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{where}: token ids must be an integer tensor, got dtype {t.dtype}. Pass tokenized text.")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{where}: token ids must be [B, T] (or [T]), got shape {tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError(f"{where}: the batch is empty (shape {tuple(t.shape)}).")
    return t.long()


def _one(item, i: int) -> CalibrationBatch:
    where = f"calibration batch {i}"
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, Tensor):
        return CalibrationBatch(_ids(item, where))
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise TypeError(f"{where}: a dict batch needs an 'input_ids' key; got keys {sorted(item)}.")
        ids = _ids(item["input_ids"], where)
        mask = item.get("attention_mask")
        if mask is not None:
            mask = mask if mask.dim() == 2 else mask.unsqueeze(0)
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(f"{where}: attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}.")
        return CalibrationBatch(ids, mask)
    raise TypeError(f"{where} has type {type(item).__name__}; calibration data must be {ACCEPTED_FORMS}.")


def to_batches(calibration, batch_size: int = 8, max_batches: int | None = None) -> list[CalibrationBatch]:
    """Normalise ``calibration`` (see the module docstring) into a list of batches.

    Raises ``ValueError`` when it yields no batch and ``TypeError`` for unsupported items.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if calibration is None:
        raise ValueError(f"No calibration data given; pass {ACCEPTED_FORMS}.")
    if isinstance(calibration, Tensor):
        ids = _ids(calibration, "calibration tensor")
        items: Iterable = ids.split(batch_size)
    elif isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration has type {type(calibration).__name__}; pass {ACCEPTED_FORMS}.")
    else:
        items = calibration
    out: list[CalibrationBatch] = []
    for i, item in enumerate(items):
        if max_batches is not None and i >= max_batches:
            break
        out.append(_one(item, i))
    if not out:
        raise ValueError("The calibration data yielded no batch (empty dataloader or tensor); give at least one batch.")
    return out
