"""A decoder graph with a KV cache, built node by node, in onnxruntime-genai's conventions.

The graph is written directly with ``onnx.helper`` from an architecture *layout* (data: where the
embeddings, blocks, norms and projections live, :data:`DECODER_LAYOUTS`), not traced: tracing
transformers' cache classes is version-fragile, and the fused attention op has no torch twin.

I/O (``B`` batch, ``S`` new tokens, ``P`` cached tokens, ``T = P + S``, ``kv`` key/value heads,
``hd`` head size):

* inputs ``input_ids`` int64 ``[B, S]``, ``attention_mask`` int64 ``[B, T]`` (1 = real token),
  ``position_ids`` int64 ``[B, S]``, ``past_key_values.{i}.key`` / ``.value`` float ``[B, kv, P, hd]``;
* outputs ``logits`` float ``[B, S, vocab]``, ``present.{i}.key`` / ``.value`` ``[B, kv, T, hd]``.

Per block (pre-norm Llama family)::

    h = RMSNorm(x) ; q, k, v = MatMulNBits(h) (+ bias)
    a, present = GroupQueryAttention(q, k, v, past, seqlens_k = sum(mask) - 1, T, cos, sin, position_ids)
    x = x + MatMulNBits(a) ; h = RMSNorm(x) ; x = x + down(silu(gate(h)) * up(h))

``GroupQueryAttention`` (com.microsoft) applies the rotary embedding itself (``do_rotary=1``, half
split as transformers' ``rotate_half``) from cos/sin tables computed by the model's own rotary module
at positions ``0 .. context_length - 1`` (so every static rope scaling — linear, llama3, yarn — is
exact); it is causal and reads only the first ``sum(mask)`` cache rows (right padding). Its CPU
kernel needs a head size that is a multiple of 16; other head sizes (or ``attention="plain"``) get
the same attention in plain ops plus ``RotaryEmbedding`` (:mod:`~lightning_quant.export.onnx_attention`). Quantized
linears become ``com.microsoft::MatMulNBits`` with our codes, scales and zero points unchanged
(:func:`~lightning_quant.export.onnx_matmul.matmulnbits_operands`); act-order layers gather their input by
the kernel permutation first, AWQ explicit input scales divide it. Float linears (``lm_head``) are a
``MatMul`` with the transposed weight; with tied embeddings the one ``[hidden, vocab]`` table serves
both the lookup (``Gather`` on axis 1) and the head; these tables keep the model's dtype on disk (a
float16 model's file stays small) and are cast to float32 in the graph. Everything computes in float32
(MatMulNBits takes float32 scales with its float32 input: float16 scales are stored as float16 and cast
in the graph, which onnxruntime folds into constants before it prepacks the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_quant.export.onnx_attention import (
    GraphBuilder,
    causal_mask_bias,
    gqa_attention,
    gqa_lengths,
    plain_attention,
)

__all__ = ["ATTENTIONS", "DECODER_LAYOUTS", "DecoderLayout", "build_decoder", "decoder_layout", "past_names", "present_names"]


@dataclass(frozen=True)
class DecoderLayout:
    """Where a pre-norm decoder keeps its parts (module paths; block paths relative to one block).

    Attributes:
        genai_type: ``model.type`` in ``genai_config.json``.
        embed, blocks, final_norm, lm_head: paths from the ``*ForCausalLM`` model.
        attn_norm, q, k, v, o, attn, mlp_norm, gate, up, down: paths inside a block.
    """

    genai_type: str
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"


#: ``config.model_type`` -> layout. The three share module names; Qwen2's q/k/v carry biases (read from the layers).
DECODER_LAYOUTS: dict[str, DecoderLayout] = {
    "llama": DecoderLayout("llama"),
    "mistral": DecoderLayout("mistral"),
    "qwen2": DecoderLayout("qwen2"),
}
_ACTIVATIONS = ("silu",)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def past_names(i: int) -> tuple[str, str]:
    return f"past_key_values.{i}.key", f"past_key_values.{i}.value"


def present_names(i: int) -> tuple[str, str]:
    return f"present.{i}.key", f"present.{i}.value"


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """The layout for ``model.config.model_type``; raises naming the supported ones and the reason otherwise."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in DECODER_LAYOUTS:
        raise ValueError(f"ONNX generation export supports model types {sorted(DECODER_LAYOUTS)} (Llama-family "
                         f"pre-norm decoders), got {kind!r}; export with options={{'graph': 'logits'}} for a "
                         "logits-only graph, or use format='gptq'.")
    act = getattr(cfg, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"ONNX generation export supports hidden_act {_ACTIVATIONS}, the model has {act!r}.")
    rope = _rope_type(cfg)
    if rope not in _STATIC_ROPE:
        raise ValueError(f"ONNX generation export supports rope types {_STATIC_ROPE} (position-independent tables), "
                         f"the model has {rope!r}.")
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("ONNX generation export needs a full rotary embedding (partial_rotary_factor=1.0), the model "
                         f"has {cfg.partial_rotary_factor}.")
    return DECODER_LAYOUTS[kind]


