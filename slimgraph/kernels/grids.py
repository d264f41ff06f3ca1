"""Gaussian MSE-optimal grids and HIGGS group quantization (data-free).

HIGGS rotates each group of weights with a randomised Hadamard transform (see
:mod:`slimgraph.kernels.hadamard`), which makes the entries close to N(0, rms²)
whatever the original distribution, then rounds ``group / rms`` to the grid
that is MSE-optimal for a unit Gaussian: the Lloyd–Max levels (``p=1``) or a
2-D k-means grid over consecutive pairs (``p=2``)::

    q = quantize_groups(w, group_size=1024, bits=4, p=2, seed=0)
    w_hat = dequantize_groups(*q, group_size=1024, bits=4, p=2)
    bits_per_weight(group_size=1024, bits=4)  # 4.015625 (float16 scales)

Codes are stored one per uint8 (``p=1``: one per weight, ``p=2``: one per
pair), unpacked; bit-packing belongs to the weight formats. The 2-D grids are
precomputed in ``data/vector_grids_2d.pt`` (``scripts/make_vector_grids.py``
regenerates it) because k-means on 2^20 samples takes minutes.

The 4-bit 2-D grid is symmetric under sign flips, as the Gaussian is: a quarter of its
points lie in the positive quadrant, and code ``c = j + 64 · (s₀ + 2·s₁)`` stands for
``((-1)^s₀ · Q[j, 0], (-1)^s₁ · Q[j, 1])``, so bit 6 is the first sign, bit 7 the second
and ``c & 63`` indexes 64 magnitudes. Those share their first coordinate in pairs,
``Q[j, 0] == Q[j & 31, 0]``, so the first coordinate has 32 magnitudes. The native batch-1
kernel reads them with byte shuffles (two for the first coordinate, four for the second),
where 256 unrelated points had to be loaded one at a time. The constraints cost 1.4% of
MSE (0.00790 against 0.00779 for unconstrained k-means; 0.00785 with the signs alone).
The 2- and 3-bit grids, which have no kernel of their own, stay unconstrained: the signs
alone would cost 9% and 2% there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import norm

from slimgraph.kernels.hadamard import random_signs, rotate, unrotate

VECTOR_GRIDS_PATH = Path(__file__).parent / "data" / "vector_grids_2d.pt"
_NEAREST_CHUNK = 1 << 16  # rows per distance block in 2-D nearest: 2^16 × 256 floats = 64 MiB


class HiggsGroups(NamedTuple):
    """Output of :func:`quantize_groups`; unpacks as ``codes, scales, signs``."""

    codes: torch.Tensor  # uint8 [rows, cols // p]: grid index per weight (p=1) or per pair (p=2)
    scales: torch.Tensor  # [rows, cols // group_size] group RMS, in the requested scale dtype
    signs: torch.Tensor  # float32 ±1 [group_size]: the random signs shared by every group


def lloyd_max_grid(bits: int) -> torch.Tensor:
    """The ``2**bits`` sorted Lloyd–Max levels for N(0, 1), float64, converged to 1e-10.

    >>> lloyd_max_grid(2)
    tensor([-1.5104, -0.4528,  0.4528,  1.5104], dtype=torch.float64)
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"lloyd_max_grid supports 1 to 8 bits, got {bits}")
    return torch.from_numpy(_lloyd_max_levels(bits).copy())


def gaussian_mse(levels: torch.Tensor) -> float:
    """Exact expected squared error of rounding x ~ N(0, 1) to the nearest of ``levels``.

    Each Voronoi cell (a, b) with level c contributes
    ∫ (x − c)² φ = [Φ − xφ]ₐᵇ − 2c[−φ]ₐᵇ + c²[Φ]ₐᵇ, summed in closed form::

        >>> gaussian_mse(lloyd_max_grid(4))
        0.00950...
    """
    c = np.sort(levels.detach().double().cpu().numpy().ravel())
    edges = np.concatenate(([-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]))
    a, b = edges[:-1], edges[1:]
    mass = _gaussian_mass(a, b)
    first_moment = norm.pdf(a) - norm.pdf(b)
    second_moment = mass - (_x_pdf(b) - _x_pdf(a))
    return float(np.sum(second_moment - 2 * c * first_moment + c * c * mass))


