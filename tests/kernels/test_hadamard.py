"""fast_hadamard / random_signs / rotate: exactness against scipy and the inverse pair."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from slimgraph.kernels.hadamard import fast_hadamard, random_signs, rotate, unrotate


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64])
def test_matches_scipy_hadamard(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = torch.from_numpy(scipy.linalg.hadamard(n)).double()
    torch.testing.assert_close(fast_hadamard(x, normalize=False), x @ h.T)
    torch.testing.assert_close(fast_hadamard(x), x @ h.T / n**0.5)


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_normalized_transform_is_orthonormal(n):
    h = fast_hadamard(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)


@pytest.mark.parametrize("n", [64, 1024, 4096])
def test_involutive_up_to_normalisation(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(fast_hadamard(fast_hadamard(x)), x)
    torch.testing.assert_close(
        fast_hadamard(fast_hadamard(x, normalize=False), normalize=False), n * x
    )


def test_keeps_batch_shape_and_dtype():
    x = torch.randn(2, 3, 4, 128)
    y = fast_hadamard(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y[1, 2, 3], fast_hadamard(x[1, 2, 3]))


@pytest.mark.parametrize("n", [64, 256, 1024, 4096])
def test_rotate_unrotate_round_trip(n):
    x = torch.randn(16, n, generator=torch.Generator().manual_seed(1))
    signs = random_signs(n, seed=7)
    y = rotate(x, signs)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unrotate(y, signs), x, rtol=0, atol=1e-5)


def test_random_signs_are_deterministic_plus_minus_one():
    a, b = random_signs(1024, seed=3), random_signs(1024, seed=3)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(1024, seed=4))
    assert abs(a.sum().item()) < 150  # balanced: ±1 each with probability 1/2


def test_rotation_gaussianises_heavy_tails():
    laplace = torch.from_numpy(np.random.default_rng(0).laplace(size=(4096, 256))).float()
    rotated = rotate(laplace, random_signs(256, seed=0))
    kurtosis = (rotated.pow(4).mean() / rotated.pow(2).mean().pow(2)).item()
    assert 2.9 < kurtosis < 3.1  # Laplace has 6; a Gaussian has 3


@pytest.mark.parametrize("n", [0, 3, 100, 1000])
def test_non_power_of_two_names_size_and_fix(n):
    with pytest.raises(ValueError, match=rf"power of two, got {n}.*pad.*64"):
        fast_hadamard(torch.randn(2, n))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        fast_hadamard(torch.ones(4, dtype=torch.int64))
