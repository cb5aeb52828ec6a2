"""Capturing the inputs of block 0: hidden states plus the arguments the block is called with.

A forward pre-hook on block 0 records ``(hidden_states, other positional args, kwargs)`` for each
calibration batch and stops the forward there (nothing after the embeddings runs). KV caches are
switched off: cache objects in the recorded arguments become ``None`` and ``use_cache`` ``False``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_quant.calibration.data import CalibrationBatch

__all__ = ["ActivationLedger", "BlockInput", "call_model", "capture_block_inputs", "check_token_ids", "vocab_size"]

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockInput:
    """What one calibration batch feeds a block.

    Attributes:
        hidden: ``[B, T, H]`` hidden states (replaced by the block's output as blocks advance).
        args: further positional arguments of the block call (GPT-2 passes the mask positionally).
        kwargs: keyword arguments (attention mask, position embeddings / ids, ``use_cache=False``).
        token_mask: ``bool [B, T]``, ``False`` at padding (from the batch's ``attention_mask``), or ``None``.
    """

    hidden: Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    token_mask: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_mask.sum()) if self.token_mask is not None else self.hidden.shape[0] * self.hidden.shape[1]


class ActivationLedger:
    """Bytes of captured block activations alive at once (the engine's own memory accounting)."""

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0

    def add(self, t: Tensor) -> None:
        self.live_bytes += t.numel() * t.element_size()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def remove(self, t: Tensor) -> None:
        self.live_bytes -= t.numel() * t.element_size()


class _Stop(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("block 0 reached")
        self.args_, self.kwargs_ = args, kwargs


def _is_cache(v) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(v).__mro__)


def _no_cache(v):
    return None if _is_cache(v) else v


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``get_input_embeddings()``, else its first ``nn.Embedding``)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if emb is None else emb.num_embeddings


def check_token_ids(model: nn.Module, ids: Tensor) -> None:
    """``ValueError`` naming the vocabulary size when a token id is negative or ``>=`` it."""
    vocab = vocab_size(model)
    if vocab is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"Calibration token ids must lie in [0, {vocab}) (the model's vocabulary size is {vocab}); "
                         f"got ids from {lo} to {hi}. Tokenize with the model's own tokenizer (labels such as -100 "
                         "belong in 'labels', not 'input_ids').")


def call_model(model: nn.Module, batch: CalibrationBatch):
    """Run ``model`` on one batch: HF-style keyword call when ``forward`` takes ``input_ids``
    (with ``attention_mask`` and ``use_cache=False`` where accepted), else ``model(input_ids)``.
    Token ids are checked against the vocabulary first (:func:`check_token_ids`)."""
    check_token_ids(model, batch.input_ids)
    params = inspect.signature(model.forward).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "input_ids" not in params and not var_kw:
        return model(batch.input_ids)
    kw = {"input_ids": batch.input_ids}
    if batch.attention_mask is not None and ("attention_mask" in params or var_kw):
        kw["attention_mask"] = batch.attention_mask
    if "use_cache" in params or var_kw:
        kw["use_cache"] = False
    return model(**kw)


def _record(batch: CalibrationBatch, stop: _Stop) -> BlockInput:
    args, kwargs = stop.args_, dict(stop.kwargs_)
    if args:
        hidden, rest = args[0], tuple(_no_cache(a) for a in args[1:])
    elif "hidden_states" in kwargs:
        hidden, rest = kwargs.pop("hidden_states"), ()
    else:
        raise RuntimeError("Block 0 was called without hidden states (no positional arg, no 'hidden_states=').")
    for k in _CACHE_KWARGS:
        if k in kwargs:
            kwargs[k] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
    mask = None if batch.attention_mask is None else batch.attention_mask.bool()
    return BlockInput(hidden.detach(), rest, kwargs, mask)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[CalibrationBatch],
                         device: torch.device, ledger: ActivationLedger) -> list[BlockInput]:
    """Inputs of ``first_block`` for every batch (hidden ``[B, T, H]`` each), on ``device``."""

    def hook(module, args, kwargs):
        raise _Stop(args, kwargs)

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    captured: list[BlockInput] = []
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            try:
                call_model(model, batch)
            except _Stop as stop:
                captured.append(_record(batch, stop))
                ledger.add(captured[-1].hidden)
            else:
                raise RuntimeError(
                    f"The forward pass of calibration batch {i} never reached the first decoder block; "
                    "check block_path (it must name the blocks the model's forward runs)."
                )
    finally:
        handle.remove()
    return captured
