"""Lloyd–Max codebooks against the paper's distortion numbers and bounds."""

import math

import pytest
import torch

from tq_vllm import codebook

PAPER_D_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}  # reported for unit vectors


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_distortion_within_paper_bounds(dim, bits):
    d = codebook.mse_distortion(bits, dim)
    assert 4.0 ** -bits <= d <= math.sqrt(3) * math.pi / 2 * 4.0 ** -bits
    assert d == pytest.approx(PAPER_D_MSE[bits], rel=0.15)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_empirical_distortion_matches_exact(dim, bits):
    """Monte Carlo on random unit vectors uniformly rotated agrees with the integral."""
    n = 20000
    x = torch.randn(n, dim, dtype=torch.float64)
    u = x / x.norm(dim=-1, keepdim=True)  # coordinates of a uniform unit vector
    c = codebook.centroids(bits, dim).double()
    idx = torch.bucketize(u.contiguous(), codebook.boundaries(bits, dim).double())
    emp = ((u - c[idx]) ** 2).sum(-1)
    exact = codebook.mse_distortion(bits, dim)
    half_width = 4 * emp.std().item() / math.sqrt(n)
    assert abs(emp.mean().item() - exact) < half_width


def test_centroids_sorted_symmetric_deterministic():
    c = codebook.centroids(3, 64)
    assert torch.all(c[1:] > c[:-1])
    assert torch.equal(c, -c.flip(0))
    codebook._centroids64.cache_clear()
    assert torch.equal(c, codebook.centroids(3, 64))


def test_lloyd_max_fixed_point():
    """Each centroid is the conditional mean of its cell under the law."""
    c = codebook._centroids64(2, 64, "beta")
    t, w = codebook._grid(64, "beta")
    cell = torch.bucketize(t, 0.5 * (c[1:] + c[:-1]))
    for i in range(4):
        m = cell == i
        assert (w[m] * t[m]).sum() / w[m].sum() == pytest.approx(c[i].item(), abs=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_beta_codebook_not_worse_than_gaussian_on_true_law(bits):
    """The exact-law codebook is optimal for the law; the Gaussian one is an approximation."""
    dim = 32
    beta = codebook.mse_distortion(bits, dim, kind="beta", law="beta")
    gauss = codebook.mse_distortion(bits, dim, kind="gaussian", law="beta")
    assert beta <= gauss + 1e-12


def test_bad_bits_rejected():
    with pytest.raises(ValueError, match="bits"):
        codebook.centroids(0, 64)
    with pytest.raises(ValueError, match="kind"):
        codebook.centroids(2, 64, "uniform")
