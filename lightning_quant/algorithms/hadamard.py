"""Orthogonal rotations of the residual stream: randomised Hadamard and random orthogonal matrices.

QuaRot (Ashkboos et al. 2024, §3-4) and SpinQuant's ``R1`` (Liu et al. 2024, §3.1) multiply the hidden
states of a transformer by an orthogonal ``Q [n, n]``: ``x -> x Q``. Offline (fused into the weights, no
online transform) any orthogonal ``Q`` is exact; a *randomised Hadamard* ``Q = H diag(s) / sqrt(n)``
(``H`` a Hadamard matrix, ``s`` random signs) spreads every outlier feature evenly over all ``n`` features
(each entry of ``Q`` is ``±1/sqrt(n)``), which makes weights and activations easier to quantize.

Hadamard matrices are built here as Kronecker products of

* Sylvester blocks of order ``2^k`` (``H_2 = [[1, 1], [1, -1]]``, ``H_{2m} = H_2 ⊗ H_m``), and
* Paley blocks (Paley 1933): type I of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44,
  48, 60, 72, ...), type II of order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, 76, ...),

so every size ``n = 2^k · m`` with ``m`` a product of such orders is covered: SmolLM2's 576 = 72 · 8,
896 = 28 · 32, 3584 = 28 · 128, 960 = 60 · 16, the tiny test models' 96 = 48 · 2. Other sizes raise, naming
``kind="random"`` (a seeded Haar-random orthogonal matrix from a QR decomposition, exact offline too).

Everything is computed in float64 and checked: ``H Hᵀ = n I`` exactly, ``Q Qᵀ = I`` within rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "check_orthogonal",
    "hadamard_factors",
    "hadamard_matrix",
    "mean_preserving",
    "paley_matrix",
    "random_hadamard",
    "random_orthogonal",
    "rotation_matrix",
    "sylvester_matrix",
]

#: The rotation kinds: ``"hadamard"`` (randomised Hadamard, QuaRot / SpinQuant R1's initialisation) and
#: ``"random"`` (seeded random orthogonal, from the QR decomposition of a Gaussian matrix).
KINDS = ("hadamard", "random")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley_type(n: int) -> str | None:
    """``"I"`` / ``"II"`` when Paley's construction gives a Hadamard matrix of order ``n``, else ``None``."""
    if n >= 4 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "I"
    if n >= 12 and n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "II"
    return None


def sylvester_matrix(n: int) -> Tensor:
    """Sylvester's Hadamard matrix ``[n, n]`` (±1, float64) of order ``n = 2^k``: ``H_{2m} = H_2 ⊗ H_m``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got n={n}.")
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _jacobsthal(q: int) -> Tensor:
    """Jacobsthal matrix ``[q, q]``: ``Q_ij = χ(j - i)`` with ``χ`` the quadratic character mod the prime ``q``."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[[(x * x) % q for x in range(1, q)]] = 1.0
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # [q, q]: χ(j - i)


def paley_matrix(n: int) -> Tensor:
    """Paley's Hadamard matrix ``[n, n]`` (±1, float64).

    Type I (``q = n - 1 ≡ 3 mod 4`` prime): ``H = I + S`` with ``S = [[0, 1ᵀ], [-1, Q]]`` (``Q`` the
    antisymmetric Jacobsthal matrix). Type II (``q = n/2 - 1 ≡ 1 mod 4`` prime): with the symmetric
    ``C = [[0, 1ᵀ], [1, Q]]``, ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``.
    """
    kind = _paley_type(n)
    if kind is None:
        raise ValueError(f"Paley's construction gives no Hadamard matrix of order {n}: it needs n - 1 a prime "
                         "≡ 3 (mod 4) (type I) or n/2 - 1 a prime ≡ 1 (mod 4) (type II).")
    q = n - 1 if kind == "I" else n // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0 if kind == "I" else 1.0
    c[1:, 1:] = _jacobsthal(q)
    if kind == "I":
        return torch.eye(n, dtype=torch.float64) + c
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _block_orders(n: int) -> list[int]:
    """Orders ``> 1`` dividing ``n`` that one Sylvester or Paley block covers, largest first."""
    return [d for d in range(n, 1, -1) if n % d == 0 and (d & (d - 1) == 0 or _paley_type(d) is not None)]


