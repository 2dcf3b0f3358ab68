"""Seeded random constructions: randomized Hadamard rotations and QJL sketches.

Every random object is drawn from a CPU ``torch.Generator`` seeded by
:func:`derive_seed`, a stable hash of the preset seed and a purpose tag, so the
same seed gives the same matrices on every process and machine.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch

SketchKind = Literal["gaussian", "orthogonal"]


def derive_seed(base: int, *tags: object) -> int:
    """Stable 63-bit seed from ``base`` and tags (independent of PYTHONHASHSEED)."""
    text = repr((int(base),) + tuple(str(t) for t in tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def hadamard(dim: int) -> torch.Tensor:
    """Sylvester Hadamard matrix ``[dim, dim]`` with ±1 entries (dim a power of two)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """Seeded ±1 vector ``[dim]`` (float64)."""
    bits = torch.randint(0, 2, (dim,), generator=_generator(seed), dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def randomized_hadamard(dim: int, seed: int) -> torch.Tensor:
    """Orthogonal ``R = H · diag(s) / √dim``, float64 ``[dim, dim]``; rotate with ``y = R x``."""
    return hadamard(dim) * random_signs(dim, seed)[None, :] / math.sqrt(dim)


def group_rotation(group_dims: tuple[int, ...], seed: int, tag: str) -> torch.Tensor:
    """Block-diagonal rotation, one randomized Hadamard per channel group (float64)."""
    blocks = [randomized_hadamard(d, derive_seed(seed, tag, i)) for i, d in enumerate(group_dims)]
    return torch.block_diag(*blocks)


def qjl_sketch(dim: int, seed: int, kind: SketchKind = "gaussian", rows: int = 1) -> torch.Tensor:
    """QJL sketch ``S`` ``[rows · dim, dim]`` (m = rows · dim), float64.

    ``"gaussian"``: i.i.d. N(0, 1) entries (the paper's construction).
    ``"orthogonal"``: rows of a Haar-random orthogonal matrix (unit norm).
    Each further block of ``dim`` rows is drawn from its own derived seed, so the first
    block is the same for every ``rows``.
    """
    if rows > 1:
        return torch.cat([qjl_sketch(dim, seed, kind)]
                         + [qjl_sketch(dim, derive_seed(seed, "rows", i), kind) for i in range(1, rows)])
    g = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
    if kind == "gaussian":
        return g
    if kind == "orthogonal":
        q, r = torch.linalg.qr(g)
        return (q * torch.sign(torch.diagonal(r))[None, :]).T.contiguous()
    raise ValueError(f"unknown sketch kind {kind!r}; use 'gaussian' or 'orthogonal'")


def _mean_abs_projection(dim: int, kind: SketchKind) -> float:
    """``E|⟨s, r̂⟩|`` for one sketch row ``s`` and a unit vector ``r̂``."""
    if kind == "gaussian":
        return math.sqrt(2 / math.pi)
    if kind == "orthogonal":
        return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
    raise ValueError(f"unknown sketch kind {kind!r}; use 'gaussian' or 'orthogonal'")


def qjl_constant(dim: int, kind: SketchKind = "gaussian", rows: int = 1) -> float:
    """Scale making ``c · ‖r‖ · ⟨S y, sign(S r)⟩`` an unbiased estimate of ``⟨y, r⟩``.

    For one row ``s``, ``E[sign(⟨s, r⟩) ⟨s, y⟩] = E|⟨s, r̂⟩| · ⟨y, r̂⟩``. Gaussian rows:
    ``E|s₁| = √(2/π)`` → ``c = √(π/2)/m``. Unit rows uniform on the sphere:
    ``E|s₁| = Γ(d/2) / (√π Γ((d+1)/2))`` ≈ ``√(2/(π d))`` → ``c ≈ √(π d/2)/m``.
    Using the Gaussian constant with orthonormal rows is off by ``√d``.
    """
    m = rows * dim
    if kind == "gaussian":
        return math.sqrt(math.pi / 2) / m
    return 1.0 / (m * _mean_abs_projection(dim, kind))


def qjl_shrink_factor(dim: int, kind: SketchKind = "gaussian", rows: int = 1) -> float:
    """Factor ``γ* = E[a²] / E[â²]`` by which the unbiased QJL estimate ``â`` of
    ``a = ⟨y, r⟩`` is scaled to minimise ``E[(γ â − a)²]``, for ``y`` in a direction
    independent of ``r`` (the rotated domain): ``E[a²] = ‖y‖²‖r‖²/n`` and
    ``E[â²] = c²‖r‖²‖y‖² E‖Sᵀ sign(S r)‖² / n``, where ``E‖Sᵀz‖² = Σ‖s_i‖² + Σ_{i≠j}
    E[z_i s_i]·E[z_j s_j]`` over rows drawn independently (``e² = E|⟨s, r̂⟩|²`` per pair;
    rows of one orthogonal block are orthogonal and add nothing).

    Gaussian rows: ``γ* = m / (m + n π/2 − 1)`` (0.39 at m = n = 64: the unbiased
    estimate's variance is ``π/2 · n/m`` times ``E[a²]``, more than the error it corrects).
    Orthogonal blocks: ``γ* = m e² / (1 + (m − n) e²)`` (≈ 2/π at m = n: one block of
    signs is then a 1-bit quantizer of the rotated residual).
    """
    n, m = dim, rows * dim
    e2 = _mean_abs_projection(dim, kind) ** 2
    c = qjl_constant(dim, kind, rows)
    if kind == "gaussian":
        sq = m * n + m * (m - 1) * e2
    else:
        sq = m + m * (m - n) * e2
    return (1.0 / n) / (c * c * sq / n)
