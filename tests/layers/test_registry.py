"""Layer kinds register themselves: layer_config -> layer_from_config -> load_state_dict rebuilds each layer."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_quant import QuantSpec
from lightning_quant import primitives as P
from lightning_quant.algorithms import rtn_quantize
from lightning_quant.layers import registry
from lightning_quant.layers.int8 import Int8OutlierLinear
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.layers.registry import (
    is_quantized_layer,
    layer_config,
    layer_from_config,
    layer_kinds,
    quantized_layer_types,
    quantized_layers,
    register_layer,
)
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.spec import ActivationSpec


def _act_order_weight(w: torch.Tensor, spec: QuantSpec, seed: int = 0) -> QuantizedWeight:
    in_f = w.shape[1]
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_f, dtype=torch.long)
    g_idx[perm] = torch.arange(in_f) // spec.effective_group_size(in_f)
    scale, zero = P.compute_qparams(w, spec, g_idx)
    return QuantizedWeight.from_float(w, spec, scale, zero, g_idx=g_idx)


def _packed(symmetric: bool, act_order: bool, act_spec: bool, input_scale: bool, dtype=torch.float32) -> PackedLinear:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    spec = QuantSpec(4, 32, symmetric=symmetric)
    qw = _act_order_weight(w, spec) if act_order else rtn_quantize(w, spec)
    qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.spec, g_idx=qw.g_idx, dtype=dtype)
    return PackedLinear.from_quantized(qw, b.to(dtype), act_spec=ActivationSpec() if act_spec else None,
                                       input_scale=(torch.rand(64, generator=g) + 0.5).to(dtype) if input_scale else None)


def _rebuilt(layer: nn.Module) -> nn.Module:
    cfg = json.loads(json.dumps(layer_config(layer)))  # plain JSON: survives a round trip through text
    empty = layer_from_config(cfg)
    assert type(empty) is type(layer) and layer_config(empty) == cfg
    empty.load_state_dict(layer.state_dict())
    return empty


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["", "act_order"])
@pytest.mark.parametrize("act_spec", [False, True], ids=["", "act_spec"])
@pytest.mark.parametrize("input_scale", [False, True], ids=["", "input_scale"])
def test_packed_layer_rebuilds_from_its_config(symmetric, act_order, act_spec, input_scale):
    layer = _packed(symmetric, act_order, act_spec, input_scale)
    cfg = layer_config(layer)
    assert cfg["kind"] == "packed" and cfg["act_order"] is act_order and cfg["input_scale"] is input_scale
    assert cfg["act_spec"] == (ActivationSpec().to_dict() if act_spec else None)
    back = _rebuilt(layer)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(back(x), layer(x))
    assert back.act_spec == layer.act_spec and back.spec == layer.spec


def test_packed_config_keeps_the_compute_dtype():
    layer = _packed(True, False, False, True, dtype=torch.bfloat16)
    assert layer_config(layer)["dtype"] == "bfloat16"
    back = _rebuilt(layer)
    assert back.compute_dtype == torch.bfloat16 and back.bias.dtype == torch.bfloat16
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(back(x), layer(x))


@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_rebuilds_from_its_config(bias):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 24, bias=bias)
    layer = Int8OutlierLinear.from_linear(lin, threshold=2.5)
    cfg = layer_config(layer)
    assert cfg == {"kind": "int8", "in_features": 64, "out_features": 24, "bias": bias, "dtype": "float32",
                   "threshold": 2.5}
    back = _rebuilt(layer)
    assert back.threshold == 2.5
    x = torch.randn(2, 7, 64, generator=g) * 2
    assert torch.equal(back(x), layer(x))


def test_todays_manifest_entries_load():
    """Entries exactly as QuantizedCheckpointIO wrote them before the registry (keys, order, spelling)."""
    packed = {"in_features": 64, "out_features": 24, "bias": True, "dtype": "float32", "kind": "packed",
              "spec": {"bits": 4, "group_size": 32, "symmetric": False, "scale_dtype": "float16"}, "act_order": True,
              "act_spec": {"bits": 8, "symmetric": False, "granularity": "per_token"}, "input_scale": True}
    int8 = {"in_features": 64, "out_features": 24, "bias": False, "dtype": "float16", "kind": "int8", "threshold": 6.0}
    layer = layer_from_config(packed)
    assert isinstance(layer, PackedLinear) and layer.perm is not None and layer.input_scale is not None
    assert layer.act_spec == ActivationSpec() and layer.spec == QuantSpec(4, 32, symmetric=False)
    assert layer_config(layer) == packed
    ref = _packed(False, True, True, True)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), ref(x))
    i8 = layer_from_config(int8)
    assert isinstance(i8, Int8OutlierLinear) and i8.compute_dtype == torch.float16 and layer_config(i8) == int8


def test_registry_lists_and_finds_the_builtin_kinds():
    kinds = layer_kinds()
    assert kinds["packed"] is PackedLinear and kinds["int8"] is Int8OutlierLinear
    assert set(quantized_layer_types()) >= {PackedLinear, Int8OutlierLinear}
    assert PackedLinear.layer_kind == "packed" and Int8OutlierLinear.layer_kind == "int8"
    model = nn.Sequential(nn.Linear(64, 64), _packed(True, False, False, False),
                          Int8OutlierLinear.from_linear(nn.Linear(24, 8)))
    assert list(quantized_layers(model)) == ["1", "2"]
    assert not is_quantized_layer(model[0]) and is_quantized_layer(model[1])


def test_unknown_or_malformed_configs_raise_naming_the_fix():
    with pytest.raises(ValueError, match=r"Unknown layer kind 'nf4'; known kinds: \['int8', 'packed'\]"):
        layer_from_config({"kind": "nf4", "in_features": 8, "out_features": 8})
    with pytest.raises(ValueError, match=r"Unknown layer kind None; known kinds"):
        layer_from_config({"in_features": 8, "out_features": 8})
    with pytest.raises(TypeError, match="A layer config is a dict with a 'kind' key"):
        layer_from_config(["packed"])
    with pytest.raises(ValueError, match=r"kind 'packed' lacks \['spec'\] and has unknown keys \['group'\]"):
        layer_from_config({"kind": "packed", "in_features": 8, "out_features": 8, "group": 32})
    with pytest.raises(ValueError, match=r"dtype 'fp16' is not a floating torch dtype"):
        layer_from_config({"kind": "int8", "in_features": 8, "out_features": 8, "dtype": "fp16"})
    with pytest.raises(ValueError, match=r"dtype 'int8' is not a floating torch dtype"):
        layer_from_config({"kind": "int8", "in_features": 8, "out_features": 8, "dtype": "int8"})
    with pytest.raises(TypeError, match="Linear is not a registered quantized layer.*register_layer"):
        layer_config(nn.Linear(4, 4))


def test_register_layer_checks_the_class_and_the_name(monkeypatch):
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))

    @register_layer("toy")
    class Toy(nn.Module):
        def layer_config(self):
            return {"n": 3}

        @classmethod
        def from_config(cls, cfg, device=None):
            return cls()

    assert layer_config(Toy()) == {"kind": "toy", "n": 3} and isinstance(layer_from_config({"kind": "toy"}), Toy)
    assert Toy in quantized_layer_types()
    with pytest.raises(TypeError, match=r"needs NoConfig to define \['layer_config', 'from_config'\]"):
        register_layer("noconfig")(type("NoConfig", (nn.Module,), {}))
    with pytest.raises(ValueError, match="Layer kind 'packed' is already registered by lightning_quant.layers.packed"):
        register_layer("packed")(Toy)
    with pytest.raises(ValueError, match="A layer kind is a non-empty name"):
        register_layer(" ")

    @register_layer("kindful")
    class Kindful(Toy):
        def layer_config(self):
            return {"kind": "x"}

    with pytest.raises(ValueError, match=r"must not set 'kind' \(the registry adds 'kindful'\)"):
        layer_config(Kindful())


def test_the_registry_imports_nothing_above_layers():
    """It sits under every serialiser: stdlib, torch, spec and layers/ only (so plugins/export/cli can use it)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(registry.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    ours = [n for n in names if n.startswith("lightning_quant")]
    assert all(n == "lightning_quant.spec" or n.startswith("lightning_quant.layers") for n in ours), ours
    assert registry._BUILTIN_MODULES == ("lightning_quant.layers.packed", "lightning_quant.layers.int8")
