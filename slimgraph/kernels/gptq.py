"""GPTQ: data-aware rounding for any format with a scalar grid (Frantar et al. 2022).

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns of
``W [out, in]`` in order and, after each one, spreads its rounding error over the
columns not yet rounded, weighted by the inverse Hessian ``H⁻¹`` of the layer's
inputs ``X`` (``H ∝ XᵀX``), so that ``X·Qᵀ`` stays close to ``X·Wᵀ`` on the
calibration data. The weight error grows; the output error shrinks::

    hessian = sum(x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double() for x in inputs)
    packed = gptq_pack(FORMATS["nf4"], linear.weight, hessian, Nf4Options())
    FORMATS["nf4"].dequantize(packed)  # exactly the Q GPTQ chose; packed(x, bias) computes with it

A format opts in with ``QuantFormat.group_quantizer(weight, options)``, which returns
a :class:`GroupQuantizer`: per-tensor constants are fixed from ``weight``, a group's
scales when GPTQ reaches the group's first column, from that group's *current*
(error-updated) columns, as the GPTQ paper does. Most formats describe their grid
as a :class:`ScalarGrid` (scales, encode, decode, pack) and take
``grid_quantizer(make_grid)``; their RTN packer calls the same scale and encode
functions, so an identity Hessian gives exactly the RTN buffers (except fp4 mx,
whose GPTQ scales do not saturate: see ``fp4._grid``). int4, nf4, fp4, int8,
fp8 and higgs (p=1) support GPTQ (int8 and fp8 have one scale per row: a group is the whole row).

Hessians from the *original* model's activations, all layers in one calibration
run, are as good as the paper's sequential ones (each from the already-quantized
layers before it): on MiniLM, within 0.001 mean cosine for nf4, int4, fp4 and higgs
(``benchmarks/gptq_minilm.py``). Count real tokens only where a mask is known:
padding tokens cost about 0.001 there.

HIGGS p=1 quantizes in its rotated basis without changing this loop. Its rotation
``R`` is block-diagonal (one orthonormal ``diag(signs)·Hadamard/√g`` block per group)
and ``X·Wᵀ = (X·R)·(W·R)ᵀ``, so GPTQ on ``W' = W·R`` with ``H' = Rᵀ·H·R`` minimises
the same output error. A quantizer whose ``rotation`` is not ``None`` (a
:class:`BasisRotation`) gets its weight and Hessian rotated after the dead-column
fix (made in the original basis), and ``pack(Q')`` is checked against ``Q'`` in the
rotated basis, where HIGGS's codes × scales are exact; ``dequantize`` un-rotates as
for RTN. HIGGS p=2 (pairs on a 2-D grid) is RTN only: its quantizer refuses p=2.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from slimgraph.kernels.formats import FORMATS, PackedLinear, QuantFormat

DAMP_RETRIES = 3  # after `damp`, try 10x and 100x larger before giving up


def gptq_pack(fmt: QuantFormat, weight: torch.Tensor, hessian: torch.Tensor, options: Any = None, *,
              damp: float = 0.01, block_size: int = 128, layer: str = "") -> PackedLinear:
    """Pack ``weight [out, in]`` in ``fmt`` with codes chosen by GPTQ.

    ``hessian`` is ``[in, in]``: ``Σ xᵀx`` over the calibration tokens ``x`` entering
    the layer (float64 is best for long sums). Its scale does not matter: sum, mean
    or the paper's ``2XᵀX`` give the same codes, since the damping is relative to
    its mean diagonal and the error update uses ratios of ``H⁻¹`` entries. An input
    that is zero on every calibration token (zero diagonal) gets weight 0. ``damp``
    adds ``damp × mean(diag H)`` to the diagonal; a Hessian still not positive
    definite is retried with 10x and 100x that before raising. ``block_size``
    columns are updated lazily together (speed only). ``layer`` names the layer in
    error messages (``encoder.layer.3.attention.self.query``).

        >>> w, x = torch.randn(64, 128), torch.randn(512, 128)
        >>> packed = gptq_pack(FORMATS["int4"], w, x.double().T @ x.double(), FORMATS["int4"].make_options(group_size=32))
        >>> packed.bits_per_weight, packed.format  # as RTN; only the codes (and scales) differ
        (4.75, 'int4')
    """
    where = f" for {layer}" if layer else ""
    if fmt.group_quantizer is None:
        supported = ", ".join(sorted(name for name, f in FORMATS.items() if f.group_quantizer)) or "none"
        raise ValueError(f"GPTQ{where}: format '{fmt.name}' does not support GPTQ (it has no group_quantizer); "
                         f"formats that do: {supported}")
    options = fmt.make_options() if options is None else options
    reason = fmt.rejects(weight, options)
    if reason:
        raise ValueError(f"GPTQ{where}: format '{fmt.name}' cannot pack a {tuple(weight.shape)} weight: {reason}")
    _check_hessian(weight, hessian, where)
    weight = weight.detach().float().clone()
    hessian = hessian.detach().to(device=weight.device, dtype=torch.float64).clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    try:
        quantizer = fmt.group_quantizer(weight, options)
    except ValueError as error:
        raise ValueError(f"GPTQ{where}: {error}") from error
    rotation = quantizer.rotation
    if rotation is not None:
        weight = rotation.rotate(weight)
        hessian = rotation.rotate(rotation.rotate(hessian).T).T  # Rᵀ·H·R = ((H·R)ᵀ·R)ᵀ, H symmetric
    inverse_cholesky = _inverse_hessian_cholesky(hessian, damp, tuple(weight.shape), where).float()
    quantized = _gptq_columns(weight, inverse_cholesky, quantizer, block_size)
    packed = quantizer.pack(quantized)
    packed.format = fmt.name
    stored = fmt.dequantize(packed) if rotation is None else rotation.dequantize(packed)
    if not torch.equal(stored, quantized):
        raise RuntimeError(f"GPTQ{where}: format '{fmt.name}': its quantizer's pack(Q) does not dequantize to Q; "
                           "its round and pack must use the same scales and grid")
    return packed


class GroupQuantizer(Protocol):
    """What GPTQ needs from a format: per-group scales, rounding to the grid, exact packing.

    ``group_size`` columns of a row share scales. GPTQ calls ``fix_scales(group,
    start)`` with the current ``[out, group_size·k]`` columns when it reaches column
    ``start`` (a multiple of ``group_size``); ``round(columns, start)`` returns the
    grid values of ``[out, n]`` columns starting at ``start`` with the fixed scales;
    ``pack(Q)`` encodes the ``[out, in]`` rounded weight with those scales, so
    ``dequantize(pack(Q))`` equals ``Q`` bit for bit::

        quantizer = FORMATS["int4"].group_quantizer(w, Int4Options(group_size=32))
        quantizer.fix_scales(w[:, 0:32], 0)        # group 0's scales, from its current columns
        q0 = quantizer.round(w[:, 0:1], 0)          # column 0 on the grid; GPTQ updates columns 1.. with w0 - q0
        ...                                          # fix_scales(w[:, 32:64], 32) on reaching column 32, and so on
        packed = quantizer.pack(q)                  # FORMATS["int4"].dequantize(packed) == q
    """

    group_size: int
    rotation: BasisRotation | None

    def fix_scales(self, group: torch.Tensor, start: int) -> None: ...

    def round(self, columns: torch.Tensor, start: int) -> torch.Tensor: ...

    def pack(self, quantized: torch.Tensor) -> PackedLinear: ...


class BasisRotation(Protocol):
    """An orthonormal ``R [in, in]`` that a format quantizes in (HIGGS's grouped randomised Hadamard).

    ``rotate(x)`` is ``x·R`` over the last dim, in ``x``'s dtype; ``dequantize(packed)``
    is the packed weight in the rotated basis, computed exactly as the format's op
    multiplies rotated activations by it (so GPTQ can check ``pack(Q') == Q'`` bit for bit)::

        rotation = FORMATS["higgs"].group_quantizer(w, HiggsOptions()).rotation
        rotation.dequantize(packed)  # == rotation.rotate(FORMATS["higgs"].dequantize(packed)), up to rounding
    """

    def rotate(self, x: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self, packed: PackedLinear) -> torch.Tensor: ...


@dataclass(frozen=True)
class ScalarGrid:
    """A format as a scalar grid with per-group scales: four functions its RTN packer shares.

    - ``scales(groups, first_group)``: per-group parameters (a tuple of ``[out, G]``
      tensors or ``None``) of ``groups [out, G, group_size]``, whose first group is
      group ``first_group`` of its row (for constants that depend on the position);
    - ``encode(values, *params)``: codes, with ``params`` broadcast against ``values``;
    - ``decode(codes, *params)``: values, computed exactly as the format's dequantize
      (``rotation.dequantize`` for a rotated grid);
    - ``packed(codes [out, in], *params)``: the ``PackedLinear``;
    - ``rotation``: the basis the grid lives in, or ``None`` for the weight's own
      (see :class:`BasisRotation`); GPTQ then hands every function rotated columns.
    """

    group_size: int
    scales: Callable[[torch.Tensor, int], tuple[torch.Tensor | None, ...]]
    encode: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    packed: Callable[..., PackedLinear]
    rotation: BasisRotation | None = None


def grid_quantizer(make_grid: Callable[[torch.Tensor, Any], ScalarGrid]
                   ) -> Callable[[torch.Tensor, Any], GroupQuantizer]:
    """A ``QuantFormat.group_quantizer`` from ``make_grid(weight, options) -> ScalarGrid``."""
    return lambda weight, options: GridQuantizer(make_grid(weight, options), weight.shape)


class GridQuantizer:
    """The ``GroupQuantizer`` of a ``ScalarGrid``: remembers each group's scales as GPTQ fixes them."""

    def __init__(self, grid: ScalarGrid, shape: torch.Size) -> None:
        self.grid, self.group_size, self.rotation = grid, grid.group_size, grid.rotation
        self.shape = tuple(shape)
        self.params: tuple[torch.Tensor | None, ...] = ()
        self.fixed = [False] * (shape[1] // grid.group_size)

    def fix_scales(self, group: torch.Tensor, start: int) -> None:
        first = start // self.group_size
        groups = group.reshape(group.shape[0], -1, self.group_size)
        new = self.grid.scales(groups, first)
        if not self.params:
            count = len(self.fixed)
            self.params = tuple(None if p is None else p.new_empty((p.shape[0], count)) for p in new)
        for stored, value in zip(self.params, new, strict=True):
            if stored is not None:
                stored[:, first:first + groups.shape[1]] = value
        self.fixed[first:first + groups.shape[1]] = [True] * groups.shape[1]

    def round(self, columns: torch.Tensor, start: int) -> torch.Tensor:
        first, last = start // self.group_size, (start + columns.shape[1] - 1) // self.group_size
        if not all(self.fixed[first:last + 1]):
            raise RuntimeError(f"columns {start}..{start + columns.shape[1] - 1} are in groups whose scales are not fixed")
        if first == last:  # GPTQ's case, one column at a time: a slice is cheaper than a gather
            params = [None if p is None else p[:, first:first + 1] for p in self.params]
        else:
            group_of_column = torch.arange(start, start + columns.shape[1]) // self.group_size
            params = [None if p is None else p[:, group_of_column] for p in self.params]
        return self.grid.decode(self.grid.encode(columns, *params), *params)

    def pack(self, quantized: torch.Tensor) -> PackedLinear:
        if not all(self.fixed):
            raise RuntimeError("pack() before the scales of every group were fixed")
        groups = quantized.reshape(self.shape[0], -1, self.group_size)
        codes = self.grid.encode(groups, *[None if p is None else p[..., None] for p in self.params])
        return self.grid.packed(codes.reshape(self.shape), *self.params)


def _check_hessian(weight: torch.Tensor, hessian: torch.Tensor, where: str) -> None:
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"GPTQ{where}: the Hessian must be [in, in] = [{in_features}, {in_features}] for a "
                         f"{tuple(weight.shape)} weight, got {list(hessian.shape)}; pass Σ xᵀx of the layer's inputs")
    if not torch.isfinite(hessian).all():
        raise ValueError(f"GPTQ{where}: the Hessian of the {tuple(weight.shape)} weight has NaN or Inf entries; "
                         "check the calibration inputs")


def _inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, shape: tuple[int, int], where: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` in float64, raising ``λ`` if ``H`` is not positive definite."""
    mean_diagonal = hessian.diagonal().mean()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    tried = [damp * 10**attempt for attempt in range(DAMP_RETRIES)]
    for damp_used in tried:
        lower, info = torch.linalg.cholesky_ex(hessian + damp_used * mean_diagonal * identity)
        if info == 0:
            # L⁻ᵀL⁻¹ by a triangular solve: torch.cholesky_inverse is ~15x slower on CPU.
            lower_inverse = torch.linalg.solve_triangular(lower, identity, upper=False)
            upper, info = torch.linalg.cholesky_ex(lower_inverse.T @ lower_inverse, upper=True)
            if info == 0:
                if damp_used != damp:
                    warnings.warn(f"GPTQ{where}: the Hessian of the {shape} weight needed damp={damp_used:g} "
                                  f"(asked for {damp:g}) to be positive definite", stacklevel=3)
                return upper
    raise ValueError(f"GPTQ{where}: the Hessian of the {shape} weight is not positive definite even with "
                     f"damp={tried[-1]:g}; check the calibration inputs or pass a larger damp")


def _gptq_columns(weight: torch.Tensor, inverse_cholesky: torch.Tensor, quantizer: GroupQuantizer,
                  block_size: int) -> torch.Tensor:
    """GPTQ's column loop with lazy block updates; returns the rounded weight ``Q``.

    It works on ``Wᵀ`` so that a column is contiguous: per-column ops on strided
    columns (``bucketize`` above all) are several times slower.
    """
    remaining = weight.T.contiguous()  # [in, out]; row i is column i of W, error-updated as GPTQ goes
    quantized = torch.empty_like(remaining)
    group_size = quantizer.group_size
    for begin, end in _block_bounds(weight.shape[1], group_size, block_size):
        block = remaining[begin:end].clone()
        errors = torch.empty_like(block)
        inverse = inverse_cholesky[begin:end, begin:end]
        for j in range(end - begin):
            column = begin + j
            if column % group_size == 0:
                # A group longer than the rest of the block starts the block, so `remaining` is current for all of it.
                current = block if j + group_size <= end - begin else remaining[begin:]
                quantizer.fix_scales(current[j:j + group_size].T, column)
            rounded = quantizer.round(block[j:j + 1].T, column).T
            quantized[column:column + 1] = rounded
            errors[j:j + 1] = (block[j:j + 1] - rounded) / inverse[j, j]
            block[j:].addr_(inverse[j, j:], errors[j], alpha=-1)
        remaining[end:] -= inverse_cholesky[begin:end, end:].T @ errors
    return quantized.T.contiguous()


def _block_bounds(columns: int, group_size: int, block_size: int) -> list[tuple[int, int]]:
    """``[begin, end)`` of the lazy-update blocks: whole groups per block, or each long group starting a block.

    Either way a group's first column sees current values for the whole group.
    """
    if block_size < 1:
        raise ValueError(f"GPTQ block_size={block_size} must be >= 1")
    if group_size <= block_size:
        starts = list(range(0, columns, block_size - block_size % group_size))
    else:
        starts = sorted({*range(0, columns, block_size), *range(0, columns, group_size)})
    return list(zip(starts, [*starts[1:], columns], strict=True))