def vector_grid_2d(bits_per_coordinate: int) -> torch.Tensor:
    """A float32 ``[2**(2*bits), 2]`` grid, MSE-optimal (k-means) for N(0, I₂).

    Loaded from the shipped ``data/vector_grids_2d.pt`` (1 to 4 bits); other sizes,
    or a missing file, are computed by :func:`compute_vector_grid_2d` (minutes).

        >>> vector_grid_2d(4).shape  # 256 points, ~0.0078 MSE per coordinate
        torch.Size([256, 2])
    """
    return _vector_grid_2d(bits_per_coordinate).clone()


def compute_vector_grid_2d(
    bits_per_coordinate: int,
    *,
    num_samples: int = 1 << 20,
    iterations: int = 250,
    seed: int = 0,
    sign_symmetric: bool | None = None,
    shared_first: bool | None = None,
) -> torch.Tensor:
    """k-means (Lloyd) on a seeded N(0, I₂) sample, started from the product Lloyd–Max grid.

    ``sign_symmetric`` (default: at 4 bits only) fits a quarter of the points to the
    sample folded into the positive quadrant (``|x|``) and mirrors them into the code
    layout of the module docstring. ``shared_first`` (default: with ``sign_symmetric``
    at 4 bits) then pairs the quadrant's points by their first coordinate (neighbours
    in sorted order; point ``j`` with ``j + n/8``) and runs ``iterations // 2`` more steps
    in which each pair keeps one first coordinate, the mean over both cells. The product
    grid is a saddle point, so the first iterations move slowly; on 2^20 points the
    4-bit grid reaches ~0.00790 per coordinate (0.00785 with the signs alone, ~0.00779
    unconstrained).

        >>> compute_vector_grid_2d(2, num_samples=1 << 18, iterations=150)  # ~0.1077 MSE
    """
    if not 1 <= bits_per_coordinate <= 4:
        raise ValueError(
            f"2-D grids have 2**(2*bits) points and codes are uint8, so bits must be 1 to 4; "
            f"got {bits_per_coordinate}"
        )
    if sign_symmetric is None:
        sign_symmetric = bits_per_coordinate == 4
    if shared_first is None:
        shared_first = sign_symmetric and bits_per_coordinate == 4
    if shared_first and not (sign_symmetric and bits_per_coordinate >= 2):
        raise ValueError(
            "shared_first pairs the positive quadrant's points, so it needs "
            f"sign_symmetric=True and at least 2 bits; got {bits_per_coordinate} bits, "
            f"sign_symmetric={sign_symmetric}"
        )
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(num_samples, 2, generator=generator)
    levels = lloyd_max_grid(bits_per_coordinate).float()
    if sign_symmetric:
        sample, levels = sample.abs(), levels[levels > 0]
    centers = torch.cartesian_prod(levels, levels)
    for _ in range(iterations):
        centers = _kmeans_step(sample, centers)
    centers = _sorted_points(centers)
    if shared_first:
        centers = _pairs_by_first(centers)
        for _ in range(iterations // 2):
            centers = _kmeans_step(sample, centers, shared_first=True)
        centers = _pairs_by_first(centers)
    return mirror_quadrant(centers) if sign_symmetric else centers


def mirror_quadrant(quadrant: torch.Tensor) -> torch.Tensor:
    """``[n/4, 2]`` positive-quadrant points → the ``[n, 2]`` grid, code ``j + n/4 · (s₀ + 2·s₁)``.

        >>> mirror_quadrant(torch.tensor([[0.5, 2.0]]))
        tensor([[ 0.5000,  2.0000],
                [-0.5000,  2.0000],
                [ 0.5000, -2.0000],
                [-0.5000, -2.0000]])
    """
    signs = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    return (signs[:, None, :] * quadrant[None]).reshape(-1, 2).contiguous()


def nearest(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest grid point for each value.

    1-D ``grid [K]`` (sorted): ``values [...]`` → ``[...]`` by bucketize on midpoints.
    2-D ``grid [K, 2]``: ``values [..., 2]`` → ``[...]`` by argmin over chunks of rows,
    so memory stays bounded at ``2**16 × K`` distances. A sign-symmetric grid in
    :func:`mirror_quadrant`'s layout is searched folded: a value's nearest point lies in
    its own quadrant, so ``|value|`` meets only the ``K/4`` positive points and the signs
    become the code's top bits (4x fewer distances, the same codes)::

        >>> nearest(torch.tensor([-2.0, 0.1]), lloyd_max_grid(1).float())
        tensor([0, 1])
    """
    if grid.dim() == 1:
        midpoints = (grid[1:] + grid[:-1]) / 2
        return torch.bucketize(values, midpoints.to(values.dtype))
    if grid.dim() != 2 or values.shape[-1] != grid.shape[-1]:
        raise ValueError(
            f"nearest needs a grid of shape [K] or [K, d] with values [..., d]; "
            f"got grid {tuple(grid.shape)} and values {tuple(values.shape)}"
        )
    grid = grid.to(values.dtype)
    quadrant = grid[: len(grid) // 4]
    if len(grid) % 4 or (quadrant < 0).any() or not torch.equal(mirror_quadrant(quadrant), grid):
        return _nearest_points(values, grid)
    negative = (values < 0).long()
    # |v − (±a, ±b)| ≥ |(|v₀| − a, |v₁| − b)|, with equality for v's own signs; float distances
    # are the same products too, so ties break as in the unfolded search.
    return _nearest_points(values.abs(), quadrant) + len(quadrant) * (negative[..., 0] + 2 * negative[..., 1])


def quantize_groups(
    weight: torch.Tensor,
    *,
    group_size: int,
    bits: int,
    p: int,
    seed: int,
    scale_dtype: torch.dtype = torch.float16,
) -> HiggsGroups:
    """HIGGS: rotate each row group with random signs + Hadamard, divide by the RMS, round to the grid.

    ``weight [rows, cols]`` with ``cols`` a multiple of ``group_size`` (a power of two).
    Scales are the group RMS after rounding to ``scale_dtype`` (float16 by default;
    the division uses the rounded value, so dequantization sees exactly what was stored)::

        >>> codes, scales, signs = quantize_groups(w, group_size=1024, bits=4, p=1, seed=0)
        >>> codes.dtype, scales.dtype, codes.shape == w.shape
        (torch.uint8, torch.float16, True)
    """
    _check_higgs_args(weight.shape, group_size, bits, p)
    rows = weight.shape[0]
    signs = random_signs(group_size, seed)
    groups = rotate(weight.float().reshape(rows, -1, group_size), signs)
    scales = groups.pow(2).mean(-1, keepdim=True).sqrt().to(scale_dtype)
    if not torch.isfinite(scales).all():
        raise ValueError(
            f"quantize_groups: a group RMS overflows {scale_dtype}; pass scale_dtype=torch.float32"
        )
    normalized = groups / scales.float().clamp_min(torch.finfo(torch.float32).tiny)
    if p == 1:
        codes = nearest(normalized, lloyd_max_grid(bits).float())
    else:
        codes = nearest(normalized.reshape(rows, -1, 2), _vector_grid_2d(bits))
    return HiggsGroups(codes.reshape(rows, -1).to(torch.uint8), scales.reshape(rows, -1), signs)


def dequantize_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    signs: torch.Tensor,
    *,
    group_size: int,
    bits: int,
    p: int,
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: look up the grid, scale, un-rotate. Returns float32.

    >>> w_hat = dequantize_groups(*quantize_groups(w, group_size=256, bits=4, p=2, seed=0),
    ...                           group_size=256, bits=4, p=2)
    >>> ((w - w_hat).norm() / w.norm()) ** 2  # ~0.0078
    """
    rows = codes.shape[0]
    grid = lloyd_max_grid(bits).float() if p == 1 else _vector_grid_2d(bits)
    normalized = grid[codes.long()].reshape(rows, -1, group_size)
    groups = normalized * scales.float().reshape(rows, -1, 1)
    return unrotate(groups, signs).reshape(rows, -1)


def bits_per_weight(
    *, group_size: int, bits: int, scale_dtype: torch.dtype = torch.float16
) -> float:
    """Exact storage cost of HIGGS once codes are bit-packed: code bits plus one scale per group.

    The signs are regenerated from the seed, so they cost nothing per weight::

        >>> bits_per_weight(group_size=1024, bits=4)
        4.015625
    """
    return bits + torch.finfo(scale_dtype).bits / group_size


@functools.cache
def _lloyd_max_levels(bits: int) -> np.ndarray:
    count = 1 << bits
    levels = norm.ppf((np.arange(count) + 0.5) / count)
    while True:
        edges = np.concatenate(([-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]))
        centroids = (norm.pdf(edges[:-1]) - norm.pdf(edges[1:])) / _gaussian_mass(
            edges[:-1], edges[1:]
        )
        if np.max(np.abs(centroids - levels)) < 1e-10:
            return centroids
        levels = centroids


def _gaussian_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Φ(b) − Φ(a), via the survival function on the right half so tail cells keep precision."""
    return np.where(a >= 0, norm.sf(a) - norm.sf(b), norm.cdf(b) - norm.cdf(a))


def _x_pdf(x: np.ndarray) -> np.ndarray:
    """x·φ(x), which is 0 at ±∞ (plain arithmetic would give ∞·0 = nan)."""
    finite = np.isfinite(x)
    return np.where(finite, np.where(finite, x, 0.0) * norm.pdf(x), 0.0)


@functools.cache
def _vector_grid_2d(bits_per_coordinate: int) -> torch.Tensor:
    if VECTOR_GRIDS_PATH.exists():
        shipped = torch.load(VECTOR_GRIDS_PATH, weights_only=True)
        if bits_per_coordinate in shipped:
            return shipped[bits_per_coordinate]
    return compute_vector_grid_2d(bits_per_coordinate)


def _kmeans_step(
    sample: torch.Tensor, centers: torch.Tensor, *, shared_first: bool = False
) -> torch.Tensor:
    """One Lloyd step: assign to the nearest center, move each center to its cell mean.

    With ``shared_first``, centers ``j`` and ``j + n/2`` share one first coordinate,
    the mean over both cells (the MSE-optimal value for the assignment).
    """
    assignment = _nearest_points(sample, centers)
    count = torch.bincount(assignment, minlength=len(centers)).double()
    count = count[:, None].repeat(1, 2)  # per coordinate
    total = torch.zeros(centers.shape, dtype=torch.float64).index_add_(
        0, assignment, sample.double()
    )
    if shared_first:
        half = len(centers) // 2
        for column in (count[:, 0], total[:, 0]):
            column.copy_((column[:half] + column[half:]).repeat(2))
    means = (total / count.clamp_min(1)).float()
    return torch.where(count > 0, means, centers)  # an empty cell keeps its center


def _pairs_by_first(points: torch.Tensor) -> torch.Tensor:
    """Points sorted by x → point ``j`` and ``j + n/2`` neighbours in x, each pair by y."""
    points = _sorted_points(points)
    pairs = points.reshape(-1, 2, 2)  # [n/2 pairs, 2 points, xy]
    pairs = pairs.gather(1, pairs[:, :, 1].argsort(1)[:, :, None].expand(-1, -1, 2))
    return pairs.transpose(0, 1).reshape(-1, 2).contiguous()


def _nearest_points(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1, grid.shape[-1])
    grid_sq_norm = grid.pow(2).sum(-1)
    indices = torch.empty(len(flat), dtype=torch.long)
    for start in range(0, len(flat), _NEAREST_CHUNK):
        chunk = flat[start : start + _NEAREST_CHUNK]
        # ‖x − c‖² = ‖x‖² − 2x·c + ‖c‖²; ‖x‖² is the same for every c, so it is dropped.
        distances = torch.addmm(grid_sq_norm, chunk, grid.T, alpha=-2)
        indices[start : start + _NEAREST_CHUNK] = distances.argmin(-1)
    return indices.reshape(values.shape[:-1])


def _sorted_points(points: torch.Tensor) -> torch.Tensor:
    """Order points by x, then y, so the shipped grid reads predictably."""
    order = torch.argsort(points[:, 1], stable=True)
    points = points[order]
    return points[torch.argsort(points[:, 0], stable=True)].contiguous()


def _check_higgs_args(shape: torch.Size, group_size: int, bits: int, p: int) -> None:
    if len(shape) != 2 or shape[1] % group_size:
        raise ValueError(
            f"quantize_groups needs a 2-D [rows, cols] weight with cols a multiple of "
            f"group_size={group_size}; got shape {tuple(shape)}: pick a group size that divides cols"
        )
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(
            f"HIGGS group_size must be a power of two (64 to 1024 are typical); got {group_size}"
        )
    if p not in (1, 2):
        raise ValueError(f"HIGGS grid dimension p must be 1 (Lloyd–Max) or 2 (pairs); got {p}")
    max_bits = 8 if p == 1 else 4
    if not 1 <= bits <= max_bits:
        raise ValueError(
            f"HIGGS p={p} stores {p * bits}-bit codes in uint8, so bits must be 1 to {max_bits}; "
            f"got {bits}"
        )
