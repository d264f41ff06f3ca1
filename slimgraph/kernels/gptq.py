"""GPTQ: data-aware rounding for any format with a scalar or 2-D grid (Frantar et al. 2022).

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns of
``W [out, in]`` in order and, after each one, spreads its rounding error over the
columns not yet rounded, weighted by the inverse Hessian ``H⁻¹`` of the layer's
inputs ``X`` (``H ∝ XᵀX``), so that ``X·Qᵀ`` stays close to ``X·Wᵀ`` on the
calibration data. The weight error grows; the output error shrinks::

    hessian = sum(x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double() for x in inputs)
    packed = gptq_pack(FORMATS["nf4"], linear.weight, hessian, Nf4Options())
    FORMATS["nf4"].dequantize(packed)  # exactly the Q GPTQ chose; packed(x, bias) computes with it

By default the columns go in *act-order*, by descending ``diag H`` (the GPTQ authors'
code; a vector grid's pairs move together): the inputs with the most energy are
rounded first, while many columns remain to absorb their error. The order mixes
groups, so every group's scales are fixed first, from the unmodified weight ("static
groups"). ``act_order=False`` goes left to right and fixes a group's scales when it
reaches the group's first column, from its *current* (error-updated) columns, as the
GPTQ paper does. On MiniLM (mean sentence-embedding cosine, ``benchmarks/quant_quality.py``,
damp 0.01), left to right → act-order: int4 g32 0.9885 → 0.9895, int4 g128 0.9804 → 0.9829, nf4
0.9860 → 0.9874, MXFP4 0.9789 → 0.9814, NVFP4 0.9863 → 0.9875, fp8 0.99899 → 0.99913;
HIGGS, whose rotation evens out ``diag H``, moved by less than 0.0005 (p=1 0.9883 →
0.9882, p=2 0.9904 → 0.9899).

A format opts in with ``QuantFormat.group_quantizer(weight, options)``, which returns
a :class:`GroupQuantizer`: per-tensor constants are fixed from ``weight``, group
scales as above. Most formats describe their grid as a :class:`ScalarGrid` (scales,
encode, decode, pack) and take ``grid_quantizer(make_grid)``; their RTN packer calls
the same scale and encode functions, so an identity Hessian gives exactly the RTN
buffers. int4, nf4, fp4, int8, fp8 and higgs (p=1 and p=2) support GPTQ (int8 and
fp8 have one scale per row: a group is the whole row).

Hessians from the *original* model's activations, all layers in one calibration
run, are as good as the paper's sequential ones (each from the already-quantized
layers before it): on MiniLM, within 0.001 mean cosine for nf4, int4, fp4 and higgs
(``benchmarks/gptq_minilm.py``, act-order, damp 0.03). Count real tokens only where
a mask is known: padding tokens cost 0.001-0.002 there.

HIGGS quantizes in its rotated basis without changing this loop. Its rotation
``R`` is block-diagonal (one orthonormal ``diag(signs)·Hadamard/√g`` block per group)
and ``X·Wᵀ = (X·R)·(W·R)ᵀ``, so GPTQ on ``W' = W·R`` with ``H' = Rᵀ·H·R`` minimises
the same output error. A quantizer whose ``rotation`` is not ``None`` (a
:class:`BasisRotation`) gets its weight and Hessian rotated after the dead-column
fix (made in the original basis), and ``pack(Q')`` is checked against ``Q'`` in the
rotated basis, where HIGGS's codes × scales are exact; ``dequantize`` un-rotates as
for RTN. HIGGS p=2 rounds pairs of adjacent columns to a 2-D grid (``ScalarGrid.dim=2``):
GPTQ rounds both columns of a pair at once, to the nearest grid point, then spreads
their errors as for any two columns (vector GPTQ, as in GPTVQ, van Baalen et al. 2024).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from slimgraph.kernels.formats import FORMATS, PackedLinear, QuantFormat

DAMP_RETRIES = 3  # after `damp`, try 10x and 100x larger before giving up
# 3% of the mean diagonal, not the paper's 1%: a few hundred calibration sentences give a noisy H, and
# on MiniLM 0.03 beat 0.01 for every GPTQ format with 64 and with 128 calibration sentences (16 of 16
# runs, +0.00003 to +0.0014 mean cosine; 0.1 lost to 0.01 on int4 and nf4).
DEFAULT_DAMP = 0.03


def gptq_pack(fmt: QuantFormat, weight: torch.Tensor, hessian: torch.Tensor, options: Any = None, *,
              damp: float = DEFAULT_DAMP, block_size: int = 128, act_order: bool = True,
              layer: str = "") -> PackedLinear:
    """Pack ``weight [out, in]`` in ``fmt`` with codes chosen by GPTQ.

    ``hessian`` is ``[in, in]``: ``Σ xᵀx`` over the calibration tokens ``x`` entering
    the layer (float64 is best for long sums). Its scale does not matter: sum, mean
    or the paper's ``2XᵀX`` give the same codes, since the damping is relative to
    its mean diagonal and the error update uses ratios of ``H⁻¹`` entries. An input
    that is zero on every calibration token (zero diagonal) gets weight 0. ``damp``
    adds ``damp × mean(diag H)`` to the diagonal; a Hessian still not positive
    definite is retried with 10x and 100x that before raising. ``block_size``
    columns are updated lazily together (speed only). ``act_order`` rounds the
    columns by descending ``diag H`` with every group's scales fixed first, from the
    unmodified weight ("static groups"); ``act_order=False`` rounds them left to
    right, each group's scales from its error-updated columns. ``layer`` names the
    layer in error messages (``encoder.layer.3.attention.self.query``).

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
    order = _activation_order(hessian, quantizer.step) if act_order else None
    if order is not None:
        quantizer.fix_scales(weight, 0)  # static groups: the order mixes groups, so scales come first
        weight, hessian = weight[:, order], hessian[order][:, order]
    inverse_cholesky = _inverse_hessian_cholesky(hessian, damp, tuple(weight.shape), where).float()
    quantized = _gptq_columns(weight, inverse_cholesky, quantizer, block_size, order)
    if order is not None:
        quantized = quantized[:, torch.argsort(order)]
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
    ``start`` (a multiple of ``group_size``), or once with the whole weight under
    act-order; ``round(columns, start)`` returns the grid values of ``[out, n]``
    columns starting at ``start`` with the fixed scales, ``step`` columns at a time
    (1 for a scalar grid, 2 for a grid of pairs);
    ``pack(Q)`` encodes the ``[out, in]`` rounded weight with those scales, so
    ``dequantize(pack(Q))`` equals ``Q`` bit for bit::

        quantizer = FORMATS["int4"].group_quantizer(w, Int4Options(group_size=32))
        quantizer.fix_scales(w[:, 0:32], 0)        # group 0's scales, from its current columns
        q0 = quantizer.round(w[:, 0:1], 0)          # column 0 on the grid; GPTQ updates columns 1.. with w0 - q0
        ...                                          # fix_scales(w[:, 32:64], 32) on reaching column 32, and so on
        packed = quantizer.pack(q)                  # FORMATS["int4"].dequantize(packed) == q
    """

    group_size: int
    step: int
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
      (see :class:`BasisRotation`); GPTQ then hands every function rotated columns;
    - ``dim``: values per code. A grid of pairs (``dim=2``, HIGGS p=2) encodes
      ``[..., n]`` values as ``[..., n/2]`` codes of adjacent pairs, decodes them back
      to ``[..., n]``, and GPTQ rounds two columns per step.
    """

    group_size: int
    scales: Callable[[torch.Tensor, int], tuple[torch.Tensor | None, ...]]
    encode: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    packed: Callable[..., PackedLinear]
    rotation: BasisRotation | None = None
    dim: int = 1


