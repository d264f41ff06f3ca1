"""higgs: data-free HIGGS weights (randomised Hadamard + Gaussian MSE-optimal grid).

Each row of ``W [out, in]`` is split into groups of ``group_size``; every group is
rotated by ``H·diag(signs)`` (the same signs for all groups), divided by its RMS
and rounded to the Gaussian-optimal grid of :mod:`slimgraph.kernels.grids`: the
Lloyd–Max levels (``p=1``) or a 2-D grid over consecutive pairs (``p=2``). The op
never un-rotates the weight: since ``W_hat[o, group] = diag(signs)·H·q`` and H is
symmetric and orthonormal, ``x·W_hat[o, group] = rotate(x_group)·q``, so it rotates
the *activations* (O(in·log g) per row) and multiplies by grid values × scales::

    packed = FORMATS["higgs"].pack(w, bits=4, p=2, group_size=128)
    y = packed(x, bias)                        # rotate_groups(x) @ (grid[codes] * scales).T + bias
    w_hat = FORMATS["higgs"].dequantize(packed)  # un-rotated, what F.linear would need

Storage, counted exactly in ``bits_per_weight``:

- ``codes`` uint8 ``[out, in·bits/8]``: ``bits·p``-bit codes (one per weight for
  ``p=1``, one per pair for ``p=2``) bit-packed little-endian, 8 codes in
  ``bits·p`` bytes. 4-bit codes are therefore ``int4.pack_nibbles``'s layout (the
  native ``lut4_linear`` reads it) and ``p=2, bits=4`` is one byte per pair (the
  native ``lut8_linear`` with d=2 reads it as is). The other widths (2, 3 and 6
  bits) have no kernel of their own: each call unpacks them to bytes for the same
  ``lut8_linear``, which makes them compact storage rather than fast formats (the
  unpack takes 30–350 ms per 16M weights on 2 cores, several times the 4-bit GEMV).
- ``scales`` float16 ``[out, in/group_size]``: the group RMS.
- ``signs`` int8 ``[group_size]``: the ±1 signs of the rotation. They could be
  regenerated from ``(group_size, seed)``, but that would tie a saved model to
  torch's random number generator never changing; storing them costs
  ``group_size`` bytes per layer, which ``bits_per_weight`` counts.

So ``bits_per_weight = bits + 16/group_size + 8·group_size/(out·in)``. The grids
themselves are constants of ``(bits, p)``, like the NF4 code, and not stored.

``p=1`` is the default. ``p=2`` costs the same bits and cuts the error by about 16%
(4-bit relative MSE ≈0.0078 against ≈0.0093 on Gaussian weights at group 128), but
packing is ~2x slower (nearest of the 64 positive points per folded pair: 2.5 s against
1.3 s for a 4096×4096 weight on 2 cores) and its batch-1 GEMV ~1.3x slower than the
4-bit one (120 against 90 µs for 2048² at group 128, 2 threads). Its 4-bit grid is
sign-symmetric and its 64 magnitudes share their first coordinate in pairs, so the
kernel reads them with byte shuffles (two tables and a blend for the first coordinate,
four and three blends for the second) where the 4-bit kernel needs one shuffle per 32
codes. That layout costs 1.4% of MSE against unconstrained k-means (0.00790 against
0.00779 on N(0, I₂)); on MiniLM the RTN cosine is 0.969 (0.970 unconstrained) and 0.990
with GPTQ. Pick p=2 when quality matters more.

GPTQ (``method=gptq``, :mod:`slimgraph.kernels.gptq`) works at every bit width for
both grids: it rounds ``W·R`` in the rotated basis the codes live in, with the Hessian
rotated by the same signs, and packs the same three buffers, so the op and
``dequantize`` are unchanged. For ``p=2`` it rounds each pair of adjacent columns to
the nearest 2-D point and spreads both errors over the columns not yet rounded
(vector GPTQ). MiniLM, 4 bits, group 128, mean sentence-embedding cosine to fp32
(``benchmarks/quant_quality.py``): p=1 0.961 RTN, 0.988 GPTQ; p=2 0.969 RTN, 0.990
GPTQ. Rounding each pair to the nearest point in the metric of its 2×2 block of the
inverse Hessian (GPTVQ's assignment) measured no better (left to right: 0.9902 against
0.9904), so the pair goes to its plain nearest point.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimgraph.kernels import native
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.gptq import ScalarGrid, grid_quantizer
from slimgraph.kernels.grids import (
    bits_per_weight,
    dequantize_groups,
    lloyd_max_grid,
    nearest,
    quantize_groups,
    vector_grid_2d,
)
from slimgraph.kernels.hadamard import random_signs, rotate

BITS = (2, 3, 4)
GRID_DIMS = (1, 2)
GROUP_SIZES = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class HiggsOptions:
    """``bits`` per weight of the codes, grid dimension ``p``, rotation ``group_size`` and sign ``seed``."""

    bits: int = 4
    p: int = 1
    group_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"higgs bits={self.bits} is not one of {BITS}")
        if self.p not in GRID_DIMS:
            raise ValueError(f"higgs p={self.p} is not one of {GRID_DIMS} (1: Lloyd–Max levels, 2: pairs)")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"higgs group_size={self.group_size} is not one of {GROUP_SIZES}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"higgs seed={self.seed!r} must be an integer >= 0")


def quantize_weight_higgs(weight: torch.Tensor, options: HiggsOptions) -> dict[str, torch.Tensor]:
    """``{"codes": uint8 [out, in·bits/8], "scales": float16 [out, in/g], "signs": int8 [g]}``.

    >>> b = quantize_weight_higgs(torch.randn(256, 512), HiggsOptions(bits=3))
    >>> b["codes"].shape, b["scales"].shape, b["signs"].shape
    (torch.Size([256, 192]), torch.Size([256, 4]), torch.Size([128]))
    """
    codes, scales, signs = quantize_groups(weight.float(), group_size=options.group_size, bits=options.bits,
                                           p=options.p, seed=options.seed)
    return {"codes": pack_bits(codes, options.bits * options.p), "scales": scales,
            "signs": signs.to(torch.int8)}


def dequantize_higgs(codes: torch.Tensor, scales: torch.Tensor, signs: torch.Tensor, group_size: int,
                     bits: int, p: int) -> torch.Tensor:
    """The float32 ``[out, in]`` weight the packed buffers encode (un-rotated)."""
    return dequantize_groups(unpack_bits(codes, bits * p), scales, signs.float(), group_size=group_size,
                             bits=bits, p=p)


@torch.library.custom_op("slimgraph::linear_higgs", mutates_args=())
@native.cpu_kernel("linear_higgs", lambda: (_lookup_table(4, 1, 16).flatten(), _lookup_table(4, 2, 256)))
def linear_higgs(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, signs: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int, bits: int, p: int) -> torch.Tensor:
    """``rotate_groups(x) @ (grid[codes] * scales).T + bias``; native rotation + lookup-table GEMV on CPU."""
    kernels = native.for_input(x)
    if kernels is not None:
        rotated = kernels.hadamard_rotate(x.contiguous(), signs)
        if p == 1 and bits == 4:
            return kernels.lut4_linear(rotated, codes, _lookup_table(bits, p, 16).flatten(), scales, bias, group_size)
        return kernels.lut8_linear(rotated, unpack_bits(codes, bits * p), _lookup_table(bits, p, 256), scales,
                                   bias, group_size)
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    rotated = rotate(groups, signs.float()).reshape(x.shape)
    weight = rotated_weight(codes, scales, group_size, bits, p)
    return F.linear(rotated, weight, None if bias is None else bias.float()).to(x.dtype)


@linear_higgs.register_fake
def _(x, codes, scales, signs, bias, group_size, bits, p):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def rotated_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, p: int) -> torch.Tensor:
    """``grid[codes] * scales``: the float32 weight in the rotated basis, which rotated activations multiply."""
    out_features = codes.shape[0]
    values = _grid_points(bits, p).to(codes.device)[unpack_bits(codes, bits * p).long()]
    groups = values.reshape(out_features, -1, group_size) * scales.float()[..., None]
    return groups.reshape(out_features, -1)


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, n]`` codes below ``2**width`` → ``[rows, n·width/8]`` bytes, little-endian.

    Code ``j`` of each run of 8 occupies bits ``j·width`` to ``(j+1)·width − 1`` of
    that run's ``width`` bytes; at ``width=4`` this is ``int4.pack_nibbles``::

        >>> pack_bits(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 3]], dtype=torch.uint8), 2)
        tensor([[57, 192]], dtype=torch.uint8)
    """
    word_bytes, codes_per_word, dtype = _word_layout(width)
    rows = codes.shape[0]
    codes = codes.reshape(rows, -1, codes_per_word).to(dtype)
    word = codes[..., 0]
    for j in range(1, codes_per_word):
        word = word | (codes[..., j] << (j * width))
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(word_bytes)], dim=-1).to(torch.uint8).reshape(rows, -1)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[rows, n·width/8]`` bytes → ``[rows, n]`` uint8 codes."""
    if width == 8:
        return packed
    word_bytes, codes_per_word, dtype = _word_layout(width)
    rows = packed.shape[0]
    packed = packed.reshape(rows, -1, word_bytes)
    word = packed[..., 0].to(dtype)
    for b in range(1, word_bytes):
        word = word | (packed[..., b].to(dtype) << (8 * b))
    shifts = torch.arange(codes_per_word, dtype=dtype, device=packed.device) * width
    return ((word[..., None] >> shifts) & ((1 << width) - 1)).to(torch.uint8).reshape(rows, -1)


def _word_layout(width: int) -> tuple[int, int, torch.dtype]:
    """The smallest run of whole bytes holding whole codes: ``(bytes, codes, integer dtype)``.

    Unpacking runs once per call on the non-native widths, so words are as narrow as
    they can be: one byte for 1, 2 and 4 bits, three bytes (int32) for 3 and 6 bits.
    """
    common = math.gcd(width, 8)
    word_bytes = width // common
    dtype = torch.uint8 if word_bytes == 1 else torch.int32 if word_bytes <= 3 else torch.int64
    return word_bytes, 8 // common, dtype


@functools.cache
def _grid_points(bits: int, p: int) -> torch.Tensor:
    """The grid as float32 ``[2**(bits·p), p]``: row ``c`` is the value(s) code ``c`` stands for."""
    return lloyd_max_grid(bits).float()[:, None] if p == 1 else vector_grid_2d(bits)


@functools.cache
def _lookup_table(bits: int, p: int, size: int) -> torch.Tensor:
    """The grid zero-padded to the ``size`` entries a native lookup-table kernel indexes."""
    points = _grid_points(bits, p)
    return F.pad(points, (0, 0, 0, size - len(points))).contiguous()


def _pack(weight: torch.Tensor, options: HiggsOptions) -> PackedLinear:
    return _packed(quantize_weight_higgs(weight, options), options, weight.numel())


def _packed(buffers: dict[str, torch.Tensor], options: HiggsOptions, weight_count: int) -> PackedLinear:
    sign_bits = 8 * options.group_size / weight_count
    return PackedLinear(torch.ops.slimgraph.linear_higgs.default, buffers,
                        {"group_size": options.group_size, "bits": options.bits, "p": options.p},
                        bits_per_weight=bits_per_weight(group_size=options.group_size, bits=options.bits)
                        + sign_bits)


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    return dequantize_higgs(*packed.buffers.values(), **packed.params)


def _rejects(weight: torch.Tensor, options: HiggsOptions) -> str | None:
    if weight.shape[1] % options.group_size:
        return f"in_features={weight.shape[1]} is not divisible by group_size={options.group_size}"
    return None


def _grid(weight: torch.Tensor, options: HiggsOptions) -> ScalarGrid:
    """The grid in the rotated basis, for GPTQ: RMS scales, nearest Lloyd–Max level (p=1) or 2-D point (p=2).

    The functions repeat :func:`~slimgraph.kernels.grids.quantize_groups` step for step
    (float16 RMS, division by the rounded scale, nearest grid point), so an identity
    Hessian gives the RTN buffers bit for bit. For p=2 GPTQ rounds each pair of
    adjacent columns to its nearest 2-D point, then spreads both errors (``dim=2``).
    """
    signs = random_signs(options.group_size, options.seed)
    points = _grid_points(options.bits, options.p).to(weight.device)
    grid = points[:, 0] if options.p == 1 else points

    def scales(groups: torch.Tensor, first_group: int) -> tuple[torch.Tensor]:
        return (groups.contiguous().pow(2).mean(-1).sqrt().to(torch.float16),)

    def encode(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        normalized = values / scale.float().clamp_min(torch.finfo(torch.float32).tiny)
        if options.p == 2:
            normalized = normalized.reshape(*normalized.shape[:-1], -1, 2)
        return nearest(normalized, grid).to(torch.uint8)

    def decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return points[codes.long()].reshape(*codes.shape[:-1], -1) * scale.float()

    def packed(codes: torch.Tensor, scale: torch.Tensor) -> PackedLinear:
        buffers = {"codes": pack_bits(codes, options.bits * options.p), "scales": scale, "signs": signs.to(torch.int8)}
        return _packed(buffers, options, weight.numel())

    return ScalarGrid(options.group_size, scales, encode, decode, packed, _GroupRotation(signs, options), options.p)


@dataclass(frozen=True)
class _GroupRotation:
    """HIGGS's basis: ``x ↦ rotate(x_group, signs)`` for every group of the last dim (a ``BasisRotation``)."""

    signs: torch.Tensor
    options: HiggsOptions

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(*x.shape[:-1], -1, self.options.group_size)
        return rotate(groups, self.signs.to(x.dtype)).reshape(x.shape)

    def dequantize(self, packed: PackedLinear) -> torch.Tensor:
        return rotated_weight(packed.buffers["codes"], packed.buffers["scales"], self.options.group_size,
                              self.options.bits, self.options.p)


register_format(QuantFormat("higgs", _pack, _dequantize, HiggsOptions, _rejects, grid_quantizer(_grid)))
