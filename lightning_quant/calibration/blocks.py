"""Finding a model's repeated decoder blocks.

The generic rule: the largest ``nn.ModuleList`` whose children all have the same type (Llama's
``model.layers``, GPT-2's ``transformer.h``, OPT's ``model.decoder.layers``; peft wrappers only
add a prefix). Ties go to the list with more parameters. Odd models name theirs with an explicit
``block_path`` override.

The module calibration *calls* is :func:`forward_owner`: the outermost transformers / peft model on the
way to the blocks (its ``forward(input_ids=..., attention_mask=...)`` is known, whatever the
LightningModule's own ``forward`` takes); without one, the model itself when it defines ``forward``, else
the outermost module on the way that does.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["BlockList", "find_blocks", "forward_owner", "forward_owner_path", "has_forward"]


@dataclass(frozen=True)
class BlockList:
    """The decoder blocks: their dotted ``path`` in the model and the ``nn.ModuleList`` itself."""

    path: str
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def name(self, index: int) -> str:
        """Qualified name prefix of block ``index`` (``"model.layers.3"``)."""
        return f"{self.path}.{index}" if self.path else str(index)


def _homogeneous(ml: nn.ModuleList) -> bool:
    return len(ml) > 0 and len({type(m) for m in ml}) == 1


def find_blocks(model: nn.Module, override: str | None = None) -> BlockList:
    """The decoder blocks of ``model`` (see the module docstring).

    Args:
        model: any module, e.g. a transformers causal LM or a peft model wrapping one.
        override: dotted path of the block list (``"model.layers"``) for models the rule misses.

    Raises:
        ValueError: no candidate list (the message names ``block_path`` as the fix), or the
            override does not point at a ``ModuleList``/``Sequential`` of blocks.
    """
    if override is not None:
        try:
            ml = model.get_submodule(override)
        except AttributeError as e:
            raise ValueError(f"block_path={override!r} does not exist in {type(model).__name__}: {e}.") from None
        if not isinstance(ml, (nn.ModuleList, nn.Sequential)) or len(ml) == 0:
            raise ValueError(
                f"block_path={override!r} points at a {type(ml).__name__}; it must name a non-empty "
                "nn.ModuleList (or nn.Sequential) of decoder blocks."
            )
        return BlockList(override, ml)  # type: ignore[arg-type]
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and _homogeneous(m)]
    if not candidates:
        raise ValueError(
            f"Could not find the repeated decoder blocks of {type(model).__name__} (no nn.ModuleList of "
            "identical modules). Pass block_path='<dotted path of the block list>', e.g. block_path='model.layers'."
        )

    def size(item):
        ml = item[1]
        return len(ml), sum(p.numel() for p in ml.parameters())

    name, ml = max(candidates, key=size)
    return BlockList(name, ml)


def has_forward(module: nn.Module) -> bool:
    """True when ``type(module)`` implements ``forward`` (``nn.Module``'s and Lightning's placeholders don't)."""
    placeholders = {nn.Module.forward}
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a runtime dependency
        pass
    else:
        placeholders.add(LightningModule.forward)
    return type(module).forward not in placeholders


def forward_owner(model: nn.Module, block_path: str | None = None) -> nn.Module:
    """The module to call with token ids so that the blocks at ``block_path`` run (see the module docstring)."""
    return model.get_submodule(forward_owner_path(model, block_path))


def _known_signature(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` or a peft ``PeftModel``: called as ``m(input_ids=..., attention_mask=...)``."""
    from lightning_quant.adapters import is_peft_model

    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        return is_peft_model(module)
    return isinstance(module, PreTrainedModel) or is_peft_model(module)


def forward_owner_path(model: nn.Module, block_path: str | None = None) -> str:
    """Dotted path (``""`` for ``model`` itself) of :func:`forward_owner` (see the module docstring);
    ``block_path`` defaults to :func:`find_blocks`'s. Raises ``ValueError`` naming the overrides when no
    module on the way defines ``forward``."""
    block_path = find_blocks(model).path if block_path is None else block_path
    parts = block_path.split(".") if block_path else []
    prefixes = [".".join(parts[:i]) for i in range(len(parts) + 1)]  # "" (model itself) ... the block list
    for path in prefixes:  # a transformers / peft model on the way: its forward(input_ids, attention_mask) is known
        if _known_signature(model.get_submodule(path)):
            return path
    for path in prefixes:
        sub = model.get_submodule(path)
        if path and isinstance(sub, (nn.ModuleList, nn.Sequential)):
            break
        if has_forward(sub):
            return path
    raise ValueError(
        f"{type(model).__name__} defines no forward and no module between it and its decoder blocks "
        f"({block_path!r}) does, so calibration cannot run the model. Pass model='<attribute path of the "
        "model to quantize>' (e.g. model='model') to the callback, or quantize that module directly."
    )
