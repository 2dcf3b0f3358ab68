"""Seeded rotations and sketches: orthogonality, determinism, QJL constants."""

import math
import subprocess
import sys

import pytest
import torch

from tq_vllm import rotation


@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_randomized_hadamard_orthogonal(dim):
    r = rotation.randomized_hadamard(dim, seed=7)
    assert torch.allclose(r @ r.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        rotation.hadamard(96)


def test_seeds_differ_by_tag_and_are_stable():
    a = rotation.derive_seed(1, "layer", 0)
    assert a == rotation.derive_seed(1, "layer", 0)
    assert a != rotation.derive_seed(1, "layer", 1)
    assert not torch.equal(rotation.random_signs(64, a), rotation.random_signs(64, a + 1))


def test_same_seed_same_matrices_in_another_process():
    code = ("import torch; from tq_vllm import rotation as r; "
            "s = r.derive_seed(5, 'x'); "
            "print(float(r.randomized_hadamard(64, s).sum()), float(r.qjl_sketch(64, s).sum()))")
    outs = {subprocess.check_output([sys.executable, "-c", code], text=True) for _ in range(2)}
    s = rotation.derive_seed(5, "x")
    here = f"{float(rotation.randomized_hadamard(64, s).sum())} {float(rotation.qjl_sketch(64, s).sum())}\n"
    assert outs == {here}


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_qjl_constant_makes_one_row_unbiased(kind):
    """E[c·m·sign(<s,r>)<s,y>] = <r̂, y> over random rows, for each sketch kind."""
    dim, n = 64, 40000
    torch.manual_seed(0)
    r = torch.randn(dim, dtype=torch.float64)
    r /= r.norm()
    y = 0.6 * r + 0.8 * torch.linalg.qr(torch.stack([r, torch.randn(dim, dtype=torch.float64)], 1))[0][:, 1]
    rows = torch.cat([rotation.qjl_sketch(dim, seed, kind) for seed in range(n // dim)])
    est = rotation.qjl_constant(dim, kind) * dim * torch.sign(rows @ r) * (rows @ y)
    se = est.std().item() / math.sqrt(est.numel())
    assert abs(est.mean().item() - float(r @ y)) < 4 * se


def test_gaussian_constant_with_orthonormal_rows_is_the_known_bug():
    """The √(π/2)/m constant on unit rows under-scales by about √d."""
    d = 128
    ratio = rotation.qjl_constant(d, "orthogonal") / rotation.qjl_constant(d, "gaussian")
    assert ratio == pytest.approx(math.sqrt(d), rel=0.01)


@pytest.mark.parametrize("kind,rows", [("gaussian", 1), ("gaussian", 2), ("orthogonal", 1),
                                       ("orthogonal", 2)])
def test_qjl_shrink_factor_is_the_simulated_optimum(kind, rows):
    """γ* = E[a²] / E[â²] for a = ⟨y, r⟩ and its unbiased QJL estimate â, y uniform in
    direction: E_y[â²] = c² ‖Sᵀ sign(S r)‖² / n for unit r, y, so simulating
    ‖Sᵀ sign(S r)‖² over fresh sketches checks the closed form's cross-row terms."""
    dim, trials = 32, 600
    gen = torch.Generator().manual_seed(3)
    sq = torch.empty(trials, dtype=torch.float64)
    for t in range(trials):
        s = rotation.qjl_sketch(dim, rotation.derive_seed(11, kind, t), kind, rows)
        r = torch.randn(dim, generator=gen, dtype=torch.float64)
        sq[t] = (s.T @ torch.sign(s @ r)).pow(2).sum()
    c = rotation.qjl_constant(dim, kind, rows)
    simulated = (1 / dim) / (c * c * sq.mean().item() / dim)
    se = simulated * sq.std().item() / sq.mean().item() / math.sqrt(trials)
    assert abs(simulated - rotation.qjl_shrink_factor(dim, kind, rows)) < 4 * se + 1e-3


def test_extra_sketch_rows_keep_the_first_block():
    one = rotation.qjl_sketch(64, 9, "orthogonal")
    two = rotation.qjl_sketch(64, 9, "orthogonal", rows=2)
    assert two.shape == (128, 64) and torch.equal(two[:64], one)
    assert not torch.equal(two[64:], one)
