"""Hadamard and random orthogonal rotations (QuaRot / SpinQuant R1): construction and checks."""

import pytest
import torch

from lightning_quant.algorithms import hadamard as Hd

ORDERS = [1, 2, 4, 8, 16, 64, 256, 12, 24, 48, 96, 192, 20, 28, 36, 44, 60, 72, 576, 896, 960]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrix_is_hadamard(n):
    h = Hd.hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [4, 12, 96, 576])
def test_randomised_hadamard_is_orthogonal_with_entries_one_over_sqrt_n(n):
    q = Hd.rotation_matrix(n, "hadamard", seed=3)
    torch.testing.assert_close(q.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # H diag(s) / sqrt(n): the columns of the plain Hadamard matrix times random signs
    signs = (q * n**0.5 / Hd.hadamard_matrix(n))[0]
    assert torch.equal(q * n**0.5, Hd.hadamard_matrix(n) * signs) and set(signs.tolist()) <= {-1.0, 1.0}


def test_576_is_a_kronecker_product_of_sylvester_and_paley_blocks():
    factors = Hd.hadamard_factors(576)
    assert factors is not None and torch.tensor(factors).prod().item() == 576
    for d in factors:
        assert d & (d - 1) == 0 or Hd._paley_type(d) is not None, d
    for k in range(8):  # every 12 · 2^k is covered
        assert Hd.hadamard_factors(12 * 2**k) is not None, k


@pytest.mark.parametrize("n,kind", [(12, "I"), (20, "I"), (44, "I"), (28, "II"), (36, "II"), (76, "II")])
def test_paley_types_i_and_ii(n, kind):
    assert Hd._paley_type(n) == kind
    h = Hd.paley_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [16, 96, 100])
def test_random_kind_is_orthogonal_and_seeded(n):
    q = Hd.rotation_matrix(n, "random", seed=1)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, Hd.rotation_matrix(n, "random", seed=1))
    assert not torch.allclose(q, Hd.rotation_matrix(n, "random", seed=2))


def test_seeded_hadamard_is_reproducible_and_seeds_differ():
    assert torch.equal(Hd.random_hadamard(96, 5), Hd.random_hadamard(96, 5))
    assert not torch.equal(Hd.random_hadamard(96, 5), Hd.random_hadamard(96, 6))


@pytest.mark.parametrize("n", [3, 6, 18, 92, 668])
def test_uncovered_sizes_raise_naming_the_random_kind(n):
    with pytest.raises(ValueError, match=rf"No Hadamard matrix of order {n} is built here .* Use Rotation\(kind='random'\)"):
        Hd.hadamard_matrix(n)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Sylvester's construction needs a power of two, got n=12"):
        Hd.sylvester_matrix(12)
    with pytest.raises(ValueError, match="Paley's construction gives no Hadamard matrix of order 16"):
        Hd.paley_matrix(16)
    with pytest.raises(ValueError, match=r"kind='dct' is not a rotation kind; use one of \('hadamard', 'random'\)"):
        Hd.rotation_matrix(8, "dct")
    with pytest.raises(ValueError, match=r"not orthogonal: max \|Q Qᵀ - I\|"):
        Hd.check_orthogonal(torch.eye(4, dtype=torch.float64) * 1.01)
    with pytest.raises(ValueError, match=r"must be a square \[n, n\] matrix, got shape \(4, 3\)"):
        Hd.check_orthogonal(torch.zeros(4, 3))


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_mean_preserving_maps_ones_to_ones_and_stays_orthogonal(kind):
    n = 96
    q = Hd.mean_preserving(Hd.rotation_matrix(n, kind, seed=0))
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(q @ ones, ones, rtol=0, atol=1e-12)
    Hd.check_orthogonal(q)
    x = torch.randn(5, n, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    torch.testing.assert_close((x @ q).mean(1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    # a matrix that already maps 1 to 1 (the identity) is left as it is
    assert torch.equal(Hd.mean_preserving(torch.eye(n, dtype=torch.float64)), torch.eye(n, dtype=torch.float64))
