"""GGUF export for llama.cpp: one ``model.gguf`` with architecture metadata, tokenizer and block weights.

``save(model, path, "gguf", tokenizer=tok)`` writes the directory ``path`` with

* ``model.gguf`` — what ``llama-cli -m path/model.gguf`` (or ``llama_cpp.Llama``) runs: the
  architecture keys (``llama.context_length``, ``.embedding_length``, ``.block_count``,
  ``.feed_forward_length``, ``.attention.head_count[_kv]``, ``.rope.freq_base``, ``.rope.dimension_count``,
  ``.attention.layer_norm_rms_epsilon``, ``.vocab_size``), the tokenizer (``tokenizer.ggml.*``,
  :mod:`.gguf_vocab`), and the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...);
* ``config.json`` (the HF config plus ``lightning_quant_export``) and the tokenizer files, so
  :func:`lightning_quant.export.load` and ``lightning-quant eval`` read it back.

Packed layers become ``Q4_0`` / ``Q4_1`` / ``Q8_0`` blocks (:mod:`.gguf_blocks`: the exact mapping and
what is refused). Float 2-D tensors (embeddings, an unquantized ``lm_head``) are written as
:attr:`GGUFOptions.float_type` (F16 by default, F32, or Q8_0), norms as F32. A tied ``lm_head`` is not
written (llama.cpp reuses ``token_embd``).

Rotary layout: HF's llama ``q_proj`` / ``k_proj`` rows follow the rotate-half convention (per head,
the first ``d/2`` rows pair with the last ``d/2``); ggml's llama rope pairs adjacent rows. The export
reorders rows — GGUF row ``h·d + 2i + j`` is HF row ``h·d + j·d/2 + i`` (``q``: per attention head,
``k``: per kv head) — on the codes, scales and zeros together (:meth:`QuantizedWeight.select_rows`);
groups run along the input dim, so they stay intact.

``load`` returns a float transformers model read by transformers' own GGUF reader (it dequantizes and
undoes the row order) — an independent check of the file; llama.cpp is the engine that runs the blocks.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quant.export import gguf_blocks
from lightning_quant.export.hf import check_plain, quantized_layers
from lightning_quant.export.io import write_json
from lightning_quant.export.registry import ExportFormat, SaveOptions
from lightning_quant.layers.packed import PackedLinear

__all__ = ["ARCHITECTURES", "FILE", "GGUF", "GGUFArch", "GGUFOptions", "rotary_rows", "tensor_names"]

FILE = "model.gguf"
_KEY = "lightning_quant_export"
FLOAT_TYPES = ("f16", "f32", "q8_0")


@dataclass(frozen=True)
class GGUFOptions:
    """GGUF-only options (``options=`` of :func:`lightning_quant.export.save`).

    Args:
        float_type: how 2-D float tensors (embeddings, an unquantized ``lm_head``) are stored: ``"f16"``
            (default), ``"f32"``, or ``"q8_0"`` (round-to-nearest W8 g32, our symmetric grid).
        pre_tokenizer: ``tokenizer.ggml.pre``, the name llama.cpp selects its pre-tokenizer regex by
            (``"smollm"`` for SmolLM2, ``"llama-bpe"`` for Llama 3, ...). ``None`` writes ``"default"``
            with a warning.
        name: ``general.name`` (default: the last part of the config's ``_name_or_path``, else the model class).
    """

    float_type: Literal["f16", "f32", "q8_0"] = "f16"
    pre_tokenizer: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.float_type not in FLOAT_TYPES:
            raise ValueError(f"GGUFOptions.float_type={self.float_type!r} is not supported; use one of {FLOAT_TYPES}.")
        for field in ("pre_tokenizer", "name"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"GGUFOptions.{field} must be a non-empty str or None, got {v!r}.")


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture maps onto a llama.cpp one (data, no code).

    Attributes:
        arch: ``general.architecture``.
        blocks: the HF prefix of the decoder blocks (``"model.layers"``).
        globals: HF state-dict key -> GGUF tensor name, outside the blocks.
        block_tensors: HF key inside a block -> GGUF name inside ``blk.N``.
        rotary: HF linear inside a block -> the config attribute that counts its heads (rows are reordered).
    """

    arch: str
    blocks: str
    globals: dict[str, str]
    block_tensors: dict[str, str]
    rotary: dict[str, str]


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(
        arch="llama", blocks="model.layers",
        globals={"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"},
        block_tensors={"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                       "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                       "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                       "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                       "mlp.down_proj.weight": "ffn_down.weight"},
        rotary={"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}),
}


def _arch(model: nn.Module) -> GGUFArch:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports the architectures {sorted(ARCHITECTURES)} (transformers model_type); "
                         f"this model is {model_type!r}. Export it as 'gptq', 'compressed-tensors' or 'onnx' instead.")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"GGUF export writes Llama without biases, but the config sets {flag}=True; export "
                             "this model as 'gptq' or 'compressed-tensors'.")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"llama.cpp's llama architecture uses SiLU, the config has hidden_act={config.hidden_act!r}.")
    return ARCHITECTURES[model_type]


def tensor_names(arch: GGUFArch, keys: list[str]) -> dict[str, str]:
    """HF state-dict key -> GGUF tensor name; raises naming the keys the architecture does not map."""
    out, unknown = {}, []
    for key in keys:
        if key in arch.globals:
            out[key] = arch.globals[key]
            continue
        head, _, rest = key.partition(arch.blocks + ".")
        idx, _, local = rest.partition(".")
        if head == "" and idx.isdigit() and local in arch.block_tensors:
            out[key] = f"blk.{idx}.{arch.block_tensors[local]}"
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"GGUF ({arch.arch}) has no tensor name for {unknown[:4]}; the model holds tensors the "
                         "llama.cpp architecture does not know (extra modules or adapters) — merge or remove them.")
    return out


