"""Grid-searched qparams (QParamSearch) in RTN and GPTQ, GPTQ's group-qparam source, and GPTQ against an
independent paper reference (tests/algorithms/reference_gptq.py), on real captured activations."""

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant import primitives as P
from lightning_quant.algorithms.gptq import GPTQConfig, gptq_quantize, output_error
from lightning_quant.algorithms.rtn import RTNConfig, rtn_quantize
from lightning_quant.spec import QParamSearch
from lightning_quant.targets import linear_weight
from tests.algorithms.reference_gptq import reference_gptq
from tests.algorithms.test_gptq import captured_inputs, hessian_of

SPECS = [QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False), QuantSpec(3, 32, symmetric=False)]


def _layers(model):
    targets, xs = captured_inputs(model)
    return [(n, linear_weight(m).detach().float(), hessian_of(xs[n])) for n, m in targets.items()]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("group_qparams", ["updated", "original"])
def test_gptq_equals_paper_reference_on_real_activations(tiny_model, spec, group_qparams):
    """The lazy-batch float32 solver == a dense float64 Algorithm 1 on the same Hessians, sym and asym
    (the asymmetric path was suspected in issue 15; it matches like the symmetric one)."""
    for name, w, h in _layers(tiny_model):
        ours = gptq_quantize(w, h, spec, GPTQConfig(group_qparams=group_qparams, qparam_search=None, act_order=False), name=name)
        ref = reference_gptq(w, h, spec.bits, spec.group_size, spec.symmetric, qparams=group_qparams).float()
        assert ours.loss == pytest.approx(output_error(w, ref, h), rel=2e-3), name
        same = (ours.dequantized == ref).float().mean().item()
        assert same > 0.97, (name, same)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 24, symmetric=False), QuantSpec(4, -1, symmetric=False)],
                         ids=str)
def test_search_never_worse_than_minmax_on_its_objective(spec):
    """``c = 1`` (min-max) is on the grid: per (row, group) the searched error is <= min-max's (atol 0)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 80, generator=g) * torch.linspace(0.2, 2, 80)
    x = torch.randn(300, 80, generator=g)
    h = hessian_of(x)
    gs = spec.effective_group_size(80)
    n_groups = spec.num_groups(80)

    def per_group(err):  # [out, in] -> [out, G]
        return torch.zeros(12, n_groups).index_add_(1, torch.arange(80) // gs, err)

    for search in (QParamSearch(steps=20, norm=2.4), QParamSearch(steps=20, objective="hessian")):
        clip = P.search_clip(w, spec, search, h)
        assert clip.shape == (12, n_groups) and torch.isin(clip, torch.tensor(search.ratios)).all()
        if search.objective == "weight":
            err = lambda c: per_group((w - P.fake_quantize_minmax(w, spec, c)).abs().pow(2.4))
            assert (err(clip) <= err(1.0)).all()
        else:
            for gi in range(n_groups):
                cols = slice(gi * gs, (gi + 1) * gs)
                d_s = (w - P.fake_quantize_minmax(w, spec, clip))[:, cols]
                d_1 = (w - P.fake_quantize_minmax(w, spec, 1.0))[:, cols]
                hb = h[cols, cols]
                assert ((d_s @ hb * d_s).sum(1) <= (d_1 @ hb * d_1).sum(1) * (1 + 1e-5) + 1e-12).all()
        assert (clip < 1).any()  # the search does move off min-max on these weights
    assert torch.equal(P.search_clip(w, spec, QParamSearch(steps=5, max_shrink=0.0)), torch.ones(12, n_groups))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_each_option_lowers_layer_output_error(tiny_model, spec):
    """Summed over the layers of each tiny model, with real captured inputs: RTN+search <= RTN,
    GPTQ+search (weight and Hessian objectives) <= GPTQ."""
    layers = _layers(tiny_model)

    def total(solve):
        return sum(output_error(w, solve(w, h, n), h) for n, w, h in layers)

    rtn = total(lambda w, h, n: rtn_quantize(w, spec, name=n).dequantize())
    rtn_mse = total(lambda w, h, n: rtn_quantize(w, spec, name=n, search=QParamSearch()).dequantize())
    gptq = total(lambda w, h, n: gptq_quantize(w, h, spec, GPTQConfig(qparam_search=None, act_order=False), n).dequantized)
    g_mse = total(lambda w, h, n: gptq_quantize(w, h, spec, GPTQConfig(qparam_search=QParamSearch(), act_order=False), n).dequantized)
    g_hess = total(lambda w, h, n: gptq_quantize(
        w, h, spec, GPTQConfig(qparam_search=QParamSearch(objective="hessian"), act_order=False), n).dequantized)
    assert rtn_mse <= rtn
    assert g_mse <= gptq and g_hess <= gptq
    assert gptq < rtn


def test_quantize_model_rtn_with_search_matches_per_layer(tiny_llama):
    spec = QuantSpec(4, 32, symmetric=False)
    search = QParamSearch(steps=10)
    w = linear_weight(tiny_llama.model.layers[0].mlp.down_proj).detach().clone()
    weights = quantize_model(tiny_llama, spec, "rtn", config=RTNConfig(qparam_search=search))
    expected = rtn_quantize(w, spec, search=search)
    got = weights["model.layers.0.mlp.down_proj"]
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scales, expected.scales)


def test_invalid_searches_and_combinations_raise():
    with pytest.raises(ValueError, match=r"max_shrink=1.0 must be in \[0, 1\)"):
        QParamSearch(max_shrink=1.0)
    with pytest.raises(ValueError, match="max_shrink=-0.1"):
        QParamSearch(max_shrink=-0.1)
    with pytest.raises(ValueError, match="steps=0 must be an int >= 1"):
        QParamSearch(steps=0)
    with pytest.raises(ValueError, match="norm=0 must be a finite number > 0"):
        QParamSearch(norm=0)
    with pytest.raises(ValueError, match="objective='l1' is not supported; use one of"):
        QParamSearch(objective="l1")
    with pytest.raises(ValueError, match="use objective='weight', or method='gptq'/'awq'"):
        RTNConfig(qparam_search=QParamSearch(objective="hessian"))
    with pytest.raises(TypeError, match="must be a lightning_quant.spec.QParamSearch"):
        RTNConfig(qparam_search=0.8)
    with pytest.raises(ValueError, match="pass either clip= or search="):
        rtn_quantize(torch.randn(4, 32), QuantSpec(4, 32), clip=0.9, search=QParamSearch())
    with pytest.raises(ValueError, match="needs the layer's Hessian"):
        P.search_clip(torch.randn(4, 32), QuantSpec(4, 32), QParamSearch(objective="hessian"))
    with pytest.raises(ValueError, match="group_qparams='first' is not supported; use one of"):
        GPTQConfig(group_qparams="first")
    with pytest.raises(TypeError, match="GPTQConfig.qparam_search must be"):
        GPTQConfig(qparam_search="mse")

