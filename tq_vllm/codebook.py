"""Lloyd–Max codebooks for one coordinate of a randomly rotated unit vector.

After a uniformly random rotation, one coordinate ``t`` of a unit vector in
dimension ``d`` follows the law with density ``f(t) ∝ (1 − t²)^((d−3)/2)`` on
[−1, 1] (TurboQuant, Lemma 1). The optimal scalar quantizer for that law is the
Lloyd–Max quantizer: centroids are conditional means of their cells, boundaries
the midpoints between neighbouring centroids. The ``"gaussian"`` kind uses the
N(0, 1/d) approximation instead (what vLLM's in-tree presets use), kept for
comparison.

Everything is computed in float64 on a fixed grid, so the result is bit-for-bit
the same on every machine and process; results are cached per (bits, dim, kind).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

CodebookKind = Literal["beta", "gaussian"]

_GRID_POINTS = 1 << 18
"""Midpoint-rule grid on [−1, 1]: fine enough that centroids converge to ~1e-9
even at d = 256, where the law's standard deviation is 1/16."""
_MAX_ITERS = 2000
_TOL = 1e-12


def _grid(dim: int, kind: CodebookKind) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points ``t`` and normalized probability weights ``w`` (float64)."""
    n = _GRID_POINTS
    t = (torch.arange(n, dtype=torch.float64) + 0.5) * (2.0 / n) - 1.0
    if kind == "beta":
        logf = 0.5 * (dim - 3) * torch.log1p(-t * t)
    elif kind == "gaussian":
        logf = -0.5 * dim * t * t
    else:
        raise ValueError(f"unknown codebook kind {kind!r}; use 'beta' or 'gaussian'")
    w = torch.exp(logf - logf.max())
    return t, w / w.sum()


def _lloyd_max(t: torch.Tensor, w: torch.Tensor, levels: int) -> torch.Tensor:
    cdf = torch.cumsum(w, 0)
    # start from the law's quantiles at cell mid-probabilities
    probs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    c = t[torch.searchsorted(cdf, probs).clamp(max=t.numel() - 1)]
    wt = w * t
    for _ in range(_MAX_ITERS):
        bounds = 0.5 * (c[1:] + c[:-1])
        cell = torch.bucketize(t, bounds)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, w)
        mom = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, wt)
        new = torch.where(mass > 0, mom / mass.clamp_min(1e-300), c)
        done = (new - c).abs().max().item() < _TOL
        c = new
        if done:
            break
    # the law is symmetric: enforce exact antisymmetry against rounding drift
    return 0.5 * (c - c.flip(0))


@lru_cache(maxsize=None)
def _centroids64(bits: int, dim: int, kind: CodebookKind) -> torch.Tensor:
    if not 1 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 1..8, got {bits}")
    if dim < 3:
        raise ValueError(f"codebook dimension must be >= 3, got {dim}")
    t, w = _grid(dim, kind)
    return _lloyd_max(t, w, 1 << bits)


def centroids(bits: int, dim: int, kind: CodebookKind = "beta") -> torch.Tensor:
    """Sorted Lloyd–Max centroids for a unit vector's coordinate.

    Returns float32 ``[2**bits]``, ascending, antisymmetric.
    """
    return _centroids64(bits, dim, kind).to(torch.float32)


def boundaries(bits: int, dim: int, kind: CodebookKind = "beta") -> torch.Tensor:
    """Decision boundaries (midpoints) between centroids, float32 ``[2**bits - 1]``."""
    c = _centroids64(bits, dim, kind)
    return (0.5 * (c[1:] + c[:-1])).to(torch.float32)


def mse_distortion(bits: int, dim: int, kind: CodebookKind = "beta",
                   law: CodebookKind = "beta") -> float:
    """Exact expected ``‖x − x̃‖²`` for a unit vector in ``dim`` dimensions.

    Integrates the codebook of ``kind`` against the coordinate law ``law``
    (so the Gaussian-approximation codebook can be scored on the true law).
    """
    c = _centroids64(bits, dim, kind)
    t, w = _grid(dim, law)
    cell = torch.bucketize(t, 0.5 * (c[1:] + c[:-1]))
    return float(dim * (w * (t - c[cell]) ** 2).sum())
