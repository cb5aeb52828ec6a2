"""Lightning ``.ckpt`` files of converted models: packed tensors, a layer manifest, atomic writes.

A converted model's ``state_dict`` already holds packed tensors (``qweight``, ``scales``, ... — a
few bits per weight), so its checkpoints are small. What a plain ``.ckpt`` lacks is *which* layers are
packed and how (bits, group size, act order, ...): a fresh float model cannot load it.
:class:`QuantizedCheckpointIO` adds that manifest on save and, on load, swaps the matching float
linears of the model for empty packed layers so ``load_state_dict`` fills them — so
``Trainer.validate(model, ckpt_path=...)`` / ``Trainer.test(...)`` work on a fresh or converted model.

It is a ``CheckpointIO`` plugin *and* a ``Callback`` (the callback half sees the model); pass the same
instance in both places::

    io = QuantizedCheckpointIO()
    trainer = Trainer(plugins=[io], callbacks=[io, ...])
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_quant.layers.registry import layer_config, layer_from_config, quantized_layers
from lightning_quant.targets import is_linear_like, set_submodule

__all__ = ["MANIFEST_KEY", "QuantizedCheckpointIO", "apply_manifest", "packed_manifest"]

MANIFEST_KEY = "lightning_quant_packed_layers"


def packed_manifest(model: nn.Module) -> dict[str, dict]:
    """``{layer name: plain-JSON description}`` of every quantized layer of ``model``.

    Each description is :func:`lightning_quant.layers.registry.layer_config` (``"kind"`` plus the
    layer's shapes, dtype and spec), so every registered layer kind is recorded.
    """
    return {name: layer_config(m) for name, m in quantized_layers(model).items()}


def apply_manifest(model: nn.Module, manifest: dict[str, dict], source: str = "the checkpoint") -> list[str]:
    """Swap float linears named in ``manifest`` for empty layers of the recorded kind, shape and spec
    (:func:`lightning_quant.layers.registry.layer_from_config`).

    Layers already packed the same way are left alone. Returns the names swapped. Raises when a
    name is missing from the model, is not a linear-like layer, or is packed differently.
    """
    current = packed_manifest(model)
    swapped = []
    for name, entry in manifest.items():
        if current.get(name) == entry:
            continue
        if name in current:
            raise ValueError(f"Layer {name!r} is packed as {current[name]} in the model but {entry} in {source}; "
                             "convert the model with the same settings or load into a fresh float model.")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source} has a packed layer {name!r} that this model lacks; wrong model?") from None
        if not is_linear_like(module):
            raise ValueError(f"{source} packs {name!r}, but the model's {name!r} is a {type(module).__name__}.")
        set_submodule(model, name, layer_from_config(entry, device=next(iter(module.parameters())).device))
        swapped.append(name)
    return swapped


class QuantizedCheckpointIO(TorchCheckpointIO, Callback):
    """Torch ``.ckpt`` IO that records packed layers, restores them on load and writes atomically.

    Args:
        weights_only: passed to ``torch.load`` (default True: tensors and plain containers only, no
            arbitrary unpickling). Set False only for trusted checkpoints holding custom objects.
    """

    def __init__(self, weights_only: bool = True) -> None:
        super().__init__()
        if not isinstance(weights_only, bool):
            raise TypeError(f"weights_only must be True or False, got {weights_only!r}.")
        self.weights_only = weights_only
        self._module: nn.Module | None = None

    # ---- callback half: sees the model -----------------------------------------------
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise TypeError(
                f"QuantizedCheckpointIO writes single-file .ckpt checkpoints; under {type(trainer.strategy).__name__} "
                "the strategy writes its own sharded checkpoints (they already hold the packed buffers and the "
                "observer state, and resume through them). Drop QuantizedCheckpointIO there, and use "
                "export_on_fit_end={'format': ..., 'path': ...} for one full deployable checkpoint."
            )
        self._module = pl_module

    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict) -> None:
        checkpoint[MANIFEST_KEY] = packed_manifest(pl_module)

    def teardown(self, *args: Any, **kwargs: Any) -> None:  # CheckpointIO.teardown() and Callback.teardown(...)
        if args:
            self._module = None

    # ---- IO half ----------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        """Write to a temporary file next to ``path`` and rename it into place (never a half-written .ckpt)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        packed_keys = [k for k in checkpoint.get("state_dict", {}) if k.endswith((".qweight", ".SCB"))]
        if packed_keys and MANIFEST_KEY not in checkpoint:
            raise RuntimeError("The checkpoint holds packed layers but no manifest: pass the same "
                               "QuantizedCheckpointIO instance in Trainer(callbacks=[...]) as well as plugins=[...].")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Load (``weights_only`` by default) and swap in packed layers the checkpoint records."""
        checkpoint = super().load_checkpoint(path, map_location=map_location or (lambda s, _: s),
                                             weights_only=self.weights_only if weights_only is None else weights_only)
        manifest = checkpoint.get(MANIFEST_KEY) or {}
        if self._module is not None:
            apply_manifest(self._module, manifest, source=f"checkpoint {str(path)!r}")
            self._check_not_float(checkpoint, path)
        elif manifest:
            raise RuntimeError(f"Checkpoint {str(path)!r} has packed layers, but this QuantizedCheckpointIO never saw "
                               "the model: pass the same instance in Trainer(callbacks=[...]) as well as plugins=[...].")
        return checkpoint

    def _check_not_float(self, checkpoint: dict, path: Any) -> None:
        """A converted model cannot take float weights (e.g. a checkpoint saved before conversion)."""
        state = checkpoint.get("state_dict", {})
        stale = [n for n in packed_manifest(self._module)
                 if f"{n}.weight" in state and state[f"{n}.weight"].is_floating_point()]
        if stale:
            raise ValueError(f"Checkpoint {str(path)!r} holds float weights for {stale[:3]} ({len(stale)} layers), but "
                             "the model is already converted to packed layers. Load that checkpoint before converting "
                             "(Trainer.validate on the float model), or use a checkpoint saved after conversion.")
