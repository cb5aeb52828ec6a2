"""Graph building blocks for the ONNX decoder: a node/initializer accumulator and causal attention
over a KV cache, fused (``com.microsoft::GroupQueryAttention``) or in plain ONNX ops.

Both attentions take ``q [B, S, H·hd]``, ``k, v [B, S, kv·hd]`` (before rotary), the cache
``past_k, past_v [B, kv, P, hd]`` and return ``a [B, S, H·hd]`` plus ``present_k, present_v
[B, kv, T, hd]`` (``T = P + S``); query head ``h`` reads key/value head ``h // (H / kv)`` (transformers'
``repeat_kv``). Rotary: half split (``rotate_half``), tables ``cos, sin [context, hd/2]`` looked up
by ``position_ids``.

* :func:`gqa_attention`: one fused node; onnxruntime's CPU kernel needs ``hd % 16 == 0``; it attends
  over the first ``sum(attention_mask)`` cache rows (right padding).
* :func:`plain_attention`: ``RotaryEmbedding`` (com.microsoft, any even ``hd``) then Concat / MatMul /
  Softmax with an additive mask built once by :func:`causal_mask_bias` from ``attention_mask``
  (key ``j`` visible to new token ``i`` iff ``j <= P + i`` and ``mask[b, j] = 1``), so left padding works.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["GraphBuilder", "causal_mask_bias", "gqa_attention", "gqa_lengths", "plain_attention"]

_NEG = float(np.finfo(np.float32).min)  # additive mask value (as transformers' eager attention)


class GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: Tensor | np.ndarray) -> str:
        from onnx import numpy_helper

        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def table(self, hint: str, value: Tensor) -> str:
        """A float matrix stored in its own dtype (float16 / bfloat16 stay half size on disk) and cast to
        float32 in the graph (onnxruntime folds the cast once at load); float32 is stored as is."""
        import torch
        from onnx import TensorProto, helper

        value = value.detach().cpu().contiguous()
        if value.dtype == torch.float32:
            return self.const(hint, value)
        kinds = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
        if value.dtype not in kinds:
            return self.const(hint, value.float())
        name = self.name(hint)
        raw = value.view(torch.int16).numpy().tobytes()
        self.inits.append(helper.make_tensor(name, kinds[value.dtype], list(value.shape), raw, raw=True))
        return self.op("Cast", [name], hint, to=TensorProto.FLOAT)

    def op(self, op_type: str, inputs: list[str], hint: str, n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        from onnx import helper

        outs = outputs or [self.name(f"{hint}/{op_type}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(hint), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def i64(self, hint: str, *values: int) -> str:
        return self.const(hint, np.array(values, np.int64))


def gqa_lengths(g: GraphBuilder, mask: str) -> tuple[str, str]:
    """``seqlens_k [B] = sum(mask) - 1`` and ``total_sequence_length = T`` (int32 scalar) for GroupQueryAttention."""
    from onnx import TensorProto

    total_len = g.op("ReduceSum", [mask, g.i64("axis1", 1)], "seqlens", keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [total_len, g.const("one", np.array(1, np.int64))], "seqlens")], "seqlens",
                   to=TensorProto.INT32)
    total = g.op("Gather", [g.op("Shape", [mask], "total"), g.const("idx1", np.array(1, np.int64))], "total")
    return seqlens, g.op("Cast", [total], "total", to=TensorProto.INT32)


def gqa_attention(g: GraphBuilder, q: str, k: str, v: str, past: tuple[str, str], present: tuple[str, str],
                  lengths: tuple[str, str], rotary: tuple[str, str], name: str, heads: int, kv: int,
                  scale: float) -> str:
    return g.op("GroupQueryAttention", [q, k, v, *past, *lengths, *rotary, "position_ids"], name,
                outputs=[g.name(f"{name}/GroupQueryAttention"), *present], domain="com.microsoft", num_heads=heads,
                kv_num_heads=kv, scale=scale, do_rotary=1, rotary_interleaved=0)[0]


def causal_mask_bias(g: GraphBuilder, mask: str) -> str:
    """Additive bias ``[B, 1, S, T]``: 0 where new token ``i`` may see cache row ``j``, float32 min elsewhere."""
    from onnx import TensorProto

    t = g.op("Gather", [g.op("Shape", [mask], "mask"), g.const("idx1", np.array(1, np.int64))], "mask")
    s = g.op("Gather", [g.op("Shape", ["input_ids"], "mask"), g.const("idx1", np.array(1, np.int64))], "mask")
    zero, one = g.const("zero", np.array(0, np.int64)), g.const("one", np.array(1, np.int64))
    keys = g.op("Range", [zero, t, one], "mask")  # [T]
    queries = g.op("Add", [g.op("Range", [zero, s, one], "mask"), g.op("Sub", [t, s], "mask")], "mask")  # [S]: P + i
    causal = g.op("LessOrEqual", [keys, g.op("Unsqueeze", [queries, g.i64("ax", 1)], "mask")], "mask")  # [S, T]
    real = g.op("Cast", [g.op("Unsqueeze", [mask, g.i64("ax", 1, 2)], "mask")], "mask", to=TensorProto.BOOL)  # [B,1,1,T]
    ok = g.op("And", [causal, real], "mask")  # [B, 1, S, T]
    return g.op("Where", [ok, g.const("zero_f", np.array(0.0, np.float32)), g.const("neg", np.array(_NEG, np.float32))],
                "mask")


def _heads(g: GraphBuilder, x: str, n: int, hd: int, name: str) -> str:
    """``[B, S, n·hd] -> [B, n, S, hd]``."""
    return g.op("Transpose", [g.op("Reshape", [x, g.i64("shape", 0, 0, n, hd)], name)], name, perm=[0, 2, 1, 3])


def _repeat_kv(g: GraphBuilder, x: str, kv: int, rep: int, hd: int, name: str) -> str:
    """``[B, kv, T, hd] -> [B, kv·rep, T, hd]`` (each kv head repeated ``rep`` times in place)."""
    if rep == 1:
        return x
    shape = g.op("Shape", [x], name)
    b_t = g.op("Gather", [shape, g.i64("idx", 0, 2)], name)
    b, t = (g.op("Slice", [b_t, g.i64("s", i), g.i64("e", i + 1)], name) for i in (0, 1))
    target = g.op("Concat", [b, g.i64("kv", kv), g.i64("rep", rep), t, g.i64("hd", hd)], name, axis=0)
    wide = g.op("Expand", [g.op("Unsqueeze", [x, g.i64("ax", 2)], name), target], name)  # [B, kv, rep, T, hd]
    return g.op("Reshape", [wide, g.op("Concat", [b, g.i64("h", kv * rep), t, g.i64("hd", hd)], name, axis=0)], name)


def plain_attention(g: GraphBuilder, q: str, k: str, v: str, past: tuple[str, str], present: tuple[str, str],
                    bias: str, rotary: tuple[str, str], name: str, heads: int, kv: int, hd: int, scale: float) -> str:
    q, k, v = _heads(g, q, heads, hd, name), _heads(g, k, kv, hd, name), _heads(g, v, kv, hd, name)
    q, k = (g.op("RotaryEmbedding", [x, "position_ids", *rotary], name, domain="com.microsoft", interleaved=0)
            for x in (q, k))  # [B, n, S, hd]
    k_all = g.op("Concat", [past[0], k], name, outputs=[present[0]], axis=2)  # [B, kv, T, hd]
    v_all = g.op("Concat", [past[1], v], name, outputs=[present[1]], axis=2)
    rep = heads // kv
    k_all, v_all = _repeat_kv(g, k_all, kv, rep, hd, name), _repeat_kv(g, v_all, kv, rep, hd, name)
    scores = g.op("MatMul", [q, g.op("Transpose", [k_all], name, perm=[0, 1, 3, 2])], name)  # [B, H, S, T]
    scores = g.op("Add", [g.op("Mul", [scores, g.const("scale", np.array(scale, np.float32))], name), bias], name)
    out = g.op("MatMul", [g.op("Softmax", [scores], name, axis=-1), v_all], name)  # [B, H, S, hd]
    out = g.op("Transpose", [out], name, perm=[0, 2, 1, 3])
    return g.op("Reshape", [out, g.i64("shape", 0, 0, heads * hd)], name)
