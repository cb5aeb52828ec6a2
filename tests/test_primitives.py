import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant import QuantSpec
from lightning_quant import primitives as P
from lightning_quant.spec import ActivationSpec

specs = st.builds(
    QuantSpec,
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 8, 16, 24]),
    symmetric=st.booleans(),
)


def _weight(seed, out_f, in_f, scale=1.0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), out_f=st.integers(1, 9), in_f=st.integers(24, 70))
def test_roundtrip_error_bounded_by_half_scale(spec, seed, out_f, in_f):
    w = _weight(seed, out_f, in_f)
    scale, zero = P.compute_qparams(w, spec)
    codes = P.quantize(w, scale, zero, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= spec.qmax
    deq = P.dequantize(codes, scale, zero, spec)
    s_full = P.expand_groups(scale, P.default_group_index(in_f, spec))
    # min-max ranges contain every value, so only rounding error remains (+ float32 slack)
    assert ((deq - w).abs() <= s_full / 2 * (1 + 1e-5) + 1e-7).all()


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), in_f=st.integers(24, 70))
def test_fake_quantize_equals_dequantize_quantize_exactly(spec, seed, in_f):
    w = _weight(seed, 5, in_f, scale=0.05)
    scale, zero = P.compute_qparams(w, spec)
    fq = P.fake_quantize(w, scale, zero, spec)
    ref = P.dequantize(P.quantize(w, scale, zero, spec), scale, zero, spec)
    assert torch.equal(fq, ref)


def test_fake_quantize_gradient_is_identity_inside_clamp_range():
    spec = QuantSpec(4, 16)
    w = _weight(0, 4, 32)
    scale, zero = P.compute_qparams(w, spec)
    x = (w * 1.5).requires_grad_()  # some values now fall outside the representable range
    P.fake_quantize(x, scale, zero, spec).backward(torch.ones_like(x))
    s = P.expand_groups(scale, P.default_group_index(32, spec))
    raw = torch.round(x.detach() / s) + spec.midpoint
    inside = (raw >= 0) & (raw <= spec.qmax)
    assert 0 < int(inside.sum()) < inside.numel()
    assert torch.equal(x.grad, inside.float())


def test_lsq_scale_gradient_matches_formula():
    spec = QuantSpec(4, 8, symmetric=False)
    w = _weight(1, 3, 16)
    scale, zero = P.compute_qparams(w, spec)
    scale = (scale * 0.8).requires_grad_()  # shrink so that some codes clamp
    x = w.clone()
    g = torch.randn_like(x)
    P.fake_quantize(x, scale, zero, spec).backward(g)
    s = P.expand_groups(scale.detach(), P.default_group_index(16, spec))
    z = P.expand_groups(zero, P.default_group_index(16, spec))
    raw = torch.round(x / s) + z
    q = raw.clamp(0, spec.qmax)
    inside = (raw >= 0) & (raw <= spec.qmax)
    per_elem = torch.where(inside, (q - z) - x / s, q - z) * g
    expected = per_elem.view(3, 2, 8).sum(-1)
    torch.testing.assert_close(scale.grad, expected, rtol=1e-5, atol=1e-6)


def test_symmetric_scale_convention_matches_gptq_and_compressed_tensors():
    w = torch.tensor([[-3.0, 1.0, 0.5, 2.0]])
    scale, zero = P.compute_qparams(w, QuantSpec(4, -1, scale_dtype="float32"))
    assert zero is None
    assert scale.item() == pytest.approx(3.0 / 7.5)
    codes = P.quantize(w, scale, None, QuantSpec(4, -1, scale_dtype="float32"))
    assert codes.tolist() == [[0, 10, 9, 13]]  # round(w/s) + 8 = [-7.5->-8, 2.5->2, 1.25->1, 5] + 8