def _rope_type(cfg) -> str:
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, attr, None)
        if isinstance(params, dict):
            return params.get("rope_type", params.get("type", "default"))
    return "default"


def _linear(g: GraphBuilder, x: str, layer: nn.Module, name: str, accuracy_level: int) -> str:
    """``x [..., in] -> [..., out]`` for a PackedLinear (MatMulNBits) or a float nn.Linear (MatMul)."""
    from lightning_quant.export.onnx_matmul import matmulnbits_operands
    from lightning_quant.layers.packed import PackedLinear

    if not isinstance(layer, PackedLinear):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"Layer {name!r} is a {type(layer).__name__}; the ONNX decoder holds PackedLinear or nn.Linear.")
        y = g.op("MatMul", [x, g.table(f"{name}.weight_t", layer.weight.t())], name)
        return y if layer.bias is None else g.op("Add", [y, g.const(f"{name}.bias", layer.bias.float())], name)
    if layer.act_spec is not None:
        raise ValueError(f"Layer {name!r} quantizes activations ({layer.act_spec}); the ONNX generation graph holds "
                         "weight-only layers. Use options={'graph': 'logits'} or format='compressed-tensors'.")
    if layer.input_scale is not None:
        x = g.op("Div", [x, g.const(f"{name}.input_scale", layer.input_scale.float())], name)
    if layer.perm is not None:
        x = g.op("Gather", [x, g.const(f"{name}.perm", layer.perm)], name, axis=-1)
    ops = matmulnbits_operands(layer, name)
    n, nb = ops["N"], math.ceil(ops["K"] / ops["block_size"])
    inputs = [x, g.const(f"{name}.B", ops["B"]), g.table(f"{name}.scales", ops["scales"].reshape(n, nb).to(layer.scales.dtype))]
    inputs.append(g.const(f"{name}.zero_points", ops["zero_points"].reshape(n, -1)) if "zero_points" in ops else "")
    if layer.bias is not None:
        inputs += ["", g.const(f"{name}.bias", layer.bias.float())]  # g_idx (deprecated) omitted
    while inputs[-1] == "":
        inputs.pop()
    return g.op("MatMulNBits", inputs, name, domain="com.microsoft", K=ops["K"], N=n, bits=ops["bits"],
                block_size=ops["block_size"], accuracy_level=accuracy_level)


def _rms_norm(g: GraphBuilder, x: str, norm: nn.Module, name: str, eps: float) -> str:
    w = getattr(norm, "weight", None)
    if w is None:
        raise ValueError(f"Norm {name!r} has no weight; the ONNX decoder expects an RMSNorm with a scale.")
    return g.op("SimplifiedLayerNormalization", [x, g.const(f"{name}.weight", w.detach().float())], name,
                axis=-1, epsilon=float(eps), stash_type=1)


