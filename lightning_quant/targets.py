"""Which modules get quantized: linear-like module registry, name filters, and surgery helpers.

A *linear-like* module computes ``y = x @ W^T + b`` for some ``W [out, in]``. ``nn.Linear`` stores
``W`` as is; transformers' GPT-2 ``Conv1D`` stores ``W^T`` (``[in, out]``). The registry below maps
each type to how its ``[out, in]`` weight is read, so no algorithm special-cases GPT-2.

Patterns (``include`` / ``exclude``) match a module's qualified name when the pattern

* equals the name, or is a dotted suffix of it (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), or
* starts with ``re:`` and the rest is a regular expression that ``re.search`` finds in the name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = [
    "DEFAULT_EXCLUDE",
    "LinearKind",
    "get_submodule",
    "is_linear_like",
    "linear_kind",
    "linear_weight",
    "matches",
    "register_linear_kind",
    "select_linears",
    "set_submodule",
]

#: Skipped unless the user names them: the output head is tied to / as sensitive as embeddings.
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)


@dataclass(frozen=True)
class LinearKind:
    """How to read a linear-like module: its ``[out, in]`` weight and its bias."""

    name: str
    weight: Callable[[nn.Module], Tensor]
    bias: Callable[[nn.Module], Tensor | None]


_KINDS: dict[type, LinearKind] = {}


def register_linear_kind(cls: type, kind: LinearKind) -> None:
    """Teach the library a new linear-like module type."""
    _KINDS[cls] = kind


register_linear_kind(nn.Linear, LinearKind("linear", lambda m: m.weight, lambda m: m.bias))


def _register_transformers_conv1d() -> None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        return
    register_linear_kind(Conv1D, LinearKind("conv1d", lambda m: m.weight.t(), lambda m: m.bias))


def linear_kind(module: nn.Module) -> LinearKind | None:
    if not _KINDS.get(type(module)) and len(_KINDS) == 1:
        _register_transformers_conv1d()
    for cls in type(module).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return None


def is_linear_like(module: nn.Module) -> bool:
    return linear_kind(module) is not None


def linear_weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` weight of a linear-like module (a view for Conv1D)."""
    kind = linear_kind(module)
    if kind is None:
        raise TypeError(
            f"{type(module).__name__} is not a linear-like module; supported: "
            f"{sorted(c.__name__ for c in _KINDS)} (add others with register_linear_kind)."
        )
    return kind.weight(module)


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def select_linears(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, nn.Module]:
    """Linear-like modules of ``model`` chosen by name filters, in module order.

    Raises ``ValueError`` when an include pattern matches no linear-like module, or when
    nothing is selected at all, listing some module names to choose from.
    """
    include = list(include) if include else []
    exclude = list(exclude) if exclude else []
    for p in include + exclude:
        if not isinstance(p, str) or not p:
            raise ValueError(f"Module filters must be non-empty strings, got {p!r}.")
    candidates = {n: m for n, m in model.named_modules() if is_linear_like(m) and (predicate is None or predicate(n, m))}
    for p in include:
        if not any(matches(n, p) for n in candidates):
            raise ValueError(
                f"include pattern {p!r} matched no linear layer. Examples of names: "
                f"{_examples(candidates)}. Use a dotted suffix ('q_proj') or 're:<regex>'."
            )
    chosen = {
        n: m for n, m in candidates.items() if (not include or _any(n, include)) and not _any(n, exclude)
    }
    if not chosen:
        raise ValueError(
            f"No linear layer left to quantize (include={include or 'all'}, exclude={exclude}); "
            f"candidates were {_examples(candidates)}. Loosen the filters."
        )
    return chosen


def _examples(names: Iterable[str], k: int = 6) -> str:
    names = list(names)
    if not names:
        return "[] (the model has no nn.Linear / Conv1D layers)"
    more = f" ... ({len(names)} in all)" if len(names) > k else ""
    return "[" + ", ".join(repr(n) for n in names[:k]) + "]" + more


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the module at dotted ``name``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
