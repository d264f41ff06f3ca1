"""fp4: e2m1 weights (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), two codes per byte, one scale per block.

A code is the sign in bit 3 and the magnitude's index (0..7) in bits 0-2, packed
like int4 (column ``2j`` in the low nibble). Two variants, after the hardware
formats:

- ``mx`` (OCP Microscaling MXFP4): blocks of 32 with an e8m0 scale, a uint8
  exponent ``e`` meaning ``2**(e - 127)``. The MX spec's conversion takes
  ``e = floor(log2(amax)) - 2`` (2 = the exponent of e2m1's largest value, 6), so a
  block's amax lands in [4, 8) and values above 6 saturate; ``e + 1`` saturates
  nothing but rounds the rest more coarsely. Each block takes whichever of the two
  rounds it with the smaller squared error (ties: the spec's): still a valid MX
  encoding, any decoder reads it. MSE on N(0, 1) 0.01246 against 0.01323 with
  the spec's rule alone (the ≈0.0132 of REFERENCES.md) and 0.01334 with the
  smallest exponent that saturates nothing; MiniLM mean cosine 0.9625 against
  0.9617. 4.25 bits per weight.
- ``nv`` (NVFP4): blocks of 16 with a float8 e4m3 scale ``(amax / 6) / global``
  and a float32 per-tensor ``global = amax(tensor) / (6 * 448)`` that keeps the
  block scales inside e4m3's range. 4.5 bits per weight plus 32 per tensor.

GPTQ (``kernels.gptq``) fixes the block scales the same way, from the weight before
any error update (act-order's static groups), so an identity Hessian gives RTN's
buffers. Choosing the exponent by error matters more there than for RTN: with the
spec's rule alone, saturated weights' large errors, pushed by GPTQ onto inputs that
are rarely active, left MiniLM at mean cosine 0.93–0.95 (RTN: 0.961); the smallest
exponent that saturates nothing gave 0.976, the error-minimising choice 0.979, with
act-order 0.981 and with GPTQ's damping at 0.03 0.982 (``benchmarks/quant_quality.py``).

Values round to the nearest e2m1 value, ties to the even code, as hardware does;
negative values that round to zero keep their sign (code 8, -0.0). The CPU fast
path is the native 4-bit lookup-table GEMV: the table is the e2m1 values (times
``global`` for nv) and it reads the raw uint8 / float8 block scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimgraph.kernels import native
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.gptq import ScalarGrid, grid_quantizer
from slimgraph.kernels.int4 import pack_nibbles, unpack_nibbles

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_VALUES = torch.cat((E2M1_MAGNITUDES, -E2M1_MAGNITUDES))  # indexed by code; code 8 is -0.0
E2M1_MAX = 6.0
E2M1_MAX_EXPONENT = 2  # 6 = 1.5 * 2**2
E8M0_BIAS = 127
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
BLOCK_SIZES = {"mx": 32, "nv": 16}
SIGN_BIT = 8


@dataclass(frozen=True)
class Fp4Options:
    variant: str = "mx"

    def __post_init__(self) -> None:
        if self.variant not in BLOCK_SIZES:
            raise ValueError(f"fp4 variant={self.variant!r} is not one of {tuple(BLOCK_SIZES)}")

    @property
    def block_size(self) -> int:
        return BLOCK_SIZES[self.variant]


def quantize_weight_fp4(weight: torch.Tensor, variant: str = "mx") -> dict[str, torch.Tensor | None]:
    """``packed`` uint8 ``[out, in/2]``, ``scales`` ``[out, in/block]`` (uint8 e8m0 for mx,
    float8_e4m3fn for nv) and ``global_scale`` (float32 ``[1]`` for nv, ``None`` for mx).

        >>> quantize_weight_fp4(torch.full((1, 32), 3.0))["scales"]  # 3 = 1.5 * 2**1 → scale 2**(1 - 2)
        tensor([[126]], dtype=torch.uint8)
    """
    blocks = weight.detach().float().reshape(weight.shape[0], -1, BLOCK_SIZES[variant])
    global_scale = nv_global_scale(blocks) if variant == "nv" else None
    scales = fp4_scales(blocks, global_scale)
    codes = encode_fp4(blocks, scales[..., None], global_scale).reshape(weight.shape)
    return {"packed": pack_nibbles(codes), "scales": scales, "global_scale": global_scale}


def fp4_scales(blocks: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """Per-block scales of ``blocks [..., block]``: e8m0 exponents (mx, no global scale) or e4m3 (nv)."""
    if global_scale is None:
        return e8m0_least_error_exponents(blocks)
    return nv_block_scales(blocks.abs().amax(dim=-1), global_scale)


def encode_fp4(values: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """e2m1 codes of ``values`` divided by their block's scale (``scales`` broadcasts against ``values``)."""
    block_scales = _decoded_scales(scales) if global_scale is None else scales.float() * global_scale
    # A block whose e4m3 scale underflowed to 0 dequantizes to 0 whatever its codes; divide by 1 instead.
    return round_to_e2m1(values / torch.where(block_scales > 0, block_scales, 1.0))


