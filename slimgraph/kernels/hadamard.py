"""Randomised Hadamard rotations: the "make it Gaussian" half of HIGGS quantization.

Multiplying a group of weights by random signs and then by the orthonormal
Walsh–Hadamard matrix spreads every entry over the whole group, so heavy tails
and outliers come out close to Gaussian; a Gaussian-optimal grid then fits
whatever the original distribution was::

    signs = random_signs(1024, seed=0)
    y = rotate(w.view(-1, 1024), signs)      # ~N(0, rms²) entries, same norm
    w_back = unrotate(y, signs)              # exact inverse (up to float rounding)
"""

from __future__ import annotations

import torch


def fast_hadamard(x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Walsh–Hadamard transform over the last dim in O(n log n), Sylvester (natural) order.

    Equals ``x @ H.T`` with ``H = scipy.linalg.hadamard(n)`` (divided by √n when
    ``normalize``, which makes it orthonormal and its own inverse)::

        >>> fast_hadamard(torch.tensor([1.0, 0.0, 0.0, 0.0]), normalize=False)
        tensor([1., 1., 1., 1.])
        >>> fast_hadamard(fast_hadamard(x))  # == x
    """
    n = x.shape[-1]
    _check_power_of_two(n)
    if not x.is_floating_point():
        raise TypeError(
            f"fast_hadamard needs a floating-point tensor, got {x.dtype}; cast it first"
        )
    batch_shape = x.shape[:-1]
    y = x.reshape(-1, n)
    half = 1
    while half < n:
        y = _butterfly(y, half)
        half *= 2
    y = y.reshape(*batch_shape, n)
    return y * (n**-0.5) if normalize else y


def random_signs(n: int, seed: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` random ±1 values, the same for the same ``(n, seed)`` on every machine.

    >>> random_signs(4, seed=0)
    tensor([...])  # four entries, each -1. or 1.
    """
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=generator)
    return (bits * 2 - 1).to(dtype)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Randomised Hadamard rotation of the last dim: ``fast_hadamard(x * signs)``.

    >>> y = rotate(w.view(-1, 256), random_signs(256, seed=0))
    >>> torch.allclose(y.norm(), w.norm())  # orthonormal: norms are kept
    True
    """
    return fast_hadamard(x * signs.to(x.dtype))


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`rotate`: the normalised H is symmetric and orthogonal, so H⁻¹ = H.

    >>> s = random_signs(64, seed=1)
    >>> torch.allclose(unrotate(rotate(x, s), s), x, atol=1e-5)
    True
    """
    return fast_hadamard(y) * signs.to(y.dtype)


def _butterfly(y: torch.Tensor, half: int) -> torch.Tensor:
    """One radix-2 stage: pairs (a, b) that lie ``half`` apart become (a + b, a − b)."""
    rows, n = y.shape
    pairs = y.view(rows, n // (2 * half), 2, half)
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    return torch.stack((a + b, a - b), dim=2).view(rows, n)


def _check_power_of_two(n: int) -> None:
    if n < 1 or n & (n - 1):
        lower = 1 << max(n.bit_length() - 1, 0)
        raise ValueError(
            f"fast_hadamard needs the last dim to be a power of two, got {n}: "
            f"zero-pad it to {lower * 2} or use a group size that is a power of two "
            f"(64, 128, 256, 512 or 1024; {lower} is the nearest below)"
        )