def _rotary_tables(model: nn.Module, layout: DecoderLayout, length: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin ``[length, hd/2]`` from the model's own rotary module (its scaling and attention factor included)."""
    rotary = model.get_submodule(layout.rotary)
    pos = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)  # [1, L, hd], halves repeated
    if cos.shape[-1] != head_dim:
        raise ValueError(f"The rotary module gives {cos.shape[-1]} dims but heads have {head_dim}; partial rotary "
                         "embeddings are not supported by the ONNX decoder.")
    half = head_dim // 2
    if not torch.equal(cos[..., :half], cos[..., half:]):
        raise ValueError("The rotary tables are not split in halves (rotate_half); interleaved rotary is not supported.")
    return cos[0, :, :half].float(), sin[0, :, :half].float()


ATTENTIONS = ("auto", "gqa", "plain")


def build_decoder(model: nn.Module, context_length: int, accuracy_level: int, attention: str = "auto"):
    """The ``onnx.ModelProto`` of ``model`` (see the module docstring); ``context_length`` sizes the rotary
    tables. ``attention``: ``"gqa"`` (fused, head size a multiple of 16), ``"plain"`` (ONNX ops), or
    ``"auto"`` (gqa where it fits)."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        raise ImportError("The ONNX export needs the onnx package: pip install onnx") from None

    layout = decoder_layout(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv:
        raise ValueError(f"The model has {heads} query heads over {kv} key/value heads; grouped-query attention needs "
                         "a whole number of query heads per key/value head.")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and window < context_length:
        raise ValueError(f"Sliding-window attention (sliding_window={window}) is not supported by the ONNX decoder; "
                         f"pass options={{'context_length': {window}}} (the window then never slides).")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not supported; use one of {ATTENTIONS}.")
    if attention == "gqa" and hd % 16:
        raise ValueError(f"onnxruntime's GroupQueryAttention needs a head size that is a multiple of 16, the model has "
                         f"head_dim={hd}; use attention='plain' or 'auto'.")
    fused = attention == "gqa" or (attention == "auto" and hd % 16 == 0)
    blocks = model.get_submodule(layout.blocks)
    g = GraphBuilder()
    mask = "attention_mask"
    extra = gqa_lengths(g, mask) if fused else causal_mask_bias(g, mask)
    cos, sin = _rotary_tables(model, layout, context_length, hd)
    rotary = g.const("cos_cache", cos), g.const("sin_cache", sin)
    x = _embed(g, model, layout)
    eps = getattr(cfg, "rms_norm_eps", 1e-6)
    for i, block in enumerate(blocks):
        p = f"{layout.blocks}.{i}"
        h = _rms_norm(g, x, block.get_submodule(layout.attn_norm), f"{p}.{layout.attn_norm}", eps)
        q, k, v = (_linear(g, h, block.get_submodule(n), f"{p}.{n}", accuracy_level) for n in (layout.q, layout.k, layout.v))
        scale = float(getattr(block.get_submodule(layout.attn), "scaling", hd**-0.5))
        io = (q, k, v, past_names(i), present_names(i), extra, rotary, f"{p}.{layout.attn}", heads, kv)
        a = gqa_attention(g, *io, scale) if fused else plain_attention(g, *io, hd, scale)
        x = g.op("Add", [x, _linear(g, a, block.get_submodule(layout.o), f"{p}.{layout.o}", accuracy_level)], p)
        h = _rms_norm(g, x, block.get_submodule(layout.mlp_norm), f"{p}.{layout.mlp_norm}", eps)
        gate = _linear(g, h, block.get_submodule(layout.gate), f"{p}.{layout.gate}", accuracy_level)
        up = _linear(g, h, block.get_submodule(layout.up), f"{p}.{layout.up}", accuracy_level)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], p)], p), up], p)  # silu(gate) * up
        x = g.op("Add", [x, _linear(g, act, block.get_submodule(layout.down), f"{p}.{layout.down}", accuracy_level)], p)
    x = _rms_norm(g, x, model.get_submodule(layout.final_norm), layout.final_norm, eps)
    _head(g, x, model, layout, accuracy_level)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info(mask, i64, ["batch", "total_seq"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab_size])]
    for i in range(len(blocks)):
        inputs += [helper.make_tensor_value_info(n, f32, ["batch", kv, "past_seq", hd]) for n in past_names(i)]
        outputs += [helper.make_tensor_value_info(n, f32, ["batch", kv, "total_seq", hd]) for n in present_names(i)]
    graph = helper.make_graph(g.nodes, "lightning_quant_decoder", inputs, outputs, g.inits)
    return helper.make_model(graph, producer_name="lightning_quant", ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _tied(model: nn.Module, layout: DecoderLayout) -> bool:
    head, emb = model.get_submodule(layout.lm_head), model.get_submodule(layout.embed)
    w = getattr(head, "weight", None)
    return isinstance(head, nn.Linear) and w is not None and w.data_ptr() == emb.weight.data_ptr()


def _embed(g: GraphBuilder, model: nn.Module, layout: DecoderLayout) -> str:
    emb = model.get_submodule(layout.embed).weight  # [vocab, hidden]
    if _tied(model, layout):
        g.tied_table = g.table(f"{layout.embed}.weight_t", emb.t())  # [hidden, vocab]: lookup and head share it
        cols = g.op("Gather", [g.tied_table, "input_ids"], layout.embed, axis=1)  # [hidden, B, S]
        return g.op("Transpose", [cols], layout.embed, perm=[1, 2, 0])
    return g.op("Gather", [g.table(f"{layout.embed}.weight", emb), "input_ids"], layout.embed, axis=0)


def _head(g: GraphBuilder, x: str, model: nn.Module, layout: DecoderLayout, accuracy_level: int) -> None:
    head = model.get_submodule(layout.lm_head)
    if _tied(model, layout):
        y = g.op("MatMul", [x, g.tied_table], layout.lm_head)
        y = y if head.bias is None else g.op("Add", [y, g.const(f"{layout.lm_head}.bias", head.bias.float())], "lm_head")
    else:
        y = _linear(g, x, head, layout.lm_head, accuracy_level)
    g.op("Identity", [y], layout.lm_head, outputs=["logits"])


def _special_id(model: nn.Module, tokenizer, attr: str):
    value = getattr(getattr(model, "generation_config", None), attr, None)
    if value is None:
        value = getattr(model.config, attr, None)
    if value is None and tokenizer is not None:
        value = getattr(tokenizer, attr, None)
    return value


def genai_config(model: nn.Module, filename: str, context_length: int, tokenizer=None) -> dict:
    """``genai_config.json`` for the graph :func:`build_decoder` writes (greedy search by default)."""
    layout = decoder_layout(model)
    cfg = model.config
    heads = cfg.num_attention_heads
    eos = _special_id(model, tokenizer, "eos_token_id")
    if eos is None:
        raise ValueError("The model config, its generation_config and the tokenizer give no eos_token_id; "
                         "onnxruntime-genai needs one. Set model.config.eos_token_id.")
    bos = _special_id(model, tokenizer, "bos_token_id")
    pad = _special_id(model, tokenizer, "pad_token_id")
    first_eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    decoder = {
        "filename": filename, "head_size": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "hidden_size": cfg.hidden_size, "num_attention_heads": heads, "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context_length,
              "min_length": 0, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
              "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
              "early_stopping": True}
    return {"model": {"type": layout.genai_type, "context_length": context_length, "vocab_size": cfg.vocab_size,
                      "bos_token_id": first_eos if bos is None else bos, "eos_token_id": eos,
                      "pad_token_id": first_eos if pad is None else pad, "decoder": decoder},
            "search": search}
