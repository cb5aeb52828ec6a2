"""``MethodResult``: the typed result every method returns and every swap receives."""

import dataclasses

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.methods.registry import METHODS, MethodResult, register_method

SPEC = QuantSpec(4, 32)


def _weights(*names):
    return {n: rtn_quantize(torch.randn(8, 64), SPEC) for n in names}


def test_result_reads_as_a_mapping_of_weights_and_keeps_layers_and_figures_apart():
    w = _weights("a", "b")
    r = MethodResult(w, layers={"a": "data-a"}, figures={"a": {"loss": 1.5, "fallback": False}, "b": {"loss": 2.0}})
    assert list(r) == ["a", "b"] and len(r) == 2 and r["a"] is w["a"] and dict(r.items()) == w
    sub = r.subset(["b"])
    assert list(sub) == ["b"] and sub.layers == {} and sub.figures == {"b": {"loss": 2.0}}
    assert r.log_figures("gptq") == {"gptq/a/loss": 1.5, "gptq/b/loss": 2.0}  # bool flags are not metrics
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.weights = {}


def test_result_refuses_data_for_layers_it_did_not_convert_and_non_numeric_figures():
    with pytest.raises(ValueError, match=r"MethodResult.layers names layer\(s\) \['x'\] that have no weight"):
        MethodResult(_weights("a"), layers={"x": 1})
    with pytest.raises(ValueError, match=r"MethodResult.figures names layer\(s\) \['x'\]"):
        MethodResult(_weights("a"), figures={"x": {"loss": 1.0}})
    with pytest.raises(TypeError, match=r"MethodResult.figures\['a'\] must hold numbers"):
        MethodResult(_weights("a"), figures={"a": {"note": "text"}})


def test_quantize_model_refuses_a_method_that_returns_a_plain_dict(tiny_llama):
    def plain(model, targets, spec, calibration, config):
        return {n: rtn_quantize(m.weight.detach(), spec) for n, m in targets.items()}

    register_method("plain-dict", plain, needs_calibration=False)
    try:
        with pytest.raises(TypeError, match="returns a lightning_quant.methods.MethodResult"):
            quantize_model(tiny_llama, SPEC, "plain-dict")
    finally:
        METHODS.pop("plain-dict")


def test_the_swap_receives_the_whole_result(tiny_llama):
    seen = {}

    def method(model, targets, spec, calibration, config):
        return MethodResult({n: rtn_quantize(m.weight.detach(), spec) for n, m in targets.items()},
                            layers={n: len(n) for n in targets})

    def swap(model, result):
        seen.update(result.layers)
        return {}

    register_method("with-data", method, needs_calibration=False, swap=swap)
    try:
        result = quantize_model(tiny_llama, SPEC, "with-data", include=["mlp.up_proj"])
    finally:
        METHODS.pop("with-data")
    assert seen == {n: len(n) for n in result} and len(seen) == 2


def test_float_figures_drop_bool_flags():
    r = MethodResult(_weights("a"), figures={"a": {"loss": 2, "fallback": True}})
    assert r.float_figures() == {"a": {"loss": 2.0}} and isinstance(r.float_figures()["a"]["loss"], float)
