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


def qjl_sketch(dim: int, seed: int, kind: SketchKind = "gaussian") -> torch.Tensor:
    """QJL sketch ``S`` ``[dim, dim]`` (m = dim rows), float64.

    ``"gaussian"``: i.i.d. N(0, 1) entries (the paper's construction).
    ``"orthogonal"``: rows of a Haar-random orthogonal matrix (unit norm).
    """
    g = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
    if kind == "gaussian":
        return g
    if kind == "orthogonal":
        q, r = torch.linalg.qr(g)
        return (q * torch.sign(torch.diagonal(r))[None, :]).T.contiguous()
    raise ValueError(f"unknown sketch kind {kind!r}; use 'gaussian' or 'orthogonal'")


def qjl_constant(dim: int, kind: SketchKind = "gaussian") -> float:
    """Scale making ``c · ‖r‖ · ⟨S y, sign(S r)⟩`` an unbiased estimate of ``⟨y, r⟩``.

    For one row ``s``, ``E[sign(⟨s, r⟩) ⟨s, y⟩] = E|⟨s, r̂⟩| · ⟨y, r̂⟩``. Gaussian rows:
    ``E|s₁| = √(2/π)`` → ``c = √(π/2)/m``. Unit rows uniform on the sphere:
    ``E|s₁| = Γ(d/2) / (√π Γ((d+1)/2))`` ≈ ``√(2/(π d))`` → ``c ≈ √(π d/2)/m``.
    Using the Gaussian constant with orthonormal rows is off by ``√d``.
    """
    m = dim
    if kind == "gaussian":
        return math.sqrt(math.pi / 2) / m
    if kind == "orthogonal":
        e_abs = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
        return 1.0 / (m * e_abs)
    raise ValueError(f"unknown sketch kind {kind!r}; use 'gaussian' or 'orthogonal'")
