"""compressed-tensors ``pack-quantized`` checkpoints (vLLM's native format; transformers reads it).

Per layer (``b`` bits, ``G = ceil(in / group_size)``, or 1 per channel):

* ``weight_packed`` int32 ``[out, ceil(in·b/32)]`` — codes packed densely along the input dim.
  compressed-tensors' codes are signed (``[−2^(b−1), 2^(b−1) − 1]``) and stored offset by
  ``+2^(b−1)``, which is exactly our unsigned code ``q``;
* ``weight_scale`` ``[out, G]`` (in the model dtype when it holds the scales exactly);
* ``weight_zero_point`` (asymmetric only): signed zero ``z − 2^(b−1)``, offset back to ``z`` and
  packed along dim 0: int32 ``[ceil(out·b/32), G]``;
* ``weight_g_idx`` int32 ``[in]`` with ``actorder: "group"``; ``weight_shape`` int64 ``[2]``.

``w = (q_s − z_s) · s = (q − z) · s`` — the same numbers as ours. Symmetric 4-bit scales are
``absmax / 7.5`` in both. Dynamic per-token int8 activations are recorded as
``input_activations`` (``strategy: "token"``, ``dynamic: true``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lightning_quant import packing
from lightning_quant.export.gptq import spec_from_config, uniform_spec
from lightning_quant.export.hf import LayerCodec, check_plain, hf_format, take
from lightning_quant.export.io import check_dtype, check_shape
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec
from lightning_quant.targets import is_linear_like

__all__ = ["COMPRESSED_TENSORS"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _exact_in(t: Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).float(), t.float()))


def _encode(name: str, layer: PackedLinear) -> dict[str, Tensor]:
    check_plain(name, layer, "compressed-tensors", allow_act_spec=True)
    qw = layer.to_quantized()
    spec = qw.spec
    scale_dtype = layer.compute_dtype if _exact_in(qw.scales, layer.compute_dtype) else spec.torch_scale_dtype
    out = {
        "weight_packed": packing.pack_cols(qw.codes, spec.bits),  # [out, in] -> [out, ceil(in·b/32)]
        "weight_scale": qw.scales.to(scale_dtype).contiguous(),  # [out, G]
        "weight_shape": torch.tensor([qw.out_features, qw.in_features], dtype=torch.int64),
    }
    if qw.zeros is not None:
        out["weight_zero_point"] = packing.pack(qw.zeros.to(torch.uint8), spec.bits, dim=0)  # [ceil(out·b/32), G]
    if layer.perm is not None:
        out["weight_g_idx"] = qw.group_index().to(torch.int32)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def _config(layers: dict[str, nn.Module], model: nn.Module) -> dict:
    spec = uniform_spec(layers, "compressed-tensors")
    acts = {n: layer.act_spec for n, layer in layers.items()}
    if len(set(acts.values())) > 1:
        raise ValueError("compressed-tensors export needs the same activation spec on every layer; got "
                         f"{sorted(set(map(str, acts.values())))}.")
    act = next(iter(acts.values()))
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": False,
               "group_size": None if spec.group_size == -1 else spec.group_size,
               "strategy": "channel" if spec.group_size == -1 else "group",
               "actorder": "group" if any(layer.perm is not None for layer in layers.values()) else None,
               "observer": "minmax"}
    inputs = None if act is None else {"num_bits": act.bits, "type": "int", "symmetric": act.symmetric,
                                        "strategy": "token", "dynamic": True, "observer": None}
    partial = [n for n, layer in layers.items() if spec.group_size != -1 and layer.in_features % spec.group_size]
    if partial:
        warnings.warn(f"Layers {partial[:3]} have a partial last group (in_features % group_size != 0). The file "
                      "holds it and lightning_quant.export.load reads it, but the compressed-tensors library "
                      "(<= 0.20) refuses it at decompression; pick a group size that divides in_features for "
                      "vLLM / transformers.", UserWarning, stacklevel=2)
    ignore = sorted(n for n, m in model.named_modules() if n and is_linear_like(m) and n not in layers)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None}


def _scheme(qc: dict) -> tuple[dict, dict | None]:
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"Only compressed-tensors format 'pack-quantized' is supported, got {qc.get('format')!r}.")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"Expected exactly one config group in the compressed-tensors config, got {sorted(groups)}.")
    group = next(iter(groups.values()))
    w = group.get("weights") or {}
    if w.get("type", "int") != "int":
        raise ValueError(f"Only integer weights are supported, the config says type={w.get('type')!r}.")
    return w, group.get("input_activations")


def _decode(name: str, local: dict, shape: tuple[int, int], qc: dict, dtype: torch.dtype) -> nn.Module:
    out_f, in_f = shape
    w, inputs = _scheme(qc)
    gs = -1 if w.get("strategy") == "channel" else w.get("group_size")
    scale = take(local, "weight_scale", name)
    check_dtype(f"{name}.weight_scale", scale, _FLOATS)
    scale_dtype = next(str(d).removeprefix("torch.") for d in _FLOATS if _exact_in(scale, d))
    spec = spec_from_config(w.get("num_bits"), gs, w.get("symmetric", True), "compressed-tensors", scale_dtype)
    b, n_groups = spec.bits, spec.num_groups(in_f)
    packed, wshape = take(local, "weight_packed", name), take(local, "weight_shape", name)
    check_dtype(f"{name}.weight_packed", packed, (torch.int32,))
    check_dtype(f"{name}.weight_shape", wshape, (torch.int32, torch.int64))
    if wshape.tolist() != [out_f, in_f]:
        raise ValueError(f"{name}.weight_shape is {wshape.tolist()} but the model's layer is [{out_f}, {in_f}].")
    check_shape(f"{name}.weight_packed", packed, (out_f, packing.packed_len(in_f, b)))
    check_shape(f"{name}.weight_scale", scale, (out_f, n_groups))
    zeros = None
    if not spec.symmetric:
        zp = take(local, "weight_zero_point", name)
        check_dtype(f"{name}.weight_zero_point", zp, (torch.int32,))
        check_shape(f"{name}.weight_zero_point", zp, (packing.packed_len(out_f, b), n_groups))
        zeros = packing.unpack(zp, b, out_f, dim=0).float()  # [out, G]
    g_idx = local.pop("weight_g_idx", None)
    if g_idx is not None:
        check_dtype(f"{name}.weight_g_idx", g_idx, (torch.int32, torch.int64))
        check_shape(f"{name}.weight_g_idx", g_idx, (in_f,))
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise ValueError(f"{name}.weight_g_idx has groups outside [0, {n_groups}).")
        g_idx = g_idx.long()
    qw = QuantizedWeight(codes=packing.unpack_cols(packed, b, in_f), scales=scale.float(), zeros=zeros, spec=spec,
                         g_idx=g_idx, dtype=dtype)
    act = None if inputs is None else ActivationSpec(bits=inputs.get("num_bits", 8),
                                                     symmetric=inputs.get("symmetric", False))
    if inputs is not None and (inputs.get("strategy") != "token" or not inputs.get("dynamic")):
        raise ValueError(f"Only dynamic per-token input activations are supported, got {inputs}.")
    bias = local.pop("bias", None)
    return PackedLinear.from_quantized(qw, None if bias is None else bias.to(dtype), act_spec=act)


COMPRESSED_TENSORS = hf_format("compressed-tensors", LayerCodec(
    layer_type=PackedLinear, marker="weight_packed", encode=_encode, config=_config, decode=_decode,
    detect=lambda qc: qc.get("quant_method") == "compressed-tensors"))
