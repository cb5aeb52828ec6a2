"""A quantized base with its LoRA adapters kept separate: the base in any HF format, the adapters as peft writes them.

``PTQ(lora="separate")`` (or QAT with ``lora="separate"``) leaves peft LoRA hosts whose ``base_layer`` is a
``PackedLinear``. :func:`save_with_adapters` writes such a ``PeftModel`` as

* the quantized base model in the requested format, its layers named by their logical path
  (``...q_proj.qweight``, as the format's readers expect; the hosts are unwrapped for the write and put
  back afterwards, so the in-memory model is unchanged), and
* ``adapter_model.safetensors`` + ``adapter_config.json`` — peft's own adapter files
  (``get_peft_model_state_dict``, ``LoraConfig.save_pretrained``), so
  ``PeftModel.from_pretrained(base, path)``-style loading works.

:func:`load_adapters` re-attaches them on load (``export.load`` does it when the files are present): LoRA
on the packed base layers through :func:`lightning_quant.integrations.peft.register_packed_lora`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from lightning_quant.adapters import is_peft_model, is_tuner_layer
from lightning_quant.targets import set_submodule

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "is_peft_model", "load_adapters", "save_adapters", "tuner_hosts", "unwrapped"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def tuner_hosts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_tuner_layer(m)}


@contextmanager
def unwrapped(model: nn.Module, hosts: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with each peft host replaced by its base layer while the block runs (restored after)."""
    for name, host in hosts.items():
        set_submodule(model, name, host.get_base_layer())
    try:
        yield model
    finally:
        for name, host in hosts.items():
            set_submodule(model, name, host)


def save_adapters(peft_model: nn.Module, directory: Path) -> None:
    """Write the active adapter's weights and config with peft's own functions."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    names = list(peft_model.peft_config)
    if len(names) != 1:
        raise ValueError(f"Exporting kept LoRA adapters supports one adapter, the model has {names}; "
                         "delete the others (model.delete_adapter(name)) or merge them (lora='merged').")
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config[names[0]].save_pretrained(str(directory))


def load_adapters(base: nn.Module, directory: Path) -> nn.Module:
    """``base`` (with ``PackedLinear`` layers) wrapped in the saved LoRA adapters, in eval mode."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from lightning_quant.integrations.peft import register_packed_lora

    config = LoraConfig.from_pretrained(str(directory))
    config.inference_mode = True
    model = get_peft_model(base, register_packed_lora(config))
    result = set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{ADAPTER_WEIGHTS} holds tensors the adapter config does not place: {unexpected[:4]}.")
    return model.eval()
