"""AWQ GEMM checkpoints (AutoAWQ, transformers ``quant_method: "awq"``, ``version: "gemm"``).

Per layer (4-bit only, ``G = in / group_size`` — AWQ cannot hold a partial last group; Lin et al. 2024):

* ``qweight`` int32 ``[in, out/8]`` — codes packed along the *output* dim in AWQ's interleaved
  nibble order (slot ``i`` of a word holds column ``8·c + [0, 2, 4, 6, 1, 3, 5, 7][i]``);
* ``qzeros``  int32 ``[G, out/8]`` — zero points, same packing, stored as is;
* ``scales``  float16 ``[G, out]``; ``bias`` optional. No ``g_idx``: act-order cannot be stored.

``w[o, i] = (q[i, o] − z[i // gs, o]) · s[i // gs, o]``. Symmetric layers are written with their
implicit zero ``8`` stored explicitly (``zero_point: true``); a layer whose zeros are all 8 reads
back as symmetric (numerically identical).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant import packing
from lightning_quant.export.gptq import spec_from_config, uniform_spec
from lightning_quant.export.hf import LayerCodec, check_plain, hf_format, take
from lightning_quant.export.io import check_dtype, check_shape
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import is_linear_like

__all__ = ["AWQ", "valid_group_sizes"]


def valid_group_sizes(in_features: int) -> list[int]:
    """Group sizes (powers of two from 16) that divide ``in_features`` — what AWQ GEMM can hold."""
    return [g for g in (16, 32, 64, 128, 256, 512) if g <= in_features and in_features % g == 0]


def check_awq_spec(spec: QuantSpec, in_f: int, out_f: int, name: str) -> int:
    """Raise unless AWQ GEMM can hold ``spec`` for an ``[out_f, in_f]`` layer; returns the group size."""
    if spec.bits != 4:
        raise ValueError(f"AWQ GEMM stores 4-bit weights only, but layer {name!r} has bits={spec.bits}; "
                         "use format='gptq' or 'compressed-tensors' for other widths.")
    gs = spec.group_size
    if gs == -1 or in_f % gs:
        raise ValueError(f"AWQ GEMM needs in_features % group_size == 0, but layer {name!r} has in_features={in_f} "
                         f"and group_size={gs}; use one of {valid_group_sizes(in_f)} or format='gptq' / "
                         "'compressed-tensors' (which hold a partial last group).")
    if out_f % 8:
        raise ValueError(f"AWQ GEMM needs out_features divisible by 8, layer {name!r} has {out_f}.")
    return gs


def _encode(name: str, layer: PackedLinear) -> dict[str, Tensor]:
    check_plain(name, layer, "awq")
    if layer.perm is not None:
        raise ValueError(f"Layer {name!r} uses act-order groups (g_idx), which AWQ cannot store; "
                         "export as 'gptq' or 'compressed-tensors', or quantize without act_order.")
    qw = layer.to_quantized()
    check_awq_spec(qw.spec, qw.in_features, qw.out_features, name)
    if qw.spec.scale_dtype != "float16":
        raise ValueError(f"AWQ stores float16 scales but layer {name!r} has scale_dtype={qw.spec.scale_dtype!r}; "
                         "quantize with QuantSpec(scale_dtype='float16').")
    zeros = qw.zeros_or_midpoint()  # [out, G]
    out = {
        "qweight": packing.pack_awq(qw.codes.t().contiguous()),  # [out, in] -> [in, out] -> [in, out/8]
        "qzeros": packing.pack_awq(zeros.t().to(torch.uint8).contiguous()),  # [G, out/8]
        "scales": qw.scales.t().to(torch.float16).contiguous(),  # [G, out]
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def _config(layers: dict[str, nn.Module], model: nn.Module) -> dict:
    spec = uniform_spec(layers, "awq")
    skipped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if n and is_linear_like(m) and n not in layers})
    return {"quant_method": "awq", "bits": spec.bits, "group_size": spec.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": skipped or None}


def _decode(name: str, local: dict, shape: tuple[int, int], qc: dict, dtype: torch.dtype) -> nn.Module:
    out_f, in_f = shape
    if str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"Only AWQ version 'gemm' is supported, the config says {qc.get('version')!r}.")
    spec = spec_from_config(qc.get("bits"), qc.get("group_size"), False, "awq")
    gs = check_awq_spec(spec, in_f, out_f, name)
    tensors = {k: take(local, k, name) for k in ("qweight", "qzeros", "scales")}
    for k, t in tensors.items():
        check_dtype(f"{name}.{k}", t, (torch.float16,) if k == "scales" else (torch.int32,))
    check_shape(f"{name}.qweight", tensors["qweight"], (in_f, out_f // 8))
    check_shape(f"{name}.qzeros", tensors["qzeros"], (in_f // gs, out_f // 8))
    check_shape(f"{name}.scales", tensors["scales"], (in_f // gs, out_f))
    codes = packing.unpack_awq(tensors["qweight"], out_f).t()  # [in, out] -> [out, in]
    zeros = packing.unpack_awq(tensors["qzeros"], out_f).t().float()  # [out, G]
    if bool((zeros == spec.midpoint).all()):
        spec, zeros = QuantSpec(bits=4, group_size=gs, symmetric=True), None
    qw = QuantizedWeight(codes=codes.contiguous(), scales=tensors["scales"].t().float(), zeros=zeros,
                         spec=spec, dtype=dtype)
    bias = local.pop("bias", None)
    return PackedLinear.from_quantized(qw, None if bias is None else bias.to(dtype))


AWQ = hf_format("awq", LayerCodec(layer_type=PackedLinear, marker="qweight", encode=_encode, config=_config,
                                  decode=_decode, detect=lambda qc: qc.get("quant_method") == "awq"))
