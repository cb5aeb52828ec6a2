"""ONNX export: onnxruntime (CPU) runs the model with packed MatMulNBits weights and matches our logits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_quant import export
from lightning_quant.export.onnx import matmulnbits_operands
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import QuantSpec
from lightning_quant.testing import tiny_llama
from tests.export.conftest import packed_tiny, quantize_packed

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _save(model, path, graph="logits"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export.save(model, path, "onnx", options={"graph": graph})


@pytest.mark.parametrize("graph", ["logits", "generation"])
@pytest.mark.parametrize("bits,group_size,symmetric,act_order",
                         [(4, 32, True, False), (4, 64, False, True), (8, -1, True, False), (2, 16, False, False)])
def test_onnxruntime_matches_logits(tmp_path, bits, group_size, symmetric, act_order, graph):
    model = packed_tiny(bits, group_size, symmetric, act_order)
    _save(model, tmp_path / "m", graph)
    proto = onnx.load(str(tmp_path / "m" / "model.onnx")).graph
    n_packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    assert sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in proto.node) == n_packed
    # float matrices: embeddings + the unquantized lm_head (+ the generation graph's scales and rotary tables),
    # never a float copy of a packed weight
    big_float = [i.name for i in proto.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                 and ".scales" not in i.name and not i.name.startswith(("cos_cache", "sin_cache"))]
    assert len(big_float) == 2, big_float
    runner = export.load(tmp_path / "m")
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))  # other shape than traced
    mask = torch.ones_like(ids)
    torch.testing.assert_close(runner(ids, mask).logits, model(input_ids=ids, attention_mask=mask).logits,
                               rtol=0, atol=1e-4)


def test_operands_follow_matmulnbits_layout():
    """Decode B / scales / zero_points as onnxruntime documents them and compare with our weight."""
    layer = packed_tiny(4, 32, False).model.layers[0].mlp.down_proj  # K=160, 5 blocks
    ops = matmulnbits_operands(layer)
    n, k, bs = ops["N"], ops["K"], ops["block_size"]
    b = ops["B"].numpy().astype(np.int64)  # [N, nb, bs/2]
    q = np.stack([b & 0xF, b >> 4], -1).reshape(n, -1)[:, :k]  # low nibble first
    zp = ops["zero_points"].numpy().astype(np.int64).reshape(n, -1)
    z = np.stack([zp & 0xF, zp >> 4], -1).reshape(n, -1)[:, : k // bs]
    s = ops["scales"].numpy().reshape(n, -1)
    g = np.arange(k) // bs
    np.testing.assert_array_equal(((q - z[:, g]) * s[:, g]).astype(np.float32), layer.dequantize().numpy())


def test_unsupported_bits_and_group_raise(tmp_path):
    with pytest.raises(ValueError, match="bits=3.*'gptq' or 'compressed-tensors'"):
        export.save(packed_tiny(3, 32, True), tmp_path / "a", "onnx")
    with pytest.raises(ValueError, match="power-of-two group size >= 16.*group_size=48"):
        export.save(quantize_packed(tiny_llama(), QuantSpec(4, 48, True)), tmp_path / "b", "onnx")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
