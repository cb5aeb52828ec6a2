"""Export at the end of ``fit``: the one helper the PTQ and QAT callbacks share.

``export_on_fit_end={"format": "gptq", "path": "out/w4"}`` (or ``{"format": "onnx", "path": "out/edge",
"options": {"accuracy_level": 4}}``) on a callback becomes an
:class:`ExportConfig`; after conversion the callback calls :func:`export_after_fit`, which writes
the export on global rank 0 only (atomically) and then waits at a barrier so no rank races ahead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["ExportConfig", "export_after_fit", "find_hf_model"]

_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ExportConfig:
    """Where and how to export after ``fit``.

    Args:
        format: one of :func:`lightning_quant.export.available_formats`.
        path: the export directory.
        overwrite: replace an existing export at ``path`` (atomically); False raises if it exists.
        dtype: ``"float16"`` / ``"bfloat16"`` / ``"float32"`` for the non-quantized tensors, or None (keep).
        tokenizer: optional tokenizer (anything with ``save_pretrained``) written next to the weights; required by
            formats that embed it (``gguf``).
        options: the format's own options as a dict (``onnx``: ``{"accuracy_level": 4}``, see
            :class:`~lightning_quant.export.onnx.OnnxOptions`; ``gguf``: ``{"float_type": "q8_0", "pre_tokenizer":
            "smollm"}``, see :class:`~lightning_quant.export.gguf.GGUFOptions`), checked here against the format.
    """

    format: str
    path: str | os.PathLike
    overwrite: bool = False
    dtype: str | None = None
    tokenizer: Any = None
    options: dict | None = None

    def __post_init__(self) -> None:
        from lightning_quant.export.registry import available_formats, format_options, get_format

        if self.format not in available_formats():
            raise ValueError(f"export format {self.format!r} is unknown; use one of {available_formats()}.")
        fmt = get_format(self.format)
        if fmt.needs_tokenizer and self.tokenizer is None:
            raise ValueError(f"export format {self.format!r} embeds the tokenizer; add 'tokenizer' (the model's "
                             "transformers tokenizer) to export_on_fit_end.")
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ValueError(f"export path must be a non-empty str or path, got {self.path!r}.")
        if not isinstance(self.overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {self.overwrite!r}.")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {_DTYPES} or None.")
        if self.tokenizer is not None and not hasattr(self.tokenizer, "save_pretrained"):
            raise ValueError(f"tokenizer must have save_pretrained (a transformers tokenizer), got {type(self.tokenizer).__name__}.")
        format_options(fmt, self.options)  # raises on unknown keys / bad values now, not after fit

    @classmethod
    def coerce(cls, value: ExportConfig | dict | None) -> ExportConfig | None:
        """``None``, an :class:`ExportConfig`, or a dict with its fields (e.g. from a YAML recipe)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"export_on_fit_end must be a dict like {{'format': 'gptq', 'path': 'out'}}, an "
                             f"ExportConfig or None; got {type(value).__name__}.")
        allowed = {f.name for f in fields(cls)}
        unknown = set(value) - allowed
        if unknown or not {"format", "path"} <= set(value):
            raise ValueError(f"export_on_fit_end needs keys 'format' and 'path' (optional: overwrite, dtype, "
                             f"tokenizer, options); got {sorted(value)}.")
        return cls(**value)


def find_hf_model(module: nn.Module) -> nn.Module:
    """The outermost transformers ``PreTrainedModel`` or peft ``PeftModel`` inside ``module`` (a LightningModule, ...).

    A ``PeftModel`` whose adapters were merged (PTQ's default) exports as its base model; one with adapters
    kept (``lora="separate"``) exports the quantized base plus peft's adapter files.
    """
    from transformers import PreTrainedModel

    from lightning_quant.export.adapters import is_peft_model, tuner_hosts

    for m in module.modules():
        if is_peft_model(m):
            return m if tuner_hosts(m.get_base_model()) else m.get_base_model()
        if isinstance(m, PreTrainedModel):
            return m
    raise ValueError(f"{type(module).__name__} holds no transformers PreTrainedModel; exports write HF-style "
                     "directories, so keep the model as a transformers model attribute of the LightningModule.")


def export_after_fit(trainer: Any, pl_module: nn.Module, config: ExportConfig | dict) -> Path | None:
    """Export ``pl_module``'s (converted) transformers model on global rank 0, then barrier. Under FSDP
    every rank takes part in gathering the sharded tensors, one at a time, and rank 0 writes them.

    Returns the export path on rank 0 and None elsewhere.
    """
    import torch

    from lightning_quant.calibration.distributed import full_state_dict, gathered_root, is_sharded
    from lightning_quant.export.saving import save

    cfg = ExportConfig.coerce(config)
    model = find_hf_model(pl_module)
    out = None
    with gathered_root(trainer):  # FSDP1: the root unit's own parameters (embeddings, head) are full
        full = full_state_dict(model) if is_sharded(model) else None  # FSDP: every rank gathers, rank 0 keeps
        if trainer.is_global_zero:
            dtype = None if cfg.dtype is None else getattr(torch, cfg.dtype)
            out = save(model, cfg.path, cfg.format, tokenizer=cfg.tokenizer, overwrite=cfg.overwrite, dtype=dtype,
                       full_state=full, options=cfg.options)
    trainer.strategy.barrier("lightning_quant.export_after_fit")
    return out
