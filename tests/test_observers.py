import pytest
import torch

from lightning_quant import primitives as P
from lightning_quant.observers import (
    OBSERVERS,
    LearnableScaleObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    build_observer,
    register_observer,
)
from lightning_quant.spec import QuantSpec

SPECS = [QuantSpec(4, 32), QuantSpec(4, 40, symmetric=False), QuantSpec(8, -1)]


def _w(seed=0, shape=(12, 96)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_qparams_shapes_and_storable_scales(name, spec):
    w = _w()
    obs = build_observer(name, spec, w)
    scale, zero = obs.qparams(w)
    g = spec.num_groups(96)
    assert scale.shape == (12, g) and scale.dtype == torch.float32
    assert torch.equal(scale, scale.to(spec.torch_scale_dtype).float())  # exactly storable
    assert (zero is None) == spec.symmetric
    if zero is not None:
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= spec.qmax


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_minmax_is_rtn_qparams_and_tracks_last_weight(spec):
    w = _w()
    obs = MinMaxObserver(spec, w)
    ref = P.compute_qparams(w, spec)
    got = obs.qparams(w)
    assert torch.equal(got[0], ref[0]) and (ref[1] is None or torch.equal(got[1], ref[1]))
    w2 = 2 * w
    obs.qparams(w2)
    assert torch.equal(obs.scale, P.compute_qparams(w2, spec)[0])


def test_moving_average_is_the_ema_formula():
    spec = QuantSpec(4, 32, symmetric=False)
    w0, w1 = _w(0), _w(1)
    obs = MovingAverageObserver(spec, w0, momentum=0.75)
    lo0, hi0 = P.group_minmax(w0, spec)
    lo1, hi1 = P.group_minmax(w1, spec)
    obs.observe(w1)
    assert torch.equal(obs.lo, lo0 * 0.75 + 0.25 * lo1)
    assert torch.equal(obs.hi, hi0 * 0.75 + 0.25 * hi1)
    scale, zero = obs.qparams(w1)
    ref = P.qparams_from_minmax(obs.lo, obs.hi, spec)
    assert torch.equal(scale, ref[0]) and torch.equal(zero, ref[1])
    assert set(obs.state_dict()) == {"lo", "hi"}


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_mse_search_never_worse_than_minmax_per_group(spec):
    w = _w(3) ** 3  # heavy-tailed: clipping the range pays off in some groups
    obs = MSEObserver(spec, w)
    g_idx = P.default_group_index(96, spec)

    def group_err(scale, zero):
        err = (P.fake_quantize(w, scale, zero, spec) - w).pow(2)
        return torch.zeros(12, spec.num_groups(96)).index_add_(1, g_idx, err)

    mse, mm = group_err(*obs.qparams(w)), group_err(*P.compute_qparams(w, spec))
    assert (mse <= mm).all()
    clipped = obs.clip < 1.0
    assert (mse[clipped] < mm[clipped]).all()
    assert clipped.any() or spec.bits == 8  # at 4 bits heavy tails always get clipped somewhere
    assert "clip" in obs.state_dict()


def test_lsq_scale_is_a_parameter_with_scaled_ste_gradient():
    spec = QuantSpec(4, 32)
    w = _w()
    obs = LearnableScaleObserver(spec, w)
    assert isinstance(obs.scale, torch.nn.Parameter) and "scale" in obs.state_dict()
    scale, zero = obs.qparams(w)
    P.fake_quantize(w, scale, zero, spec).pow(2).sum().backward()
    # reference: the LSQ gradient of primitives' STE w.r.t. the (unscaled) scale, times g = 1/sqrt(N·Q_P)
    s_ref = obs.scale.detach().clone().requires_grad_(True)
    P.fake_quantize(w, s_ref, None, spec).pow(2).sum().backward()
    g = 1.0 / (32 * (spec.qmax - spec.midpoint)) ** 0.5
    torch.testing.assert_close(obs.scale.grad, s_ref.grad * g)
    assert obs.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_lsq_value_is_the_learned_scale_rounded_to_nearest(scale_dtype):
    spec = QuantSpec(4, 32, scale_dtype=scale_dtype)
    obs = LearnableScaleObserver(spec, _w())
    with torch.no_grad():  # a trained scale sits between storable values
        obs.scale.mul_(torch.linspace(0.7, 1.3, obs.scale.numel()).view_as(obs.scale))
    scale, _ = obs.qparams(_w())
    dt = spec.torch_scale_dtype
    assert torch.equal(scale, P.round_scale_nearest(obs.scale.detach(), spec))
    assert torch.equal(scale, obs.scale.detach().clamp_min(P.SCALE_EPS).to(dt).float())
    assert (scale < P.round_scale_up(obs.scale.detach(), spec)).any()  # not the min-max round-up


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="observer='ema' is not registered; use one of"):
        build_observer("ema", QuantSpec(4, 32), _w())
    with pytest.raises(TypeError, match="Observer subclass"):
        register_observer("x", dict)
    with pytest.raises(ValueError, match="momentum must be in"):
        MovingAverageObserver(QuantSpec(4, 32), _w(), momentum=1.0)
    with pytest.raises(ValueError, match="2-D"):
        MinMaxObserver(QuantSpec(4, 32), torch.zeros(3))
    with pytest.raises(ValueError, match="group_size=128 is larger"):
        MinMaxObserver(QuantSpec(4, 128), _w())


def test_register_observer_makes_a_name_available():
    class Half(MinMaxObserver):
        def qparams(self, w):
            return P.compute_qparams(w.detach(), self.spec, clip=0.5)

    register_observer("half_test", Half)
    try:
        obs = build_observer("half_test", QuantSpec(4, 32), _w())
        assert isinstance(obs, Observer)
        assert torch.equal(obs.qparams(_w())[0], P.compute_qparams(_w(), QuantSpec(4, 32), clip=0.5)[0])
    finally:
        del OBSERVERS["half_test"]