def decode_fp4(codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """``lut[code] * scale`` with ``lut`` the e2m1 values (times the global scale for nv)."""
    return _lookup_table(global_scale).to(codes.device)[codes.long()] * _decoded_scales(scales)


def e8m0_block_exponents(amax: torch.Tensor) -> torch.Tensor:
    """The MX shared exponent ``floor(log2(amax)) - 2``, biased by 127, as uint8 (zero blocks get 2**-3)."""
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent with m in [0.5, 1): exact floor(log2) = exponent - 1
    shared = exponent - 1 - E2M1_MAX_EXPONENT
    return (shared + E8M0_BIAS).clamp(0, 2 * E8M0_BIAS).to(torch.uint8)  # 255 is e8m0's NaN


def e8m0_least_error_exponents(blocks: torch.Tensor) -> torch.Tensor:
    """Per block of ``blocks [..., 32]``: the MX rule's exponent or one more, whichever rounds it closer.

    Squared error summed over the block; a tie keeps the MX rule's (biased uint8 exponents)::

        >>> e8m0_least_error_exponents(torch.tensor([[7.5] + [1.0] * 31]))  # 7.5 → 6 under 2**0, → 8 under 2**1
        tensor([128], dtype=torch.uint8)
    """
    rule = e8m0_block_exponents(blocks.abs().amax(dim=-1))
    coarser = (rule.int() + 1).clamp(max=2 * E8M0_BIAS).to(torch.uint8)
    errors = [(decode_fp4(encode_fp4(blocks, e[..., None], None), e[..., None], None) - blocks).pow(2).sum(-1)
              for e in (rule, coarser)]
    return torch.where(errors[1] < errors[0], coarser, rule)


def nv_global_scale(blocks: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 ``[1]`` per-tensor scale ``amax / (6 * 448)``, which keeps block scales inside e4m3."""
    tensor_amax = blocks.abs().amax()
    return torch.where(tensor_amax > 0, tensor_amax / (E2M1_MAX * E4M3_MAX), 1.0).reshape(1)


def nv_block_scales(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 block scales with ``global * scale ≈ amax / 6``."""
    return (amax / E2M1_MAX / global_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def decode_e8m0(exponents: torch.Tensor) -> torch.Tensor:
    """uint8 ``e`` → float32 ``2**(e - 127)``, exactly (0 → 2**-127, a float32 subnormal)."""
    return exponents.view(torch.float8_e8m0fnu).float()


def round_to_e2m1(values: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, sign in bit 3) of the nearest e2m1 values, ties to the even code, saturating at ±6."""
    magnitudes = values.abs().clamp(max=E2M1_MAX).contiguous()  # bucketize copies (and warns) otherwise
    midpoints = (E2M1_MAGNITUDES[1:] + E2M1_MAGNITUDES[:-1]).to(values.device) / 2
    below = torch.bucketize(magnitudes, midpoints)  # a tie goes to the smaller magnitude...
    above = torch.bucketize(magnitudes, midpoints, right=True)  # ...or to the larger one
    magnitude_codes = torch.where(below % 2 == 1, above, below)  # ties differ by one: keep the even code
    return (magnitude_codes + SIGN_BIT * values.signbit()).to(torch.uint8)


def dequantize_fp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
                   group_size: int) -> torch.Tensor:
    """``lut[code] * scale[block]`` with ``lut`` the e2m1 values (times the global scale for nv)."""
    codes = unpack_nibbles(packed).reshape(packed.shape[0], -1, group_size)
    return decode_fp4(codes, scales[..., None], global_scale).reshape(packed.shape[0], -1)


@torch.library.custom_op("slimgraph::linear_fp4", mutates_args=())
@native.cpu_kernel("linear_fp4", lambda: (E2M1_VALUES,))
def linear_fp4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
               bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``x @ W.T + bias`` with W the dequantized fp4 weight; native lookup-table GEMV on CPU when built."""
    kernels = native.for_input(x)
    if kernels is not None:
        # nv's per-tensor scale goes on x, not into the table, which then stays exact in int8 (csrc/ops.cpp).
        x = x if global_scale is None else x * global_scale
        return kernels.lut4_linear(x.contiguous(), packed, E2M1_VALUES, scales, bias, group_size)
    return F.linear(x, dequantize_fp4(packed, scales, global_scale, group_size).to(x.dtype), bias)


@linear_fp4.register_fake
def _(x, packed, scales, global_scale, bias, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _decoded_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales as float32: e8m0 exponents (uint8) decoded, e4m3 widened (without the global scale)."""
    return decode_e8m0(scales) if scales.dtype == torch.uint8 else scales.float()


def _lookup_table(global_scale: torch.Tensor | None) -> torch.Tensor:
    """The 16 code values; nv folds its per-tensor scale in, so the kernel sees one scale per block."""
    return E2M1_VALUES if global_scale is None else E2M1_VALUES.to(global_scale.device) * global_scale


def _pack(weight: torch.Tensor, options: Fp4Options) -> PackedLinear:
    return _packed(quantize_weight_fp4(weight, options.variant), weight.numel(), options)


def _grid(weight: torch.Tensor, options: Fp4Options) -> ScalarGrid:
    """nv's per-tensor scale is fixed from ``weight`` (its amax); the block scales as RTN's, from the values given."""
    global_scale = nv_global_scale(weight.float()) if options.variant == "nv" else None

    def packed(codes: torch.Tensor, scales: torch.Tensor) -> PackedLinear:
        buffers = {"packed": pack_nibbles(codes), "scales": scales, "global_scale": global_scale}
        return _packed(buffers, codes.numel(), options)

    return ScalarGrid(options.block_size, lambda blocks, _: (fp4_scales(blocks, global_scale),),
                      lambda values, scales: encode_fp4(values, scales, global_scale),
                      lambda codes, scales: decode_fp4(codes, scales, global_scale), packed)


def _packed(buffers: dict[str, torch.Tensor | None], numel: int, options: Fp4Options) -> PackedLinear:
    bits = 4 + 8 / options.block_size + (32 / numel if options.variant == "nv" else 0)
    return PackedLinear(torch.ops.slimgraph.linear_fp4.default, buffers, {"group_size": options.block_size},
                        bits_per_weight=bits)


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    b = packed.buffers
    return dequantize_fp4(b["packed"], b["scales"], b["global_scale"], packed.params["group_size"])


def _rejects(weight: torch.Tensor, options: Fp4Options) -> str | None:
    if weight.shape[1] % options.block_size:
        return (f"in_features={weight.shape[1]} is not divisible by the fp4 {options.variant} "
                f"block size {options.block_size}")
    return None


register_format(QuantFormat("fp4", _pack, _dequantize, Fp4Options, _rejects, grid_quantizer(_grid)))
