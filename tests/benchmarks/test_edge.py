"""benchmarks/edge_common.py: the decode-rate arithmetic and the table the edge benchmark prints."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
try:
    from edge_common import Row, decode_rate, print_table
finally:
    sys.path.pop(0)


def test_decode_rate_excludes_the_prefill():
    rate, prefill = decode_rate([10.0, 10.5, 11.0, 11.5], start=8.0)  # first token after 2 s, then 2 tokens/s
    assert (rate, prefill) == (2.0, 2.0)
    with pytest.raises(ValueError, match="at least two generated tokens"):
        decode_rate([1.0], 0.0)


def test_table_ratios(capsys):
    base = Row("transformers", "float32", 10.0, 1.0, 20.0, 400, [])
    fast = Row("genai", "W4", 25.0, 0.5, 20.2, 100, [])
    print_table([base, fast], base, our_ppl=20.0)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == "| genai | W4 | 25.0 | 2.50 | 0.50 | 20.200 | +1.00 % | 0.0 | 0.25 |"