@lru_cache(maxsize=256)
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Block orders (each a power of two or a Paley order, largest first) whose Kronecker product has order
    ``n``, or ``None`` when none is found. A depth-first search over :func:`_block_orders`."""
    if n == 1:
        return ()
    if n < 1 or (n > 2 and n % 4):
        return None  # a Hadamard matrix of order n > 2 needs 4 | n
    for d in _block_orders(n):
        rest = hadamard_factors(n // d)
        if rest is not None:
            return (d, *rest)
    return None


def hadamard_matrix(n: int) -> Tensor:
    """A Hadamard matrix ``H [n, n]`` (entries ±1, ``H Hᵀ = n I``, checked exactly), float64.

    A Kronecker product of Sylvester and Paley blocks (:func:`hadamard_factors`). Raises ``ValueError``
    naming ``kind="random"`` for an order no such product covers.
    """
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(
            f"No Hadamard matrix of order {n} is built here (Kronecker products of Sylvester 2^k and Paley I/II "
            f"blocks{'; an order > 2 must be a multiple of 4' if n > 2 and n % 4 else ''}). Use "
            "Rotation(kind='random') (a seeded random orthogonal matrix: exact offline as well).")
    h = torch.ones(1, 1, dtype=torch.float64)
    for d in factors:
        h = torch.kron(h, sylvester_matrix(d) if d & (d - 1) == 0 else paley_matrix(d))
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):  # integer arithmetic: exact
        raise RuntimeError(f"internal error: the order-{n} matrix from blocks {factors} is not Hadamard.")
    return h


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_hadamard(n: int, seed: int = 0) -> Tensor:
    """QuaRot's randomised Hadamard ``Q = H diag(s) / sqrt(n)`` ``[n, n]`` (float64), ``s ∈ {±1}^n`` seeded."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs.unsqueeze(0) / n**0.5  # [n, n] · diag(s): column j times s_j


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A Haar-random orthogonal ``Q [n, n]`` (float64): ``G = QR`` for a seeded Gaussian ``G``, the columns of
    ``Q`` multiplied by ``sign(diag(R))`` (Mezzadri 2007, so the distribution is uniform)."""
    g = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> Tensor:
    """The orthogonal ``Q [n, n]`` (float64) of a rotation ``kind`` (see :data:`KINDS`) and ``seed``, checked."""
    builders = {"hadamard": random_hadamard, "random": random_orthogonal}
    if kind not in builders:
        raise ValueError(f"kind={kind!r} is not a rotation kind; use one of {KINDS}.")
    q = builders[kind](n, seed)
    check_orthogonal(q)
    return q


def check_orthogonal(q: Tensor, atol: float | None = None) -> None:
    """Raise ``ValueError`` unless ``q [n, n]`` satisfies ``Q Qᵀ = I`` within ``atol`` (default ``64 n eps``)."""
    if q.dim() != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"a rotation must be a square [n, n] matrix, got shape {tuple(q.shape)}.")
    n = q.shape[0]
    tol = 64 * n * torch.finfo(q.dtype).eps if atol is None else atol
    err = (q @ q.T - torch.eye(n, dtype=q.dtype, device=q.device)).abs().max().item()
    if err > tol:
        raise ValueError(f"the [{n}, {n}] matrix is not orthogonal: max |Q Qᵀ - I| = {err:.3g} > {tol:.3g}.")


def mean_preserving(q: Tensor) -> Tensor:
    """``Q R`` ``[n, n]``: the orthogonal ``q`` times the Householder reflection ``R`` that maps ``1`` to ``qᵀ 1``,
    so that ``(Q R) 1 = 1``.

    A row vector ``x`` with zero mean (``x · 1 = 0``) then stays zero-mean under ``x -> x Q R``, which makes a
    LayerNorm without affine (mean subtraction, then RMS scaling) commute with the rotation. ``R = I - 2 v vᵀ /
    (vᵀ v)`` with ``v = 1 - qᵀ 1``; ``R = I`` when ``q`` already maps ``1`` to itself. The correction
    ``-2 (q v) vᵀ / (vᵀ v)`` is rank one; a randomised Hadamard's entries stop being exactly ``±1/sqrt(n)`` but stay
    of that order (largest ``|Q R|_ij · sqrt(n)`` measured 2.4 / 3.0 / 3.5 for n = 96 / 768 / 2048).
    """
    ones = torch.ones(q.shape[0], dtype=q.dtype, device=q.device)
    v = ones - q.T @ ones  # [n]
    vv = v @ v
    if vv.item() <= (q.shape[0] * torch.finfo(q.dtype).eps) ** 2:
        return q.clone()
    return q - 2 * torch.outer(q @ v, v) / vv  # Q (I - 2 v vᵀ / vᵀv)
