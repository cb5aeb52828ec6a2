import pytest

from lightning_quant import ActivationSpec, QuantSpec


def test_defaults_and_derived():
    s = QuantSpec()
    assert (s.bits, s.group_size, s.symmetric) == (4, 128, True)
    assert s.qmax == 15 and s.midpoint == 8
    assert s.num_groups(576) == 5  # 4 full groups of 128 + a partial group of 64
    assert QuantSpec(group_size=-1).num_groups(576) == 1
    assert QuantSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bits", [1, 5, 6, 16, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits=.* use one of \(2, 3, 4, 8\)"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("gs", [0, -2, -128])
def test_bad_group_size(gs):
    with pytest.raises(ValueError, match="use -1 \\(per output channel\\) or a positive group size"):
        QuantSpec(group_size=gs)


def test_group_larger_than_layer():
    with pytest.raises(ValueError, match="larger than the layer's in_features=96; use group_size=-1"):
        QuantSpec(group_size=128).check_in_features(96)


def test_bad_scale_dtype_and_unknown_key():
    with pytest.raises(ValueError, match="scale_dtype='int8' is not supported"):
        QuantSpec(scale_dtype="int8")
    with pytest.raises(ValueError, match="Unknown QuantSpec keys \\['bitz'\\]"):
        QuantSpec.from_dict({"bitz": 4})


def test_activation_spec():
    a = ActivationSpec()
    assert a.bits == 8 and not a.symmetric and a.qmax == 255
    with pytest.raises(ValueError, match="ActivationSpec.bits=4 is not supported"):
        ActivationSpec(bits=4)
    with pytest.raises(ValueError, match="use 'per_token'"):
        ActivationSpec(granularity="per_tensor")


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="group_size must be an int"):
        QuantSpec(group_size=64.0)
    with pytest.raises(TypeError, match="QuantSpec.symmetric must be True or False"):
        QuantSpec(symmetric="yes")
    with pytest.raises(TypeError, match="ActivationSpec.symmetric must be True or False"):
        ActivationSpec(symmetric=1)
