import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant import packing


def _codes(seed, shape, bits):
    return torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.uint8)


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 41), cols=st.integers(1, 41),
       dim=st.sampled_from([0, 1]), seed=st.integers(0, 1000))
def test_pack_unpack_identity(bits, rows, cols, dim, seed):
    codes = _codes(seed, (rows, cols), bits)
    words = packing.pack(codes, bits, dim)
    assert words.dtype == torch.int32
    n = codes.shape[dim]
    assert words.shape[dim] == (n * bits + 31) // 32
    assert torch.equal(packing.unpack(words, bits, n, dim), codes)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 17), groups=st.integers(1, 6), seed=st.integers(0, 1000))
def test_awq_roundtrip(rows, groups, seed):
    codes = _codes(seed, (rows, 8 * groups), 4)
    assert torch.equal(packing.unpack_awq(packing.pack_awq(codes), 8 * groups), codes)


def test_lsb_first_nibbles_match_published_layout():
    # GPTQ qweight: word = sum(q[i] << 4 i) over 8 consecutive input rows
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)
    assert packing.pack_rows(codes, 4).item() == 0x76543210
    # 8 at 4 bits in every nibble: GPTQ v1's symmetric qzeros word 0x88888888 wraps negative
    assert packing.pack_cols(torch.full((1, 8), 8, dtype=torch.uint8), 4).item() == 0x88888888 - (1 << 32)


def test_three_bit_codes_straddle_words():
    codes = torch.full((1, 11), 7, dtype=torch.uint8)  # 33 bits: the 11th code spans words 0 and 1
    words = packing.pack_cols(codes, 3)
    assert words.shape == (1, 2)
    assert words[0, 0].item() == -1 and words[0, 1].item() == 1  # 32 ones, then one more bit


def test_awq_order_interleaves():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)
    word = packing.pack_awq(codes).item()
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(packing.AWQ_ORDER)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Cannot pack 5-bit codes; supported widths are"):
        packing.pack(torch.zeros(2, 2, dtype=torch.uint8), 5, 0)
    with pytest.raises(ValueError, match="Codes out of range for 4 bits"):
        packing.pack(torch.full((2, 2), 16, dtype=torch.uint8), 4, 0)
    with pytest.raises(ValueError, match="takes integer codes"):
        packing.pack(torch.zeros(2, 2), 4, 0)
    with pytest.raises(ValueError, match="cannot hold exactly 9 4-bit codes"):
        packing.unpack(torch.zeros(2, 1, dtype=torch.int32), 4, 9, 1)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        packing.pack_awq(torch.zeros(2, 6, dtype=torch.uint8))
