"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers ``quant_method: "gptq"``).

Per quantized layer (``b`` bits, ``G = ceil(in / group_size)`` groups, Frantar et al. 2023):

* ``qweight`` int32 ``[ceil(in·b/32), out]`` — codes packed along the *input* dim, original column order;
* ``qzeros``  int32 ``[G, ceil(out·b/32)]`` — zero points packed along the *output* dim;
* ``scales``  float16 ``[G, out]``; ``g_idx`` int32 ``[in]`` (the group of each input column);
* ``bias`` (optional).

Dequantization: ``w[o, i] = (q[i, o] − z[g_idx[i], o]) · s[g_idx[i], o]``. ``checkpoint_format:
"gptq"`` (v1) stores ``z − 1`` (so an asymmetric zero of 0 cannot be stored: use ``gptq_v2``),
``"gptq_v2"`` stores ``z``. Symmetric layers store ``z = 2^(b−1)`` explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant import packing
from lightning_quant.export.hf import LayerCodec, check_plain, hf_format, take
from lightning_quant.export.io import check_dtype, check_shape
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec

__all__ = ["GPTQ_V1", "GPTQ_V2", "spec_from_config", "uniform_spec"]


def uniform_spec(layers: dict[str, nn.Module], fmt_name: str) -> QuantSpec:
    """The one :class:`QuantSpec` all layers share (a format's config holds one); raises otherwise."""
    specs = {n: layer.spec for n, layer in layers.items()}
    first_name, first = next(iter(specs.items()))
    for n, s in specs.items():
        if s != first:
            raise ValueError(f"Format {fmt_name!r} stores one quantization config, but layer {first_name!r} uses "
                             f"{first} and {n!r} uses {s}; quantize all layers with the same QuantSpec.")
    return first


def spec_from_config(bits, group_size, symmetric, fmt_name: str, scale_dtype: str = "float16") -> QuantSpec:
    try:
        return QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    except (ValueError, TypeError) as e:
        raise ValueError(f"The {fmt_name} quantization_config is not supported: {e}") from None


def _codec(version: str) -> LayerCodec:
    offset = 1 if version == "gptq" else 0

    def encode(name: str, layer: PackedLinear) -> dict[str, Tensor]:
        check_plain(name, layer, version)
        qw = layer.to_quantized()
        spec = qw.spec
        if spec.scale_dtype != "float16":
            raise ValueError(f"GPTQ stores float16 scales but layer {name!r} has scale_dtype={spec.scale_dtype!r}; "
                             "quantize with QuantSpec(scale_dtype='float16').")
        zeros = qw.zeros_or_midpoint()  # [out, G]
        if offset and bool((zeros < offset).any()):
            raise ValueError(f"Layer {name!r} has asymmetric zero points equal to 0, which checkpoint_format 'gptq' "
                             "(v1, stores zero - 1) cannot hold; use format='gptq_v2'.")
        out = {
            "qweight": packing.pack_rows(qw.codes.t(), spec.bits),  # [out, in] -> [in, out] -> [in·b/32, out]
            "qzeros": packing.pack_cols((zeros - offset).t().to(torch.uint8), spec.bits),  # [G, out·b/32]
            "scales": qw.scales.t().to(torch.float16).contiguous(),  # [G, out]
            "g_idx": qw.group_index().to(torch.int32),
        }
        if layer.bias is not None:
            out["bias"] = layer.bias.detach()
        return out

    def config(layers: dict[str, nn.Module], model: nn.Module) -> dict:
        spec = uniform_spec(layers, version)
        return {"quant_method": "gptq", "checkpoint_format": version, "bits": spec.bits,
                "group_size": spec.group_size, "sym": spec.symmetric,
                "desc_act": any(layer.perm is not None for layer in layers.values()), "static_groups": False}

    def decode(name: str, local: dict, shape: tuple[int, int], qc: dict, dtype: torch.dtype) -> nn.Module:
        out_f, in_f = shape
        spec = spec_from_config(qc.get("bits"), qc.get("group_size"), qc.get("sym", True), version)
        b, n_groups = spec.bits, spec.num_groups(in_f)
        tensors = {k: take(local, k, name) for k in ("qweight", "qzeros", "scales")}
        g_idx = local.pop("g_idx", None)
        for k, t in tensors.items():
            check_dtype(f"{name}.{k}", t, (torch.float16,) if k == "scales" else (torch.int32,))
        check_shape(f"{name}.qweight", tensors["qweight"], (packing.packed_len(in_f, b), out_f))
        check_shape(f"{name}.qzeros", tensors["qzeros"], (n_groups, packing.packed_len(out_f, b)))
        check_shape(f"{name}.scales", tensors["scales"], (n_groups, out_f))
        codes = packing.unpack_rows(tensors["qweight"], b, in_f).t()  # [in, out] -> [out, in]
        zeros = packing.unpack_cols(tensors["qzeros"], b, out_f).t().float() + offset  # [out, G]
        if bool((zeros > spec.qmax).any()):
            raise ValueError(f"{name}.qzeros holds zero points above {spec.qmax} after the v1 '+1'; "
                             "the file is corrupted or was written as gptq_v2.")
        if spec.symmetric:
            if not bool((zeros == spec.midpoint).all()):
                raise ValueError(f"{name}.qzeros are not all {spec.midpoint} although the config says sym=true.")
            zeros = None
        g = None
        if g_idx is not None:
            check_dtype(f"{name}.g_idx", g_idx, (torch.int32, torch.int64))
            check_shape(f"{name}.g_idx", g_idx, (in_f,))
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
                raise ValueError(f"{name}.g_idx has groups outside [0, {n_groups}).")
            default = torch.arange(in_f) // spec.effective_group_size(in_f)
            g = None if torch.equal(g_idx.long(), default) else g_idx.long()
        qw = QuantizedWeight(codes=codes.contiguous(), scales=tensors["scales"].t().float(), zeros=zeros,
                             spec=spec, g_idx=g, dtype=dtype)
        bias = local.pop("bias", None)
        return PackedLinear.from_quantized(qw, None if bias is None else bias.to(dtype))

    def detect(qc: dict) -> bool:
        return qc.get("quant_method") == "gptq" and qc.get("checkpoint_format", "gptq") == version

    def extra_files(qc: dict) -> dict[str, dict]:
        return {"quantize_config.json": dict(qc)}  # AutoGPTQ reads this file

    return LayerCodec(layer_type=PackedLinear, marker="qweight", encode=encode, config=config, decode=decode,
                      detect=detect, extra_files=extra_files)


GPTQ_V1 = hf_format("gptq", _codec("gptq"))
GPTQ_V2 = hf_format("gptq_v2", _codec("gptq_v2"))
