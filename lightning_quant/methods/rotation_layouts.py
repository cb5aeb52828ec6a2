"""Where a rotation of the residual stream goes, per architecture, as data (:data:`ROTATION_LAYOUTS`).

Rotating the residual stream ``h -> h Q`` (QuaRot, Ashkboos et al. 2024; SpinQuant R1, Liu et al. 2024;
SliceGPT, Ashkboos et al. 2024 for LayerNorm models) touches every module that writes into or reads from it.
A :class:`RotationLayout` names them, relative to the causal-LM model (``LlamaForCausalLM``) and to one decoder
block; :func:`lightning_quant.methods.rotation.rotate_model` reads nothing else about the architecture.

Add an architecture with :func:`register_rotation_layout` (or an entry in :data:`ROTATION_LAYOUTS`), keyed by
its ``config.model_type``. Its norms must be RMSNorm-like (``norm="rms"``: ``x / rms(x) · γ``) or LayerNorm
(``norm="layer"``: ``(x - mean) / std · γ + β``, handled as SliceGPT does), and every module writing into the
residual stream must be listed (embeddings, residual writers): one left out would break exactness.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NORM_KINDS", "ROTATION_LAYOUTS", "NormReaders", "RotationLayout", "get_rotation_layout",
           "register_rotation_layout"]

#: ``"rms"``: ``x / rms(x) · γ`` (rotation invariant); ``"layer"``: LayerNorm (mean subtraction: the residual
#: stream is made zero-mean and the rotation mean-preserving, see ``methods.rotation``).
NORM_KINDS = ("rms", "layer")


@dataclass(frozen=True)
class NormReaders:
    """A norm on the residual stream and the linears reading its output (paths relative to the same root)."""

    norm: str
    readers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.norm, str) or not self.norm or not self.readers:
            raise ValueError(f"NormReaders needs a norm path and at least one reader, got {self!r}.")


@dataclass(frozen=True)
class RotationLayout:
    """The modules a residual-stream rotation touches in one architecture.

    Attributes:
        embeddings: embedding tables adding into the residual stream, relative to the model
            (``("model.embed_tokens",)``; OPT also its learned positions).
        blocks: path of the decoder-block list, relative to the model (``"model.layers"``).
        norms: per block: each norm on the residual stream and the linears reading it (relative to a block).
        writers: per block: the linears whose outputs are added into the residual stream (``o_proj``,
            ``down_proj``), relative to a block.
        final_norm: the last norm, relative to the model.
        head: the output head reading the final norm, relative to the model (``"lm_head"``).
        norm: one of :data:`NORM_KINDS`.
        absent: paths (relative to the model) that must hold ``None``: optional modules this layout does not
            handle (OPT's ``project_in`` / ``project_out``).
        requires: ``(config attribute, required value)`` pairs (OPT: ``do_layer_norm_before=True``).
    """

    embeddings: tuple[str, ...]
    blocks: str
    norms: tuple[NormReaders, ...]
    writers: tuple[str, ...]
    final_norm: str
    head: str
    norm: str = "rms"
    absent: tuple[str, ...] = ()
    requires: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"RotationLayout(norm={self.norm!r}) is not supported; use one of {NORM_KINDS}.")
        if not self.embeddings or not self.writers or not self.norms:
            raise ValueError("RotationLayout needs at least one embedding, one norm and one residual writer.")


_LLAMA_LIKE = RotationLayout(
    embeddings=("model.embed_tokens",),
    blocks="model.layers",
    norms=(NormReaders("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           NormReaders("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    writers=("self_attn.o_proj", "mlp.down_proj"),
    final_norm="model.norm",
    head="lm_head",
)

_OPT = RotationLayout(
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    blocks="model.decoder.layers",
    norms=(NormReaders("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           NormReaders("final_layer_norm", ("fc1",))),
    writers=("self_attn.out_proj", "fc2"),
    final_norm="model.decoder.final_layer_norm",
    head="lm_head",
    norm="layer",
    absent=("model.decoder.project_in", "model.decoder.project_out"),
    requires=(("do_layer_norm_before", True),),
)

#: ``config.model_type`` -> its :class:`RotationLayout`. Qwen3's per-head ``q_norm`` / ``k_norm`` act after
#: ``q_proj`` / ``k_proj`` (outside the residual stream), so Qwen3 shares the Llama entry.
ROTATION_LAYOUTS: dict[str, RotationLayout] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "opt": _OPT,
}


def register_rotation_layout(model_type: str, layout: RotationLayout) -> None:
    """Teach rotations a new architecture (``config.model_type``); replaces an existing entry."""
    if not isinstance(layout, RotationLayout):
        raise TypeError(f"layout must be a RotationLayout, got {type(layout).__name__}.")
    ROTATION_LAYOUTS[model_type] = layout


def get_rotation_layout(model_type: str | None) -> RotationLayout:
    """The layout of ``model_type``; ``ValueError`` naming the table and how to add an entry."""
    if model_type not in ROTATION_LAYOUTS:
        raise ValueError(
            f"No rotation layout for model_type={model_type!r} in lightning_quant.methods.rotation_layouts."
            f"ROTATION_LAYOUTS (known: {sorted(ROTATION_LAYOUTS)}). Add one with register_rotation_layout("
            f"{model_type!r}, RotationLayout(embeddings=..., blocks=..., norms=(NormReaders(norm, readers), ...), "
            "writers=..., final_norm=..., head=..., norm='rms' or 'layer')) naming every module that writes into "
            "or reads from the residual stream (docs/ptq.md#rotations), or quantize without rotation=.")
    return ROTATION_LAYOUTS[model_type]
