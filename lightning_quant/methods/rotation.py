"""Offline rotation of the residual stream (QuaRot / SpinQuant R1), fused into the weights.

For an orthogonal ``Q [n, n]`` (:mod:`lightning_quant.algorithms.hadamard`) and hidden size ``n``, the model
computes the same function with its residual stream ``h [tokens, n]`` replaced by ``h Q`` when (QuaRot,
Ashkboos et al. 2024, §4; SpinQuant, Liu et al. 2024, §3.1 "R1"):

1. every norm's scale ``γ`` (and LayerNorm's shift ``β``) is folded into the linears reading its output:
   ``W <- W diag(γ)``, ``b <- b + W β`` (the final norm into ``lm_head``), and ``γ <- 1``, ``β <- 0``. An
   RMSNorm without scale commutes with ``Q``: ``rms(h Q) = rms(h)``;
2. the embeddings rotate: ``E <- E Q`` ``[vocab, n]``; every block's input linears (``q/k/v``, ``gate/up``)
   and the head: ``W <- W Q`` (``W [out, n]``); the residual writers (``o_proj``, ``down_proj``):
   ``W <- Qᵀ W``, ``b <- Qᵀ b`` (``W [n, in]``).

The result is an ordinary model of the same architecture (same modules, same ``state_dict`` keys and shapes)
with no online transform, exact in float (the tests compare logits in float32 and float64), which every
method, the calibration engine and every exporter take as is.

**LayerNorm** (OPT) subtracts the mean, which a general rotation does not commute with. As SliceGPT (Ashkboos
et al. 2024, §3.2) the residual stream is first made zero-mean, exactly: the embeddings' rows and the residual
writers' outputs are centred (``E <- E C``, ``W <- C W``, ``b <- C b``, ``C = I - 11ᵀ/n``; every LayerNorm
subtracts the mean anyway, so nothing downstream changes), and a LayerNorm without affine on a zero-mean
stream is an RMSNorm. Where SliceGPT then swaps the LayerNorm modules for RMSNorm, here the modules stay and
``Q`` is made mean-preserving (``Q 1 = 1``, :func:`~lightning_quant.algorithms.hadamard.mean_preserving`): it
then commutes with the centring (``Qᵀ C Q = C``), so LayerNorm(``h Q``) = LayerNorm(``h``) ``Q`` and the rotated
stream stays zero-mean. (That commutation alone already makes the rotation exact; the centring is what makes the
stream zero-mean, the property SliceGPT's RMSNorm swap needs.) A norm whose readers have no bias (OPT's final
norm before ``lm_head``) keeps its shift as ``β/γ`` rotated (``(β/γ) Q``) in its own bias.

**Tied embeddings**: folding the final norm into ``lm_head`` changes it and not the embeddings, so a tied head
is untied (its weight cloned, ``config.tie_word_embeddings = False``) with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_quant.adapters import is_aux_wrapper, is_tuner_layer, merge_into_base
from lightning_quant.algorithms.hadamard import KINDS, mean_preserving, rotation_matrix
from lightning_quant.calibration.distributed import is_sharded
from lightning_quant.methods.rotation_layouts import RotationLayout, get_rotation_layout
from lightning_quant.targets import linear_kind

__all__ = ["Rotation", "RotationReport", "find_causal_lm", "rotate_model"]


@dataclass(frozen=True)
class Rotation:
    """An offline residual-stream rotation: ``Rotation(kind="hadamard", seed=0)``.

    Attributes:
        kind: ``"hadamard"`` (randomised Hadamard ``H diag(s) / sqrt(n)``, QuaRot) or ``"random"`` (seeded random
            orthogonal, for hidden sizes no Hadamard construction here covers); see
            :data:`~lightning_quant.algorithms.hadamard.KINDS`.
        seed: seeds the random signs / the Gaussian matrix (same seed, same ``Q``, on every rank).
    """

    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Rotation(kind={self.kind!r}) is not supported; use one of {KINDS}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Rotation(seed={self.seed!r}) must be a non-negative int, e.g. Rotation(seed=0).")

    def matrix(self, n: int) -> Tensor:
        """The orthogonal ``Q [n, n]`` (float64)."""
        return rotation_matrix(n, self.kind, self.seed)


@dataclass(frozen=True)
class RotationReport:
    """What :func:`rotate_model` did (paths relative to the model passed in).

    Attributes:
        model_type: the architecture's ``config.model_type`` (the :data:`ROTATION_LAYOUTS` key used).
        hidden_size: ``n``, the order of ``Q``.
        rotation: the :class:`Rotation`.
        folded_norms: the norms whose scale (and shift) went into their readers.
        rotated: every module whose weights were rewritten (embeddings, linears, head).
        untied: the head was tied to the embeddings and is now its own parameter.
        centered: LayerNorm model: the residual stream was made zero-mean and ``Q`` mean-preserving.
    """

    model_type: str
    hidden_size: int
    rotation: Rotation
    folded_norms: tuple[str, ...]
    rotated: tuple[str, ...]
    untied: bool = False
    centered: bool = False


@dataclass
class _Resolved:
    """The layout's modules in one model: ``norms`` is ``[(norm path, norm, {reader path: reader})]``, the final
    norm with the head last."""

    layout: RotationLayout
    n: int
    embeddings: dict[str, nn.Module] = field(default_factory=dict)
    norms: list[tuple[str, nn.Module, dict[str, nn.Module]]] = field(default_factory=list)
    writers: dict[str, nn.Module] = field(default_factory=dict)

    def linears(self) -> dict[str, nn.Module]:
        return {**{p: m for _, _, rs in self.norms for p, m in rs.items()}, **self.writers}


def find_causal_lm(model: nn.Module) -> tuple[str, nn.Module]:
    """``(path, module)`` of the outermost transformers model inside ``model`` (itself, a peft wrapper's base, a
    LightningModule's attribute): the first module holding its own ``config`` with a ``model_type``."""
    for path, m in model.named_modules():
        if isinstance(getattr(vars(m).get("config"), "model_type", None), str):
            return path, m
    raise ValueError(f"Found no transformers model (a module with its own .config.model_type) in "
                     f"{type(model).__name__}; a rotation needs the architecture's layout. Pass the HF causal LM.")


def _lookup(root: nn.Module, path: str, what: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"The rotation layout names {what} {path!r}, which {type(root).__name__} does not "
                             "have; fix its ROTATION_LAYOUTS entry (register_rotation_layout).")
        obj = getattr(obj, part)
    return obj


def _resolve(lm: nn.Module, layout: RotationLayout) -> _Resolved:
    """The layout's modules in ``lm``; raises when a required config value or an absent module is not as the
    layout needs (widths are checked by :func:`_check_widths`)."""
    for attr, value in layout.requires:
        if getattr(lm.config, attr, None) != value:
            raise ValueError(f"A rotation of {lm.config.model_type} needs config.{attr}={value!r} (the layout "
                             f"assumes it), got {getattr(lm.config, attr, None)!r}; this model cannot be rotated.")
    for path in layout.absent:
        if _lookup(lm, path, "optional module") is not None:
            raise ValueError(f"{path} is present ({lm.config.model_type} with a projection around the residual "
                             "stream): the rotation layout does not handle it; this model cannot be rotated.")
    emb = {p: _lookup(lm, p, "embedding") for p in layout.embeddings}
    res = _Resolved(layout, emb[layout.embeddings[0]].weight.shape[1], emb)
    blocks = _lookup(lm, layout.blocks, "block list")
    for i in range(len(blocks)):
        pre = f"{layout.blocks}.{i}."
        for nr in layout.norms:
            res.norms.append((pre + nr.norm, _lookup(lm, pre + nr.norm, "norm"),
                              {pre + r: _lookup(lm, pre + r, "reader") for r in nr.readers}))
        res.writers.update({pre + w: _lookup(lm, pre + w, "residual writer") for w in layout.writers})
    res.norms.append((layout.final_norm, _lookup(lm, layout.final_norm, "final norm"),
                      {layout.head: _lookup(lm, layout.head, "head")}))
    return res


def _check_widths(res: _Resolved) -> None:
    """Raise unless every embedding, norm, reader (input) and writer (output) has the hidden size's width."""
    n = res.n
    bad = [f"embedding {p} {tuple(m.weight.shape)}" for p, m in res.embeddings.items() if m.weight.shape[1] != n]
    for path, m in res.linears().items():
        base = m.get_base_layer() if is_tuner_layer(m) else m
        kind = linear_kind(base)
        if kind is None:
            bad.append(f"{path} ({type(base).__name__}: not a linear-like module)")
            continue
        out_f, in_f = kind.weight(base).shape
        if (in_f if path not in res.writers else out_f) != n:
            bad.append(f"{path} [{out_f}, {in_f}]")
    bad += [f"norm {p} {tuple(nm.weight.shape)}" for p, nm, _ in res.norms
            if getattr(nm, "weight", None) is not None and nm.weight.shape != (n,)]
    if bad:
        raise ValueError(f"The rotation layout's modules do not match the hidden size {n}: {bad[:4]}; fix the "
                         "ROTATION_LAYOUTS entry.")


def _check_adapters(lm: nn.Module, res: _Resolved, merge_adapters: bool) -> None:
    """Merge (``merge_adapters=True``) or refuse peft adapters on the layers the rotation rewrites."""
    modules = {**res.embeddings, **res.linears()}
    wrapped = {p: m for p, m in modules.items() if is_aux_wrapper(m)}
    if wrapped:
        raise ValueError(f"{sorted(wrapped)[:3]} are peft modules_to_save copies; a rotation rewrites them and "
                         "not their copies. Merge the peft model first (model.merge_and_unload()).")
    hosts = {p: m for p, m in modules.items() if is_tuner_layer(m)}
    if hosts and not merge_adapters:
        raise ValueError(
            f"{len(hosts)} layer(s) the rotation rewrites carry peft adapters (e.g. {min(hosts)!r}); rotating "
            "the base weight under an unrotated adapter changes the model. Merge them: rotate_model(..., "
            "merge_adapters=True), or quantize_model / the PTQ callbacks with lora='merged' (their default), or "
            "model.merge_and_unload().")
    if hosts:
        merge_into_base(lm, hosts, "a rotation (adapters merged)")
        for p in hosts:  # the merged base layer now sits at the host's path
            for table in (res.embeddings, res.writers, *(rs for _, _, rs in res.norms)):
                if p in table:
                    table[p] = lm.get_submodule(p)


def _untie(lm: nn.Module, res: _Resolved) -> bool:
    """Untie ``lm_head`` from the embeddings (clone its weight, ``config.tie_word_embeddings = False``)."""
    head = res.norms[-1][2][res.layout.head]
    emb = res.embeddings[res.layout.embeddings[0]]
    shared = head.weight is emb.weight
    if not shared and not getattr(lm.config, "tie_word_embeddings", False):
        return False
    if shared:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        warnings.warn(f"{res.layout.head} was tied to {res.layout.embeddings[0]}: a rotation folds the final norm "
                      "into the head only, so the head is untied (its own weight, config.tie_word_embeddings=False; "
                      "the checkpoint holds both tensors).", UserWarning, stacklevel=4)
    lm.config.tie_word_embeddings = False
    if hasattr(lm, "get_expanded_tied_weights_keys"):  # transformers 5: the mapping save / load read
        lm.all_tied_weights_keys = lm.get_expanded_tied_weights_keys(all_submodels=True)
    return True


# ---- the maths, per module, in float64 -----------------------------------------------------------------------
def _w(module: nn.Module) -> Tensor:
    return linear_kind(module).weight(module).detach().to(torch.float64)  # [out, in]


def _set(param: Tensor, value: Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _fold_norm(norm: nn.Module, readers: dict[str, nn.Module], name: str) -> Tensor | None:
    """Fold ``γ`` (and ``β``) of ``norm`` into ``readers`` and reset the norm; returns the shift ``β/γ`` the norm keeps
    (to rotate) when some reader has no bias to take ``W β``, else ``None``."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    gamma = None if w is None else w.detach().to(torch.float64)
    beta = None if b is None or not bool(b.detach().any()) else b.detach().to(torch.float64)
    into_bias = beta is not None and all(linear_kind(r).bias(r) is not None for r in readers.values())
    kept = None
    if beta is not None and not into_bias:
        g = torch.ones_like(beta) if gamma is None else gamma
        if bool(((g == 0) & (beta != 0)).any()):
            raise ValueError(f"{name}: a zero scale with a non-zero shift cannot be folded into readers without a bias.")
        kept = torch.where(beta == 0, torch.zeros_like(beta), beta / torch.where(g == 0, torch.ones_like(g), g))
    for r in readers.values():
        kind, wr = linear_kind(r), _w(r)
        if into_bias:
            _set(kind.bias(r), kind.bias(r).detach().to(torch.float64) + wr @ beta.to(wr.device))
        if gamma is not None:
            kind.write_weight(r, wr * gamma.to(wr.device).unsqueeze(0))  # [out, n] · diag(γ)
    if w is not None:
        w.data.fill_(1.0)
    if b is not None:
        b.data.zero_()
    return kept


def _rotate_reader(module: nn.Module, q: Tensor) -> None:
    """``W <- W Q`` (``W [out, n]``)."""
    w = _w(module)
    linear_kind(module).write_weight(module, w @ q.to(w.device))


def _rotate_writer(module: nn.Module, q: Tensor, center: bool) -> None:
    """``W <- Qᵀ C W``, ``b <- Qᵀ C b`` (``W [n, in]``; ``C = I - 11ᵀ/n`` when ``center``)."""
    kind, w = linear_kind(module), _w(module)
    q = q.to(w.device)
    if center:
        w = w - w.mean(0, keepdim=True)
    kind.write_weight(module, q.T @ w)
    bias = kind.bias(module)
    if bias is not None:
        b = bias.detach().to(torch.float64)
        _set(bias, q.T @ (b - b.mean() if center else b))


def _rotate_embedding(module: nn.Module, q: Tensor, center: bool) -> None:
    """``E <- C E Q`` row-wise (``E [rows, n]``)."""
    e = module.weight.detach().to(torch.float64)
    if center:
        e = e - e.mean(1, keepdim=True)
    _set(module.weight, e @ q.to(e.device))


@torch.no_grad()
def rotate_model(model: nn.Module, rotation: Rotation, *, merge_adapters: bool = False) -> RotationReport:
    """Rotate the residual stream of the transformers causal LM inside ``model`` in place (module docstring).

    Args:
        model: an HF causal LM, a peft model wrapping one, or any module holding one (found by structure,
            :func:`find_causal_lm`); its ``config.model_type`` must have a
            :data:`~lightning_quant.methods.rotation_layouts.ROTATION_LAYOUTS` entry.
        rotation: the :class:`Rotation`.
        merge_adapters: merge peft LoRA adapters on the rewritten layers into their base first; ``False``
            refuses a model with such adapters.

    Raises:
        ValueError: no layout for the architecture, a sharded (FSDP) model, adapters on rotated layers, or a
            hidden size the Hadamard construction does not cover (the message names ``kind="random"``).
    """
    if not isinstance(rotation, Rotation):
        raise TypeError(f"rotation must be a Rotation, e.g. Rotation(kind='hadamard', seed=0); got {type(rotation).__name__}.")
    if is_sharded(model):
        raise ValueError("rotate_model needs the whole model on one device: it rewrites the embeddings, every block's "
                         "linears and the head with one [n, n] matrix, and this model is sharded (FSDP / DTensor). "
                         "Rotate before sharding, or quantize the saved model with quantize_model(..., rotation=...).")
    prefix, lm = find_causal_lm(model)
    res = _resolve(lm, get_rotation_layout(lm.config.model_type))
    _check_adapters(lm, res, merge_adapters)
    _check_widths(res)
    center = res.layout.norm == "layer"
    q = rotation.matrix(res.n)  # [n, n] float64; validates the size before any change
    q = mean_preserving(q) if center else q
    untied = _untie(lm, res)
    for name, norm, readers in res.norms:
        kept = _fold_norm(norm, readers, name)
        if kept is not None:
            _set(norm.bias, kept.to(q.device) @ q)  # the shift, in rotated coordinates
        for r in readers.values():
            _rotate_reader(r, q)
    for w in res.writers.values():
        _rotate_writer(w, q, center)
    for e in res.embeddings.values():
        _rotate_embedding(e, q, center)
    full = (lambda p: f"{prefix}.{p}" if prefix else p)
    return RotationReport(lm.config.model_type, res.n, rotation, tuple(full(p) for p, _, _ in res.norms),
                          tuple(full(p) for p in [*res.embeddings, *res.linears()]), untied, center)
