"""LLM.int8 checkpoints with bitsandbytes-compatible names (Dettmers et al. 2022).

Per :class:`~lightning_quant.layers.int8.Int8OutlierLinear`: ``weight`` int8 ``[out, in]`` (row-wise
absmax codes), ``SCB`` float32 ``[out]`` (the row absmax, ``w ≈ weight · SCB / 127``),
``weight_format`` uint8 scalar ``0`` ("row"), optional ``bias``. The config is the
``quant_method: "bitsandbytes"`` / ``load_in_8bit`` block transformers reads; the activation
outlier threshold is ``llm_int8_threshold``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.export.hf import LayerCodec, hf_format, take
from lightning_quant.export.io import check_dtype, check_shape
from lightning_quant.layers.int8 import Int8OutlierLinear
from lightning_quant.targets import is_linear_like

__all__ = ["INT8"]


def _encode(name: str, layer: Int8OutlierLinear) -> dict[str, Tensor]:
    out = {"weight": layer.weight.detach(), "SCB": layer.SCB.detach().float(),
           "weight_format": torch.tensor(0, dtype=torch.uint8)}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def _config(layers: dict[str, nn.Module], model: nn.Module) -> dict:
    thresholds = {float(layer.threshold) for layer in layers.values()}
    if len(thresholds) > 1:
        raise ValueError(f"int8 export stores one llm_int8_threshold, but the layers use {sorted(thresholds)}; "
                         "convert all layers with the same threshold.")
    skipped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if n and is_linear_like(m) and n not in layers})
    return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
            "llm_int8_threshold": thresholds.pop(), "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skipped or None}


def _decode(name: str, local: dict, shape: tuple[int, int], qc: dict, dtype: torch.dtype) -> nn.Module:
    out_f, in_f = shape
    if not qc.get("load_in_8bit"):
        raise ValueError("Only bitsandbytes 8-bit (load_in_8bit: true) checkpoints are supported; "
                         "4-bit bitsandbytes (NF4/FP4) is not an export format here.")
    weight, scb = take(local, "weight", name), take(local, "SCB", name)
    check_dtype(f"{name}.weight", weight, (torch.int8,))
    check_dtype(f"{name}.SCB", scb, (torch.float32, torch.float16))
    check_shape(f"{name}.weight", weight, (out_f, in_f))
    check_shape(f"{name}.SCB", scb, (out_f,))
    fmt = local.pop("weight_format", None)
    if fmt is not None and int(fmt) != 0:
        raise ValueError(f"{name}.weight_format is {int(fmt)}; only the row-major format (0) is supported.")
    bias = local.pop("bias", None)
    layer = Int8OutlierLinear(in_f, out_f, bias=bias is not None, threshold=float(qc.get("llm_int8_threshold", 6.0)),
                              dtype=dtype)
    layer.weight.copy_(weight)
    layer.SCB.copy_(scb.float())
    if bias is not None:
        check_shape(f"{name}.bias", bias, (out_f,))
        layer.bias.copy_(bias)
    return layer


INT8 = hf_format("int8", LayerCodec(layer_type=Int8OutlierLinear, marker="SCB", encode=_encode, config=_config,
                                    decode=_decode, detect=lambda qc: qc.get("quant_method") == "bitsandbytes"))
