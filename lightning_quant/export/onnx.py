"""ONNX export with packed low-bit weights (onnxruntime's ``com.microsoft::MatMulNBits``).

Each :class:`~lightning_quant.layers.packed.PackedLinear` becomes one ``MatMulNBits`` node whose
weight stays packed (2/4/8 bits). Operand layout, for ``K = in``, ``N = out``, block size ``bs``
(the group size; per-channel uses the next power of two ``>= K``), ``nb = ceil(K / bs)``:

* ``B`` uint8 ``[N, nb, bs·bits/8]``: codes of row ``n`` block ``j`` packed LSB-first in bytes
  (at 4 bits: element ``2i`` in the low nibble of byte ``i``); ``K`` is zero-padded to ``nb·bs``;
* ``scales`` float ``[N·nb]``; ``zero_points`` uint8 ``[N · ceil(nb·bits/8)]`` packed the same way
  (asymmetric only; symmetric omits it and onnxruntime uses ``2^(bits−1)``).

``y = x · ((q − z) · s)ᵀ`` — the same numbers as ours. Act-order layers gather ``x`` by the
kernel permutation first (groups are then contiguous).

Two graphs (:class:`OnnxOptions` ``graph``):

* ``"generation"`` (default): a decoder with a KV cache in onnxruntime-genai's conventions, plus
  ``genai_config.json`` (:mod:`lightning_quant.export.onnx_decoder`); with ``tokenizer=`` given,
  ``onnxruntime_genai.Model(path)`` and its ``Tokenizer`` / ``Generator`` generate text from the directory.
  ``accuracy_level`` sets MatMulNBits' compute: 0 float32 (matches our logits to float rounding), 4
  int8 activations per block (usually the fastest decode on CPU).
* ``"logits"``: traced with ``torch.onnx``; takes ``input_ids`` and ``attention_mask`` (``[batch, seq]``)
  and returns ``logits``, recomputing the prefix at each call. Explicit input scales and per-token
  activation quant are exported as ordinary ONNX ops (the generation graph refuses activation quant).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quant.export.hf import model_dtype, quantized_layers
from lightning_quant.export.io import read_json, write_json
from lightning_quant.export.onnx_matmul import ONNX_BITS, matmulnbits_operands
from lightning_quant.export.registry import ExportFormat, SaveOptions
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.targets import set_submodule

__all__ = ["ACCURACY_LEVELS", "GRAPHS", "ONNX", "ONNX_BITS", "OnnxCausalLM", "OnnxOptions", "matmulnbits_operands"]

_FILE = "model.onnx"
_GENAI_CONFIG = "genai_config.json"
_KEY = "lightning_quant_export"
GRAPHS = ("generation", "logits")
#: MatMulNBits ``accuracy_level``: 0 unset (input as is), 1 fp32, 2 fp16, 3 bf16, 4 int8 (CPU: int8 dot products)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: above this many bytes of initializers the graph is saved with external data (protobuf's 2 GiB limit)
_EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class OnnxOptions:
    """Options of ``format="onnx"`` (``export.save(..., options={...})``, ``--export-option KEY=VALUE``).

    Args:
        graph: ``"generation"`` (KV cache, onnxruntime-genai) or ``"logits"`` (traced, logits only).
        accuracy_level: MatMulNBits compute, one of :data:`ACCURACY_LEVELS` (4: int8 activations, the fast
            CPU decode; 0: float32, our logits to float rounding). Generation graph only.
        attention: ``"auto"`` (onnxruntime's fused ``GroupQueryAttention`` where the head size is a multiple of
            16, else plain ONNX ops), ``"gqa"`` or ``"plain"``. Generation graph only.
        context_length: longest sequence (prompt + generated) the generation graph supports: sizes the rotary
            tables and ``genai_config.json``'s ``context_length`` / ``max_length``; ``None`` takes the model's
            ``max_position_embeddings``.
    """

    graph: Literal["generation", "logits"] = "generation"
    accuracy_level: int = 0
    attention: Literal["auto", "gqa", "plain"] = "auto"
    context_length: int | None = None

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise ValueError(f"graph={self.graph!r} is not an ONNX graph; use one of {GRAPHS}.")
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level={self.accuracy_level!r} is not supported by MatMulNBits; use one of "
                             f"{ACCURACY_LEVELS} (4 = int8 compute on CPU, 0 = float).")
        if self.context_length is not None and (isinstance(self.context_length, bool)
                                                or not isinstance(self.context_length, int) or self.context_length < 1):
            raise ValueError(f"context_length must be a positive int or None, got {self.context_length!r}.")
        from lightning_quant.export.onnx_decoder import ATTENTIONS

        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not supported; use one of {ATTENTIONS}.")
        if self.graph == "logits" and (self.accuracy_level != 0 or self.attention != "auto"):
            raise ValueError("accuracy_level and attention apply to graph='generation' only; drop them or use the "
                             "generation graph.")


class _MatMulNBits(torch.autograd.Function):
    """Traced as one ``com.microsoft::MatMulNBits`` node; eager forward is the dequantized matmul."""

    @staticmethod
    def forward(ctx, x, b, scales, zero_points, weight_kernel_order, attrs):
        return x @ weight_kernel_order.t().to(x.dtype)

    @staticmethod
    def symbolic(g, x, b, scales, zero_points, weight_kernel_order, attrs):
        k, n, bits, bs, has_zp = attrs
        inputs = [x, b, scales] + ([zero_points] if has_zp else [])
        out = g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits, block_size_i=bs)
        sizes = x.type().varyingSizes()  # [..., K] -> [..., N] for ONNX shape inference
        if sizes is not None:
            out.setType(x.type().with_sizes(sizes[:-1] + [n]))
        return out


class _OnnxPackedLinear(nn.Module):
    """Export-time stand-in for a PackedLinear (kept only while tracing)."""

    def __init__(self, layer: PackedLinear, name: str) -> None:
        super().__init__()
        self.layer = layer
        ops = matmulnbits_operands(layer, name)
        self.register_buffer("b", ops["B"])
        self.register_buffer("scales", ops["scales"].to(layer.compute_dtype))
        self.register_buffer("zero_points", ops.get("zero_points", torch.zeros(1, dtype=torch.uint8)))
        self.attrs = (ops["K"], ops["N"], ops["bits"], ops["block_size"], "zero_points" in ops)
        w = layer.dequantize()
        self.register_buffer("w_kernel", w if layer.perm is None else w[:, layer.perm])

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer._prepare_input(x)
        if self.layer.perm is not None:
            x = x.index_select(-1, self.layer.perm)
        y = _MatMulNBits.apply(x, self.b, self.scales.to(x.dtype), self.zero_points, self.w_kernel, self.attrs)
        return y if self.layer.bias is None else y + self.layer.bias.to(x.dtype)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _save_logits(model: nn.Module, directory: Path) -> dict:
    layers = quantized_layers(model, PackedLinear, "onnx")
    swapped = {n: set_submodule(model, n, _OnnxPackedLinear(m, n)) for n, m in layers.items()}
    was_training = model.training
    try:
        model.eval()
        ids = torch.zeros(1, 8, dtype=torch.long)
        with torch.no_grad():
            torch.onnx.export(_LogitsOnly(model), (ids, torch.ones_like(ids)), str(directory / _FILE), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"},
                                            "logits": {0: "batch", 1: "seq"}},
                              custom_opsets={"com.microsoft": 1})
    finally:
        for n, m in swapped.items():
            set_submodule(model, n, m)
        model.train(was_training)
    return {"inputs": ["input_ids", "attention_mask"], "output": "logits"}


def _save_generation(model: nn.Module, directory: Path, opts: OnnxOptions, tokenizer) -> dict:
    import onnx  # build_decoder raised with the install hint if it is missing

    from lightning_quant.export.onnx_decoder import build_decoder, genai_config

    quantized_layers(model, PackedLinear, "onnx")  # raises when there are none, or LLM.int8 layers
    context = opts.context_length or getattr(model.config, "max_position_embeddings", None)
    if context is None:
        raise ValueError("The model config has no max_position_embeddings; pass options={'context_length': N}.")
    proto = build_decoder(model, context, opts.accuracy_level, opts.attention)
    big = sum(len(t.raw_data) for t in proto.graph.initializer) > _EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(directory / _FILE), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=_FILE + ".data")
    write_json(directory / _GENAI_CONFIG, genai_config(model, _FILE, context, tokenizer))
    return {"graph": "generation", "accuracy_level": opts.accuracy_level, "attention": opts.attention, "context_length": context,
            "genai_config": _GENAI_CONFIG, "tokenizer": tokenizer is not None}


def _save(model: nn.Module, directory: Path, options: SaveOptions) -> None:
    if options.dtype is not None and options.dtype != model_dtype(model):
        raise ValueError("format='onnx' exports the model in its own dtype (the generation graph stores float16 / "
                         "bfloat16 tables as they are and computes in float32); cast the model instead of passing dtype=.")
    opts = options.format_options or OnnxOptions()
    if opts.graph == "logits":
        meta = {"graph": "logits", **_save_logits(model, directory)}
    else:
        meta = _save_generation(model, directory, opts, options.tokenizer)
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg[_KEY] = {"format": "onnx", "file": _FILE, "op": "com.microsoft::MatMulNBits", **meta}
    write_json(directory / "config.json", cfg)


class OnnxCausalLM(nn.Module):
    """Runs an exported ``model.onnx`` with onnxruntime (CPU); ``forward`` returns an object with ``.logits``.

    For the generation graph ``forward`` runs the whole sequence with an empty cache; :meth:`step` feeds
    new tokens with a cache (``past`` from the previous step's ``present``) and returns both.
    """

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("Running ONNX exports needs onnxruntime: pip install onnxruntime") from None
        directory = Path(directory)
        self.config = read_json(directory / "config.json")
        meta = self.config[_KEY]
        self.graph = meta.get("graph", "logits")
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(directory / meta["file"]), so, providers=["CPUExecutionProvider"])
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length ``past_key_values.*`` for a first step."""
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self._past}

    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
             past: dict[str, np.ndarray]) -> tuple[Tensor, dict[str, np.ndarray]]:
        """One call of the generation graph: ``(logits [B, S, V], {past name: present})``."""
        if self.graph != "generation":
            raise ValueError("step() needs an export with graph='generation'; this one is logits-only.")
        feeds = {"input_ids": input_ids.cpu().long().numpy(), "attention_mask": attention_mask.cpu().long().numpy(),
                 "position_ids": position_ids.cpu().long().numpy(), **past}
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(names, feeds)))
        present = {n: out[n.replace("past_key_values.", "present.")] for n in past}
        return torch.from_numpy(out["logits"]), present

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object):
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.graph == "generation":
            if not bool(attention_mask.bool().all()):
                raise ValueError("The generation graph's forward takes unpadded sequences (attention_mask all ones); "
                                 "run padded batches row by row or use step() with right padding.")
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return CausalLMOutput(logits=self.step(input_ids, attention_mask, positions,
                                                   self.empty_cache(input_ids.shape[0]))[0])
        feeds = {"input_ids": input_ids.cpu().long().numpy(), "attention_mask": attention_mask.cpu().long().numpy()}
        logits = torch.from_numpy(self.session.run(["logits"], feeds)[0])
        return CausalLMOutput(logits=logits)


ONNX = ExportFormat(name="onnx", save=_save, load=lambda d, c: OnnxCausalLM(d), options=OnnxOptions,
                    detect=lambda c: isinstance(c.get(_KEY), dict) and c[_KEY].get("format") == "onnx")
