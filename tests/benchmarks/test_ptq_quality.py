"""The llm-compressor rows' sanity check in benchmarks/ptq_quality.py: weights must lie on a per-group grid."""

import sys
from pathlib import Path

import pytest
import torch

from lightning_quant import QuantSpec
from lightning_quant.algorithms import rtn_quantize


def _load(*names):
    """Import the script with benchmarks/ on sys.path (it imports its sibling peak_memory), then take
    the folder off again: benchmarks/kernels.py must not shadow the ``kernels`` package transformers probes."""
    folder = str(Path(__file__).parents[2] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        import ptq_quality
    finally:
        sys.path.remove(folder)
    return [getattr(ptq_quality, n) for n in names]


check_on_grid, VARIANTS, ROTATED, variant_config, row_rotation = _load("check_on_grid", "VARIANTS", "ROTATED",
                                                                       "variant_config", "row_rotation")


def test_every_method_row_builds_a_registered_method_and_config():
    from lightning_quant.algorithms.gptq import GPTQConfig
    from lightning_quant.methods.registry import get_method

    base = GPTQConfig(true_sequential=False)
    for name in VARIANTS:
        method, config = variant_config(name, base)
        m = get_method(method)
        assert config is None or isinstance(config, m.config_type), name
        if isinstance(config, GPTQConfig):
            assert config.true_sequential is False, name  # the command line's GPTQ base is kept
    with pytest.raises(SystemExit, match="unknown --methods entry 'gptq-mse'"):
        variant_config("gptq-mse", base)


def test_rotated_rows_are_their_base_row_with_a_rotation():
    from lightning_quant import Rotation
    from lightning_quant.algorithms.gptq import GPTQConfig

    base = GPTQConfig(true_sequential=False)
    assert set(ROTATED) >= {"rtn+rot", "gptq+rot", "awq+gptq+rot"}
    for name, (row, rotation) in ROTATED.items():
        assert row in VARIANTS and variant_config(name, base) == variant_config(row, base), name
        assert row_rotation(name) == rotation == Rotation("hadamard", seed=0)
        assert row_rotation(row) is None


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False), QuantSpec(3, -1)], ids=str)
def test_quantized_weights_pass_and_float_weights_fail(spec):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    check_on_grid(rtn_quantize(w, spec).dequantize(), spec.bits, spec.group_size)
    with pytest.raises(ValueError, match=r"holds \d+ distinct values, more than 2\*\*\d; these weights are not"):
        check_on_grid(w, spec.bits, spec.group_size, "w")


def test_shape_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match=r"is not \[out, in\] with in divisible by group size 64"):
        check_on_grid(torch.zeros(4, 96), 4, 64)
