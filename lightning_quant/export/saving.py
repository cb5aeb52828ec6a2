"""``save`` / ``load`` / ``from_pretrained``: any registered format, written atomically, read back (``docs/formats.md``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_quant.export.registry import SaveOptions, detect_format, format_options, get_format

__all__ = ["from_pretrained", "load", "save"]


def save(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "gptq",
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 1024**3,
    full_state: dict | None = None,
    options: Any = None,
) -> Path:
    """Write ``model`` (with packed / int8 layers) to the directory ``path`` in ``format``.

    Args:
        model: a transformers model whose quantized layers are ``PackedLinear`` (gptq, awq,
            compressed-tensors, onnx, gguf) or ``Int8OutlierLinear`` (int8) — any registered layer kind, mixed,
            for ``lightning-quant`` — or a peft ``PeftModel`` around one:
            adapters kept on packed bases (``lora="separate"``) are written next to it as
            ``adapter_model.safetensors`` / ``adapter_config.json`` (see :mod:`.adapters`).
        format: one of :func:`available_formats`.
        tokenizer: optional tokenizer; its files are written next to the weights.
        overwrite: replace an existing export (atomically) instead of raising.
        dtype: cast non-quantized float tensors to this dtype (e.g. ``torch.float16``).
        max_shard_bytes: split ``model.safetensors`` above this size.
        full_state: the full state dict of a sharded (FSDP) model, gathered on the writing rank
            (:func:`lightning_quant.export.export_after_fit` does this).
        options: the format's own options, a dict of its fields or its options dataclass (``onnx``:
            :class:`~lightning_quant.export.onnx.OnnxOptions`, e.g. ``{"accuracy_level": 4}``; ``gguf``:
            :class:`~lightning_quant.export.gguf.GGUFOptions`, e.g. ``{"float_type": "q8_0"}``;
            ``lightning-quant``: :class:`~lightning_quant.export.native.NativeOptions`, ``{"method": "gptq",
            "figures": {...}}``); unknown keys raise naming the allowed ones.

    Returns:
        The export directory. The write is atomic: on any failure the previous content of
        ``path`` is left intact.
    """
    from lightning_quant.export import adapters
    from lightning_quant.export.io import atomic_directory

    fmt = get_format(format)
    if fmt.needs_tokenizer and tokenizer is None:
        raise ValueError(f"format={fmt.name!r} embeds the tokenizer in the file; pass tokenizer= (the model's "
                         "transformers tokenizer, e.g. AutoTokenizer.from_pretrained(...)).")
    options = SaveOptions(dtype=dtype, max_shard_bytes=max_shard_bytes, full_state=full_state, tokenizer=tokenizer,
                          format_options=format_options(fmt, options))
    peft_model = model if adapters.is_peft_model(model) else None
    base = model.get_base_model() if peft_model is not None else model
    hosts = adapters.tuner_hosts(base)
    if hosts and not fmt.holds_adapters:
        raise ValueError(f"format={fmt.name!r} holds no separate LoRA adapters (the engine runs the one file), but "
                         f"{next(iter(hosts))!r}, ... keep theirs; quantize with lora='merged' (the default) to fold "
                         "them into the weights, or export as 'gptq' / 'compressed-tensors' with the adapters.")
    if hosts and peft_model is None:
        raise ValueError(f"The model holds peft adapter layers ({next(iter(hosts))!r}, ...) but is not a PeftModel; "
                         "export the PeftModel (its adapters are written as adapter_model.safetensors) or merge them.")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        with adapters.unwrapped(base, hosts):
            fmt.save(base, tmp, options)
        if hosts:
            adapters.save_adapters(peft_model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if not (tmp / "config.json").exists():
            raise RuntimeError(f"Format {fmt.name!r} wrote no config.json; load() could not detect it. Fix the format.")
    return Path(path)


def load(path: str | os.PathLike) -> nn.Module:
    """Read an export written by :func:`save` (any format, detected from ``config.json``, or from a format's
    marker file: ``quantization.json`` of a version-1 ``lightning-quant`` directory).

    Returns a model with ``PackedLinear`` / ``Int8OutlierLinear`` layers (for ``onnx``: an
    onnxruntime-backed module with the same call signature; for ``gguf``: a float transformers model read by
    transformers' own GGUF reader, which dequantizes the blocks); with saved LoRA adapters, a ``PeftModel``
    around it. Raises ``ValueError`` naming the
    problem for unknown formats, missing or mis-shaped tensors, wrong dtypes and non-safetensors files.
    """
    from lightning_quant.export.io import read_json

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is not an export directory (written by lightning_quant.export.save).")
    config = read_json(directory / "config.json")
    model = detect_format(config, directory).load(directory, config)
    from lightning_quant.export import adapters

    if (directory / adapters.ADAPTER_CONFIG).exists():
        return adapters.load_adapters(model, directory)
    return model


def from_pretrained(path: str | os.PathLike, device: Any = "cpu") -> nn.Module:
    """``load(path)`` moved to ``device`` in eval mode — the ``from_pretrained`` spelling."""
    model = load(path)
    return model.to(device).eval() if isinstance(model, nn.Module) else model
