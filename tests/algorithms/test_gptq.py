import copy

import pytest
import torch

from lightning_quant import testing
from lightning_quant.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, output_error
from lightning_quant.algorithms.rtn import rtn_quantize
from lightning_quant.calibration import run_sequential
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import linear_kind, linear_weight, select_linears


def captured_inputs(model, n_batches=4, seq_len=64):
    """Real inputs ``[tokens, in]`` of every linear of a float model."""
    targets = select_linears(model)
    xs = {n: [] for n in targets}

    def process(ctx):
        with ctx.hook_linears(ctx.linears(targets), lambda n, m, x, y: xs[n].append(x.clone())):
            ctx.forward()

    run_sequential(model, testing.random_token_batches(n_batches, seq_len, 2), process, progress=False)
    return targets, {n: torch.cat(v) for n, v in xs.items()}


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian()


def test_hessian_batchwise_equals_all_at_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g)
    acc = HessianAccumulator(24, name="layer")
    for part in x.split(37):
        acc.add(part)
    torch.testing.assert_close(acc.hessian(), (2 * x.double().t() @ x.double() / 300).float(), rtol=1e-6, atol=1e-7)
    assert float(acc.count) == 300
    with pytest.raises(ValueError, match="expected 24"):
        acc.add(torch.randn(3, 5))
    acc.add(torch.full((2, 24), float("nan")))
    with pytest.raises(ValueError, match="Hessian of layer \\(from its calibration inputs\\) contains"):
        acc.hessian()
    with pytest.raises(ValueError, match="saw no calibration tokens"):
        HessianAccumulator(4, name="l").hessian()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 32, symmetric=False), QuantSpec(4, -1)], ids=str)
def test_gptq_beats_rtn_on_real_activations(tiny_model, spec):
    targets, xs = captured_inputs(tiny_model)
    g_err, r_err = [], []
    for name, mod in targets.items():
        w = linear_weight(mod).detach()
        x = xs[name]
        res = gptq_quantize(w, hessian_of(x), spec, name=name)
        ref = x @ w.t()
        g_err.append(((ref - x @ res.qweight.dequantize().t()) ** 2).sum().item())
        r_err.append(((ref - x @ rtn_quantize(w, spec).dequantize().t()) ** 2).sum().item())
        assert g_err[-1] <= r_err[-1] * (1 + 1e-6), name
        # the reported loss is the mean per-token squared output error
        assert res.loss == pytest.approx(g_err[-1] / x.shape[0], rel=1e-3)
    assert sum(g_err) / sum(r_err) < 0.95


@pytest.mark.parametrize("static", [False, True])
def test_act_order_groups_and_permutation_round_trip(static):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 80, generator=g) * torch.linspace(0.1, 3, 80)  # distinct diag(H)
    w = torch.randn(24, 80, generator=g)
    h = hessian_of(x)
    spec = QuantSpec(4, 32, symmetric=False)  # 80 = 2 x 32 + 16: a partial last group
    res = gptq_quantize(w, h, spec, GPTQConfig(act_order=True, static_groups=static))
    qw = res.qweight
    assert torch.equal(qw.dequantize(torch.float32), res.dequantized)  # exact: same float32 ops
    perm = qw.perm
    assert torch.equal(perm, torch.argsort(h.diagonal(), descending=True, stable=True))
    assert torch.equal(torch.sort(perm).values, torch.arange(80))
    if static:
        assert qw.g_idx is None
    else:  # groups follow the processing order
        for gi in range(3):
            assert set(torch.nonzero(qw.g_idx == gi).flatten().tolist()) == set(perm[gi * 32 : gi * 32 + 32].tolist())
    back = PackedLinear.from_quantized(qw).to_quantized()
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(torch.float32), res.dequantized)
    xs = torch.randn(5, 80, generator=g)
    torch.testing.assert_close(PackedLinear.from_quantized(qw)(xs), xs @ res.dequantized.t(), rtol=1e-5, atol=1e-5)


