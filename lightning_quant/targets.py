"""Which modules get quantized: linear-like module registry, name filters, and surgery helpers.

A *linear-like* module computes ``y = x @ W^T + b`` for some ``W [out, in]``. ``nn.Linear`` stores
``W`` as is; transformers' GPT-2 ``Conv1D`` stores ``W^T`` (``[in, out]``). The registry below maps
each type to how its ``[out, in]`` weight is read and written, so no algorithm special-cases GPT-2.

**One selection** (:func:`select_targets`) serves QAT, PTQ, packed validation, int8, the report and
export. A layer is named by its *logical* path: its module path, or, for a layer wrapped by a peft
adapter, the path of the adapter host (``...q_proj``, not ``...q_proj.base_layer``), so
``include=["q_proj"]`` means the same with and without peft. The base layer of a peft host is the
target; modules inside a host other than its ``base_layer`` (``lora_A``, ``lora_B``,
``lora_embedding_*``) never are. A peft ``modules_to_save`` wrapper (a trainable copy of e.g. ``lm_head``)
is one layer under the wrapper's path (so ``exclude=["lm_head"]`` still applies): its active copy.

Patterns (``include`` / ``exclude``) match a layer's logical name when the pattern

* equals the name, or is a dotted suffix of it (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), or
* starts with ``re:`` and the rest is a regular expression that ``re.search`` finds in the name.

Patterns are validated once, by :func:`check_patterns` (``ValueError``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_quant.adapters import active_copy, is_aux_wrapper, is_tuner_layer

__all__ = [
    "DEFAULT_EXCLUDE",
    "LinearKind",
    "Target",
    "check_patterns",
    "get_layer",
    "get_submodule",
    "is_linear_like",
    "linear_kind",
    "linear_weight",
    "logical_path",
    "matches",
    "register_linear_kind",
    "replace_layer",
    "select_linears",
    "select_targets",
    "set_submodule",
]

#: Skipped unless the user names them: the output head is tied to / as sensitive as embeddings.
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)


@dataclass(frozen=True)
class LinearKind:
    """How to read a linear-like module: its ``[out, in]`` weight and its bias.

    Attributes:
        name: a label for messages.
        weight / bias: read the ``[out, in]`` weight (a view) and the bias ``[out]`` (or ``None``).
        transposed: the parameter is stored ``[in, out]`` (GPT-2 ``Conv1D``); writes transpose back.
        plain_input: the module's input is a plain activation ``[..., in]`` (per-token activation
            quant applies).
        build: ``(weight, bias) -> module``: a new module of this kind holding the given parameters (as
            stored: ``[in, out]`` when ``transposed``); what reverses surgery (``qat.remove``). ``None``: the
            kind cannot be rebuilt, and removing fake quant from it raises naming this field.
    """

    name: str
    weight: Callable[[nn.Module], Tensor]
    bias: Callable[[nn.Module], Tensor | None]
    transposed: bool = False
    plain_input: bool = True
    build: Callable[[nn.Parameter, nn.Parameter | None], nn.Module] | None = None

    def write_weight(self, module: nn.Module, weight_oi: Tensor) -> None:
        """Copy an ``[out, in]`` weight into the module's parameter (in its dtype and layout)."""
        param = module.weight
        param.data.copy_((weight_oi.t() if self.transposed else weight_oi).to(param.dtype))


_KINDS: dict[type, LinearKind] = {}
_BUILTINS_LOADED = False


def register_linear_kind(cls: type, kind: LinearKind) -> None:
    """Teach the library a new linear-like module type (the built-in ones stay registered)."""
    _KINDS[cls] = kind


def _holding(module: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    """``module`` (built on the meta device: no allocation) with ``weight`` / ``bias`` as its parameters."""
    module.weight = weight
    module.bias = bias
    return module


def _build_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    with torch.device("meta"):
        return _holding(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), weight, bias)


register_linear_kind(nn.Linear, LinearKind("linear", lambda m: m.weight, lambda m: m.bias, build=_build_linear))