def test_asymmetric_zero_point_is_integer_and_range_contains_zero():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: the range is widened to [0, 4]
    spec = QuantSpec(4, -1, symmetric=False, scale_dtype="float32")
    scale, zero = P.compute_qparams(w, spec)
    assert scale.item() == pytest.approx(4.0 / 15) and zero.item() == 0.0


def test_partial_last_group_has_its_own_scale():
    spec = QuantSpec(4, 4, scale_dtype="float32")
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 10.0, 10.0]])  # groups [0:4], [4:6]
    scale, _ = P.compute_qparams(w, spec)
    assert scale.shape == (1, 2)
    torch.testing.assert_close(scale, torch.tensor([[2 / 15, 20 / 15]]))


def test_scales_rounded_to_storage_dtype_and_never_zero():
    w = torch.zeros(2, 16)
    w[0, 3] = 0.123456789
    scale, _ = P.compute_qparams(w, QuantSpec(4, 8))
    assert torch.equal(scale, scale.half().float())
    assert (scale > 0).all()
    codes = P.quantize(w, scale, None, QuantSpec(4, 8))
    assert torch.isfinite(P.dequantize(codes, scale, None, QuantSpec(4, 8))).all()


def test_act_order_group_index():
    spec = QuantSpec(4, 2, scale_dtype="float32")
    w = torch.tensor([[1.0, 8.0, 2.0, 16.0]])
    g_idx = torch.tensor([0, 1, 0, 1])  # columns {0, 2} and {1, 3}
    scale, _ = P.compute_qparams(w, spec, g_idx)
    torch.testing.assert_close(scale, torch.tensor([[4 / 15, 32 / 15]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite(bad):
    w = torch.ones(2, 4)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="layer.q contains 1 NaN/Inf value\\(s\\).*Check the checkpoint"):
        P.check_finite(w, "layer.q")


def test_activation_fake_quant_per_token():
    spec = ActivationSpec()
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = P.fake_quantize_activation(x, spec)
    codes, scale, zero = P.quantize_activation(x, spec)
    assert scale.shape == (3, 5, 1)
    torch.testing.assert_close(y, (codes.float() - zero) * scale, rtol=0, atol=0)
    assert ((y - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # asymmetric min-max never clamps


# ---- the shared formulas, each against its written-out definition (atol = 0) ----------------------


@settings(max_examples=40, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), in_f=st.integers(24, 70))
def test_round_codes_and_dequantize_codes_are_the_written_formulas(spec, seed, in_f):
    w = _weight(seed, 4, in_f) * 1.3  # some values fall outside the range: the clamp acts
    scale, zero = P.compute_qparams(w / 1.3, spec)
    s = P.expand_groups(scale, P.default_group_index(in_f, spec))
    z = torch.full_like(s, 2.0 ** (spec.bits - 1)) if zero is None else P.expand_groups(zero, P.default_group_index(in_f, spec))
    q = P.round_codes(w, s, z, spec.qmax)
    assert torch.equal(q, torch.clamp(torch.round(w / s) + z, 0, spec.qmax))
    assert torch.equal(P.dequantize_codes(q, s, z), (q - z) * s)


@settings(max_examples=40, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), in_f=st.integers(24, 70),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_dequantize_is_the_gathered_formula_cast_once(spec, seed, in_f, dtype):
    w = _weight(seed, 5, in_f)
    scale, zero = P.compute_qparams(w, spec)
    codes = P.quantize(w, scale, zero, spec)
    gs = spec.effective_group_size(in_f)
    ref = torch.empty(5, in_f)
    for j in range(in_f):  # column by column: group j // gs, zero 2^(b-1) when symmetric
        z_j = 2.0 ** (spec.bits - 1) if zero is None else zero[:, j // gs]
        ref[:, j] = (codes[:, j].float() - z_j) * scale[:, j // gs]
    assert torch.equal(P.dequantize(codes, scale, zero, spec, dtype=dtype), ref.to(dtype))


@settings(max_examples=40, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), in_f=st.integers(24, 70))
def test_fake_quantize_forwards_are_round_codes_then_dequantize_codes(spec, seed, in_f):
    w = _weight(seed, 3, in_f) * 1.5
    scale, zero = P.compute_qparams(w / 1.5, spec)
    g_idx = P.default_group_index(in_f, spec)
    s = P.expand_groups(scale, g_idx)
    z = P.zeros_or_midpoint(None if zero is None else P.expand_groups(zero, g_idx), s, spec)
    expected = P.dequantize_codes(P.round_codes(w, s, z, spec.qmax), s, z)
    assert torch.equal(P.fake_quantize(w, scale, zero, spec), expected)
    s_mm, z_mm = P.compute_qparams(w, spec)  # fake_quantize_minmax: its own min-max qparams, same formulas
    s_mm = P.expand_groups(s_mm, g_idx)
    z_mm = P.zeros_or_midpoint(None if z_mm is None else P.expand_groups(z_mm, g_idx), s_mm, spec)
    assert torch.equal(P.fake_quantize_minmax(w, spec), P.dequantize_codes(P.round_codes(w, s_mm, z_mm, spec.qmax), s_mm, z_mm))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zeros_or_midpoint(bits):
    spec = QuantSpec(bits, 8)
    like = torch.rand(3, 2, dtype=torch.float16)
    mid = P.zeros_or_midpoint(None, like, spec)
    assert mid.dtype == torch.float32 and mid.shape == (3, 2) and torch.equal(mid, torch.full((3, 2), 2.0 ** (bits - 1)))
    scalar = P.zeros_or_midpoint(None, torch.empty(()), spec)
    assert scalar.shape == () and scalar.item() == 2 ** (bits - 1)
    zero = torch.tensor([[0, 3], [1, 2], [5, 0]], dtype=torch.uint8)
    assert torch.equal(P.zeros_or_midpoint(zero, like, spec), zero.float())
    act = ActivationSpec(symmetric=True)
    assert torch.equal(P.activation_qparams(torch.randn(2, 16), act)[1], torch.full((2, 1), 128.0))


_SCALES = torch.cat([torch.logspace(-8, 2, 400), torch.tensor([0.0, 2.0**-21, 2.0**-20, 0.1, 1.0 / 3, 0.5])])


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_round_scale_up_is_the_smallest_storable_value_not_below(scale_dtype):
    spec = QuantSpec(4, 8, scale_dtype=scale_dtype)
    dt = spec.torch_scale_dtype
    r = P.round_scale_up(_SCALES, spec)
    target = _SCALES.clamp_min(P.SCALE_EPS)
    below = torch.nextafter(r.to(dt), torch.tensor(float("-inf"), dtype=dt)).float()
    assert r.dtype == torch.float32 and torch.equal(r.to(dt).float(), r)  # storable
    assert (r >= target).all() and (below < target).all()  # not below the scale; the next one down is
    assert torch.equal(P.round_scale_up(r, spec), r)  # storable values stay


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_round_scale_nearest_is_the_cast_and_differs_from_round_up(scale_dtype):
    spec = QuantSpec(4, 8, scale_dtype=scale_dtype)
    dt = spec.torch_scale_dtype
    r = P.round_scale_nearest(_SCALES, spec)
    assert r.dtype == torch.float32 and torch.equal(r, _SCALES.clamp_min(P.SCALE_EPS).to(dt).float())
    up = P.round_scale_up(_SCALES, spec)
    down = torch.nextafter(up.to(dt), torch.tensor(float("-inf"), dtype=dt)).float()
    nearest = torch.where(up - _SCALES <= _SCALES - down, up, down).clamp_min(P.SCALE_EPS)  # ties: up or even
    tie = (up - _SCALES) == (_SCALES - down)
    assert torch.equal(r[~tie], nearest[~tie]) and (r >= P.SCALE_EPS).all()
    if scale_dtype != "float32":
        assert (r < up).any()  # two rules: a learned scale may round down, a min-max scale never does