def test_diagonal_hessian_reduces_to_rtn():
    """With uncorrelated inputs there is no error to feed back: GPTQ with min-max qparams == RTN exactly."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    h = torch.diag(torch.rand(64, generator=g) + 0.5)
    for spec in (QuantSpec(4, 16), QuantSpec(3, -1, symmetric=False)):
        res = gptq_quantize(w, h, spec, GPTQConfig(qparam_search=None))
        assert torch.equal(res.qweight.codes, rtn_quantize(w, spec).codes)


def test_dead_inputs_are_zeroed_and_finite():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 32, generator=g)
    x[:, [3, 17]] = 0
    w = torch.randn(8, 32, generator=g)
    res = gptq_quantize(w, hessian_of(x), QuantSpec(4, 16, symmetric=False), GPTQConfig(act_order=True))
    assert torch.isfinite(res.dequantized).all()
    assert torch.equal(res.dequantized[:, [3, 17]], torch.zeros(8, 2))
    assert not res.fallback


def test_singular_hessian_retries_then_falls_back_to_rtn():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    h = torch.ones(16, 16)  # rank 1: Cholesky fails without damping
    spec = QuantSpec(4, 8)
    res = gptq_quantize(w, h, spec, GPTQConfig(damp_percent=0.0, damp_retries=1))
    assert not res.fallback and res.damp == pytest.approx(0.01)
    with pytest.warns(RuntimeWarning, match=r"layer\.x was quantized with RTN.*Raise GPTQConfig\.damp_percent"):
        res = gptq_quantize(w, h, spec, GPTQConfig(damp_percent=0.0, damp_retries=0), name="layer.x")
    assert res.fallback and torch.equal(res.qweight.codes, rtn_quantize(w, spec).codes)
    assert res.loss == pytest.approx(output_error(w, res.dequantized, h))


def test_config_and_input_validation():
    with pytest.raises(ValueError, match=r"damp_percent=1.5 must be in \[0, 1\)"):
        GPTQConfig(damp_percent=1.5)
    with pytest.raises(ValueError, match="block_size=0 must be an int >= 1"):
        GPTQConfig(block_size=0)
    with pytest.raises(ValueError, match="static_groups=True only applies with act_order=True"):
        GPTQConfig(act_order=False, static_groups=True)
    with pytest.raises(TypeError, match="act_order must be True or False"):
        GPTQConfig(act_order=1)
    with pytest.raises(ValueError, match=r"need weight \[out, in\] and hessian \[in, in\]"):
        gptq_quantize(torch.randn(4, 8), torch.eye(4), QuantSpec(4, 8))
    with pytest.raises(ValueError, match="Hessian of w contains"):
        gptq_quantize(torch.randn(4, 8), torch.full((8, 8), float("nan")), QuantSpec(4, 8), name="w")
    with pytest.raises(ValueError, match="larger than the layer's in_features"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), QuantSpec(4, 16))


def test_default_is_act_order_with_static_groups():
    """The measured default (docs/benchmarks.md, issue 15): act-order with static groups, so no g_idx."""
    cfg = GPTQConfig()
    assert cfg.act_order is True and cfg.static_groups is True
    assert GPTQConfig(act_order=False).static_groups is False
    assert GPTQConfig(act_order=True, static_groups=False).static_groups is False
    w = torch.randn(16, 128)
    x = torch.randn(256, 128) * torch.linspace(0.1, 3.0, 128)  # distinct diag H: a real permutation
    res = gptq_quantize(w, 2 * x.T @ x / 256, QuantSpec(4, 32), cfg)
    assert res.qweight.perm is not None and res.qweight.g_idx is None and res.qweight.has_trivial_groups


def _paired_inputs(model, spec):
    """Per linear, ``(x_float, x)``: its inputs in the float model and in a copy whose linears all hold their
    RTN weights (the same tokens), as a sequentially quantized model feeds them."""
    targets, xf = captured_inputs(model)
    quant = copy.deepcopy(model)
    with torch.no_grad():
        for mod in select_linears(quant).values():
            linear_kind(mod).write_weight(mod, rtn_quantize(linear_weight(mod).detach(), spec).dequantize())
    _, xq = captured_inputs(quant)
    return targets, {n: (xf[n], xq[n]) for n in targets}


def test_cross_term_formula_and_errors():
    g = torch.Generator().manual_seed(0)
    x, xf = torch.randn(90, 12, generator=g), torch.randn(90, 12, generator=g)
    acc = HessianAccumulator(12, name="l", cross=True)
    for a, b in zip(x.split(31), xf.split(31)):
        acc.add(a, b)
    torch.testing.assert_close(acc.cross_term(), (2 * (xf - x).double().t() @ x.double() / 90).float(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"x_float is given exactly when .*HessianAccumulator\(cross=True\)"):
        acc.add(x)
    with pytest.raises(ValueError, match=r"x_float is given exactly when"):
        HessianAccumulator(12).add(x, xf)
    with pytest.raises(ValueError, match="do not pair with the quantized model's"):
        acc.add(x, xf[:5])
    with pytest.raises(ValueError, match="keeps no cross term; create it with cross=True"):
        HessianAccumulator(12, name="l").cross_term()
    with pytest.raises(ValueError, match=r"cross term must be \[in, in\] = \(12, 12\)"):
        gptq_quantize(torch.randn(4, 12), acc.hessian(), QuantSpec(4, 4), cross=torch.zeros(12, 4))
    with pytest.raises(TypeError, match="gptaq must be True or False"):
        GPTQConfig(gptaq=1)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"gptaq_alpha=.* must be in \(0, 1\]; 0.25 is GPTAQ's default"):
            GPTQConfig(gptaq=True, gptaq_alpha=bad)


def test_gptaq_with_a_zero_cross_term_is_gptq():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 64, generator=g), torch.randn(200, 64, generator=g)
    h = hessian_of(x)
    for cfg in (GPTQConfig(), GPTQConfig(act_order=False, qparam_search=None)):
        a, b = gptq_quantize(w, h, QuantSpec(4, 32), cfg), gptq_quantize(w, h, QuantSpec(4, 32), cfg, cross=torch.zeros(64, 64))
        assert torch.equal(a.qweight.codes, b.qweight.codes) and torch.equal(a.dequantized, b.dequantized)
        assert a.loss == b.loss


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 32, symmetric=False)], ids=str)
def test_gptaq_matches_float_outputs_better_on_real_activations(tiny_model, spec):
    """GPTAQ's objective: the float model's outputs ``W x_f`` from the quantized model's inputs ``x``. On real
    paired activations the full least-squares target (``gptaq_alpha=1``) lowers that error below GPTQ's
    (which fits ``W x``) for every layer, the default shrunk one (0.25) in total; where both streams are
    the same the results are identical."""
    targets, pairs = _paired_inputs(tiny_model, QuantSpec(3, 32, symmetric=False))
    errs = {"gptq": [], 1.0: [], 0.25: []}
    for name, mod in targets.items():
        w = linear_weight(mod).detach()
        xf, x = pairs[name]
        acc = HessianAccumulator(x.shape[1], cross=True)
        acc.add(x, xf)
        ref = xf @ w.t()
        plain = gptq_quantize(w, acc.hessian(), spec, name=name)
        errs["gptq"].append(((ref - x @ plain.dequantized.t()) ** 2).sum().item())
        for alpha in (1.0, 0.25):
            res = gptq_quantize(w, acc.hessian(), spec, GPTQConfig(gptaq=True, gptaq_alpha=alpha), name=name,
                                cross=acc.cross_term())
            errs[alpha].append(((ref - x @ res.dequantized.t()) ** 2).sum().item())
            if torch.equal(x, xf):
                assert torch.equal(plain.qweight.codes, res.qweight.codes), name
            elif alpha == 1.0:
                assert errs[alpha][-1] <= errs["gptq"][-1] * (1 + 1e-4), name
    assert sum(errs[1.0]) / sum(errs["gptq"]) < 0.95
    assert sum(errs[0.25]) / sum(errs["gptq"]) < 1.0