def grid_quantizer(make_grid: Callable[[torch.Tensor, Any], ScalarGrid]
                   ) -> Callable[[torch.Tensor, Any], GroupQuantizer]:
    """A ``QuantFormat.group_quantizer`` from ``make_grid(weight, options) -> ScalarGrid``."""
    return lambda weight, options: GridQuantizer(make_grid(weight, options), weight.shape)


class GridQuantizer:
    """The ``GroupQuantizer`` of a ``ScalarGrid``: remembers each group's scales as GPTQ fixes them."""

    def __init__(self, grid: ScalarGrid, shape: torch.Size) -> None:
        self.grid, self.group_size, self.step, self.rotation = grid, grid.group_size, grid.dim, grid.rotation
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
        if first == last:  # GPTQ's case, one step at a time: a slice is cheaper than a gather
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
        return self.grid.packed(codes.reshape(self.shape[0], -1), *self.params)


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
                  block_size: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's column loop with lazy block updates; returns the rounded weight ``Q``.

    Column ``c`` of ``weight`` is column ``order[c]`` of the layer (act-order, every
    group's scales already fixed) or column ``c`` (each group's scales fixed on reaching
    it). A vector grid rounds ``quantizer.step`` adjacent columns together; their errors
    then spread one column at a time as for a scalar grid, which is the block update
    ``W_rest -= E·U_bb⁻¹·U_b,rest`` of vector GPTQ (GPTVQ, van Baalen et al. 2024).
    It works on ``Wᵀ`` so that a column is contiguous: per-column ops on strided
    columns (``bucketize`` above all) are several times slower.
    """
    remaining = weight.T.contiguous()  # [in, out]; row i is column i of W, error-updated as GPTQ goes
    quantized = torch.empty_like(remaining)
    group_size, step = quantizer.group_size, quantizer.step
    layer_columns = range(weight.shape[1]) if order is None else order.tolist()
    for begin, end in _block_bounds(weight.shape[1], group_size, block_size, step):
        block = remaining[begin:end].clone()
        errors = torch.empty_like(block)
        inverse = inverse_cholesky[begin:end, begin:end]
        for j in range(0, end - begin, step):
            column = begin + j
            if order is None and column % group_size == 0:
                # A group longer than the rest of the block starts the block, so `remaining` is current for all of it.
                current = block if j + group_size <= end - begin else remaining[begin:]
                quantizer.fix_scales(current[j:j + group_size].T, column)
            rounded = quantizer.round(block[j:j + step].T, layer_columns[column]).T
            quantized[column:column + step] = rounded
            for k in range(j, j + step):
                errors[k:k + 1] = (block[k:k + 1] - rounded[k - j]) / inverse[k, k]
                block[k:].addr_(inverse[k, k:], errors[k], alpha=-1)
        remaining[end:] -= inverse_cholesky[begin:end, end:].T @ errors
    return quantized.T.contiguous()


def _activation_order(hessian: torch.Tensor, step: int) -> torch.Tensor:
    """Columns by descending ``diag H``, ``step`` adjacent columns (a vector grid's) moving together.

    Inputs with more energy are rounded first, while many columns remain to absorb their
    error (act-order, from the GPTQ authors' code); ties keep their left-to-right order.
    """
    energy = hessian.diagonal().reshape(-1, step).sum(1)
    first = torch.argsort(energy, descending=True, stable=True) * step
    return (first[:, None] + torch.arange(step, device=first.device)).reshape(-1)


def _block_bounds(columns: int, group_size: int, block_size: int, step: int = 1) -> list[tuple[int, int]]:
    """``[begin, end)`` of the lazy-update blocks: whole groups per block, or each long group starting a block.

    Either way a group's first column sees current values for the whole group, and a
    block holds whole steps of a vector grid.
    """
    if block_size < 1:
        raise ValueError(f"GPTQ block_size={block_size} must be >= 1")
    block_size = max(step, block_size - block_size % step)
    if group_size <= block_size:
        starts = list(range(0, columns, block_size - block_size % group_size))
    else:
        starts = sorted({*range(0, columns, block_size), *range(0, columns, group_size)})
    return list(zip(starts, [*starts[1:], columns], strict=True))
