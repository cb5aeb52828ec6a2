"""Helpers for export tests: tiny models with packed layers (optionally act-order), ids, logits."""

from __future__ import annotations

import pytest
import torch

from lightning_quant import primitives as P
from lightning_quant.api import swap_in_packed
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import linear_weight, select_linears
from lightning_quant.testing import tiny_llama


def act_order_g_idx(in_f: int, spec: QuantSpec, seed: int) -> torch.Tensor:
    """The g_idx act-order GPTQ produces: columns taken in a permuted order, grouped in that order."""
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_f, dtype=torch.long)
    g_idx[perm] = torch.arange(in_f) // spec.effective_group_size(in_f)
    return g_idx


def quantize_packed(model: torch.nn.Module, spec: QuantSpec, act_order: bool = False) -> torch.nn.Module:
    """Min-max quantize every linear but lm_head (with a random act-order g_idx if asked) and pack it."""
    weights = {}
    for i, (name, m) in enumerate(select_linears(model).items()):
        w = linear_weight(m).detach()
        g_idx = act_order_g_idx(w.shape[1], spec, i) if act_order else None
        s, z = P.compute_qparams(w, spec, g_idx)
        weights[name] = QuantizedWeight.from_float(w, spec, s, z, g_idx=g_idx)
    swap_in_packed(model, weights)
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def packed_tiny(bits=4, group_size=32, symmetric=True, act_order=False, seed=0):
    return quantize_packed(tiny_llama(seed), QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric), act_order)


def mixed_tiny(seed: int = 0) -> torch.nn.Module:
    """Every layer setting at once: packed W4 g32 asym act-order layers, one of them with per-token activation
    quant and an explicit input scale, and an LLM.int8 layer (threshold 3)."""
    from lightning_quant.layers.int8 import Int8OutlierLinear
    from lightning_quant.layers.packed import PackedLinear
    from lightning_quant.spec import ActivationSpec
    from lightning_quant.targets import set_submodule

    model = quantize_packed(tiny_llama(seed), QuantSpec(bits=4, group_size=32, symmetric=False), act_order=True)
    up = model.model.layers[0].mlp.up_proj
    scale = torch.rand(up.in_features, generator=torch.Generator().manual_seed(seed)) + 0.5
    set_submodule(model, "model.layers.0.mlp.up_proj",
                  PackedLinear.from_quantized(up.to_quantized(), act_spec=ActivationSpec(), input_scale=scale))
    torch.manual_seed(seed)
    float_down = torch.nn.Linear(model.config.intermediate_size, model.config.hidden_size)
    set_submodule(model, "model.layers.1.mlp.down_proj", Int8OutlierLinear.from_linear(float_down, threshold=3.0))
    return model.eval()