def rotary_rows(n_heads: int, head_dim: int) -> Tensor:
    """``int64 [n_heads·head_dim]``: the HF row each GGUF row takes (module docstring), per head
    ``[2, d/2] -> [d/2, 2]``."""
    return torch.arange(n_heads * head_dim).view(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"GGUF export writes plain rotary embeddings; the config uses rope_type={rope_type!r} "
                         "(scaled rope needs llama.cpp's rope_freqs / scaling keys, not written yet).")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rotary_key(arch: GGUFArch, layer_name: str) -> str | None:
    """The config attribute counting the heads of ``layer_name`` when its rows are rotary, else None."""
    head, _, rest = layer_name.partition(arch.blocks + ".")
    local = rest.partition(".")[2]
    return arch.rotary.get(local) if head == "" else None


def _float_tensor(writer, gname: str, t: Tensor, float_type: str) -> str:
    """Add a float tensor: 1-D as F32, 2-D as ``float_type``. Returns the ggml type name."""
    import gguf

    t = t.detach().float().cpu()
    if t.dim() == 1 or float_type == "f32":
        writer.add_tensor(gname, t.numpy().astype(np.float32))
        return "F32"
    if float_type == "q8_0":
        kind, data = gguf_blocks.encode_blocks(gguf_blocks.quantize_q8_0(t, gname), gname)
        writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        return kind
    half = t.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError(f"Tensor {gname!r} holds values float16 cannot represent (|x| > 65504 or NaN); use "
                         "options={'float_type': 'f32'} or 'q8_0'.")
    writer.add_tensor(gname, half.numpy())
    return "F16"


def _write_tensors(writer, model: nn.Module, arch: GGUFArch, layers: dict[str, PackedLinear],
                   options: SaveOptions, gopts: GGUFOptions) -> collections.Counter:
    import gguf

    config = model.config
    state = model.state_dict() if options.full_state is None else options.full_state
    prefixes = tuple(n + "." for n in layers)
    plain = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    if getattr(config, "tie_word_embeddings", False) and "lm_head" not in layers:
        plain.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    names = tensor_names(arch, list(plain) + [n + ".weight" for n in layers])
    types: collections.Counter = collections.Counter()
    for name, layer in layers.items():
        check_plain(name, layer, "gguf")
        qw = layer.to_quantized()
        heads = _rotary_key(arch, name)
        if heads is not None:
            qw = qw.select_rows(rotary_rows(getattr(config, heads), _head_dim(config)))
        kind, data = gguf_blocks.encode_blocks(qw, name)
        writer.add_tensor(names[name + ".weight"], data, raw_dtype=gguf.GGMLQuantizationType[kind])
        types[kind] += 1
    for key, t in plain.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"State entry {key!r} is not a float tensor; GGUF export cannot write it.")
        heads = _rotary_key(arch, key.removesuffix(".weight"))
        if heads is not None:
            t = t[rotary_rows(getattr(config, heads), _head_dim(config))]
        types[_float_tensor(writer, names[key], t, gopts.float_type)] += 1
    return types


def _write_metadata(writer, model: nn.Module, arch: GGUFArch, gopts: GGUFOptions, types: collections.Counter,
                    n_vocab: int) -> None:
    import gguf

    c = model.config
    writer.add_name(gopts.name or Path(getattr(c, "_name_or_path", "") or "").name or type(model).__name__)
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(int(c.num_attention_heads))
    writer.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    head_dim = _head_dim(c)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    quant = {k: v for k, v in types.items() if k.startswith("Q")}
    main = max(quant, key=quant.get) if quant else "F16"
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{main}"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _save(model: nn.Module, directory: Path, options: SaveOptions) -> None:
    import gguf

    from lightning_quant.export.gguf_vocab import write_vocab

    gopts = options.format_options or GGUFOptions()
    if options.dtype is not None:
        raise ValueError("format='gguf' picks the float tensor type itself; pass options={'float_type': "
                         "'f16' | 'f32' | 'q8_0'} instead of dtype=.")
    if options.tokenizer is None:
        raise ValueError("format='gguf' embeds the tokenizer (llama.cpp needs it); pass tokenizer= (the model's "
                         "transformers tokenizer, e.g. AutoTokenizer.from_pretrained(...)).")
    arch = _arch(model)
    layers = quantized_layers(model, PackedLinear, "gguf")
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    writer = gguf.GGUFWriter(str(directory / FILE), arch.arch)
    try:
        types = _write_tensors(writer, model, arch, layers, options, gopts)
        _write_metadata(writer, model, arch, gopts, types, n_vocab)
        write_vocab(writer, options.tokenizer, n_vocab, model.config, gopts.pre_tokenizer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg[_KEY] = {"format": "gguf", "file": FILE, "architecture": arch.arch, "tensor_types": dict(sorted(types.items()))}
    write_json(directory / "config.json", cfg)


def _load(directory: Path, config: dict) -> nn.Module:
    from lightning_quant.models import load_causal_lm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_causal_lm(directory / config[_KEY]["file"])


GGUF = ExportFormat(name="gguf", save=_save, load=_load, options=GGUFOptions, needs_tokenizer=True,
                    holds_adapters=False,
                    detect=lambda c: isinstance(c.get(_KEY), dict) and c[_KEY].get("format") == "gguf")