def _register_builtins() -> None:
    """transformers' ``Conv1D``, registered on first use (transformers imports lazily)."""
    global _BUILTINS_LOADED
    _BUILTINS_LOADED = True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        return
    def build(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:  # weight stored [in, out]
        with torch.device("meta"):
            return _holding(Conv1D(weight.shape[1], weight.shape[0]), weight, bias)

    _KINDS.setdefault(Conv1D, LinearKind("conv1d", lambda m: m.weight.t(), lambda m: m.bias, transposed=True,
                                         build=build))


def linear_kind(module: nn.Module) -> LinearKind | None:
    if not _BUILTINS_LOADED:
        _register_builtins()
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


def check_patterns(patterns: Sequence[str] | None, what: str) -> tuple[str, ...]:
    """``patterns`` as a tuple, or ``ValueError`` naming the fix (a bare string, an empty or non-str
    pattern, a ``re:`` pattern that does not compile)."""
    if patterns is None:
        return ()
    if isinstance(patterns, (str, bytes)):  # one error type for every pattern problem, so callers catch one
        raise ValueError(  # noqa: TRY004
            f"{what} must be a list of module-name patterns, got the string {patterns!r}; write [{patterns!r}].")
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p or p == "re:":
            raise ValueError(f"{what} patterns must be non-empty strings, got {p!r}.")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {e}.") from None
    return out


@dataclass(frozen=True)
class Target:
    """One selected layer.

    Attributes:
        name: the logical name (the peft host's path for a wrapped layer).
        path: module path of the linear-like module itself (``name`` or ``name + ".base_layer"``).
        module: the linear-like module.
        host: the peft adapter wrapping it, or ``None``.
    """

    name: str
    path: str
    module: nn.Module
    host: nn.Module | None = None


#: attribute names of wrappers that forward attribute access to the module they wrap (FSDP1 units,
#: activation checkpointing): left out of logical names, which therefore survive wrapping and unwrapping
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def logical_path(path: str) -> str:
    """``path`` without :data:`WRAPPER_SEGMENTS` (``model.layers.0._fsdp_wrapped_module.mlp`` ->
    ``model.layers.0.mlp``); it resolves through those wrappers' attribute forwarding."""
    return ".".join(a for a in path.split(".") if a not in WRAPPER_SEGMENTS)


def _candidates(model: nn.Module) -> dict[str, Target]:
    """Every linear-like layer by logical name; adapters inside peft hosts are left out, and a peft
    ``modules_to_save`` wrapper (e.g. around ``lm_head``) is one layer named by its own path: its active copy."""
    hosts = {logical_path(n): m for n, m in model.named_modules() if is_tuner_layer(m)}
    wrappers = {logical_path(n): m for n, m in model.named_modules() if is_aux_wrapper(m)}
    out: dict[str, Target] = {}
    for path, module in model.named_modules():
        if not is_linear_like(module):
            continue
        name = logical_path(path)
        wrapper = max((w for w in wrappers if name.startswith(w + ".")), key=len, default=None)
        if wrapper is not None:
            if module is active_copy(wrappers[wrapper]):
                out[wrapper] = Target(wrapper, name, module)
            continue
        host_name = max((h for h in hosts if name.startswith(h + ".")), key=len, default=None)
        if host_name is None:
            out[name] = Target(name, name, module)
        elif name == host_name + ".base_layer":
            out[host_name] = Target(host_name, name, module, hosts[host_name])
    return out


def select_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, Target]:
    """The layers of ``model`` chosen by name filters, by logical name, in module order.

    Raises ``ValueError`` for an invalid pattern, when an include pattern matches no linear-like
    layer, or when nothing is selected at all, listing some names to choose from.
    """
    include = check_patterns(include, "include")
    exclude = check_patterns(exclude, "exclude")
    candidates = {n: t for n, t in _candidates(model).items() if predicate is None or predicate(n, t.module)}
    for p in include:
        if not any(matches(n, p) for n in candidates):
            raise ValueError(
                f"include pattern {p!r} matched no linear layer. Examples of names: "
                f"{_examples(candidates)}. Use a dotted suffix ('q_proj') or 're:<regex>'."
            )
    chosen = {n: t for n, t in candidates.items() if (not include or _any(n, include)) and not _any(n, exclude)}
    if not chosen:
        raise ValueError(
            f"No linear layer left to quantize (include={list(include) or 'all'}, exclude={list(exclude)}); "
            f"candidates were {_examples(candidates)}. Loosen the filters."
        )
    return chosen


def select_linears(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, nn.Module]:
    """``{logical name: linear-like module}`` of :func:`select_targets` (what the methods take)."""
    return {n: t.module for n, t in select_targets(model, include, exclude, predicate).items()}


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


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The linear-like module with logical ``name`` (the ``base_layer`` of a peft host, the active copy of a
    ``modules_to_save`` wrapper)."""
    module = model.get_submodule(name)
    if is_aux_wrapper(module):
        return active_copy(module)
    return module.get_base_layer() if is_tuner_layer(module) else module


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the layer with logical ``name``: at the module itself (a ``modules_to_save``
    wrapper as a whole), or as the ``base_layer`` of the peft host at ``name`` (adapters kept). Returns
    the replaced module."""
    module = model.get_submodule(name)
    return set_submodule(model, name + ".base_layer" if is_tuner_layer(module) else name, new)
