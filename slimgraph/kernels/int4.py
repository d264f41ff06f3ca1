"""int4: group-wise 4-bit weights, two codes per byte.

Asymmetric (default): ``w = (q - zero) * scale`` with q in [0, 15] and a uint8
zero point per group (min–max range). Symmetric: q in [1, 15] around a fixed
zero point 8 (i.e. [-7, 7]), scale = absmax / 7, no zeros stored. Scales are
float16. Column ``2j`` sits in the low nibble, ``2j + 1`` in the high nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimgraph.kernels import native
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.gptq import ScalarGrid, grid_quantizer

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Int4Options:
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={self.group_size} is not one of {GROUP_SIZES}")


def quantize_weight_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(packed uint8 [out, in/2], scales float16 [out, in/g], zeros uint8 [out, in/g] | None)``."""
    groups = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    scales, zeros = int4_scales(groups, symmetric)
    codes = encode_int4(groups, scales[..., None], None if zeros is None else zeros[..., None])
    return pack_nibbles(codes.reshape(weight.shape)), scales, zeros


def int4_scales(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group ``(scales float16, zeros uint8 | None)`` of ``groups [..., g]``: absmax / 7, or min–max / 15.

    The asymmetric range always includes 0, so the uint8 zero point can represent it
    (an all-positive group [1, 2] would otherwise decode to all ones); scales never
    round to 0 in float16, so a constant or all-zero group stays finite.
    """
    smallest = torch.finfo(torch.float16).tiny
    if symmetric:
        return (groups.abs().amax(dim=-1) / 7).clamp_min(smallest).half(), None
    low, high = groups.amin(dim=-1).clamp_max(0), groups.amax(dim=-1).clamp_min(0)
    scales = ((high - low) / 15).clamp_min(smallest).half()
    return scales, torch.round(-low / scales.float()).clamp(0, 15).to(torch.uint8)


def encode_int4(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes in [0, 15] of ``values`` with the given scales (and zeros), which broadcast against it."""
    if zeros is None:
        return (torch.round(values / scales.float()).clamp(-7, 7) + 8).to(torch.uint8)
    return torch.round(values / scales.float() + zeros.float()).clamp(0, 15).to(torch.uint8)


def decode_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """``(code - zero) * scale`` (zero 8 when symmetric), float32; the inverse of ``encode_int4`` on the grid."""
    offsets = zeros.float() if zeros is not None else 8.0
    return (codes.float() - offsets) * scales.float()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], ``[rows, 2n]`` → ``[rows, n]`` bytes (even column in the low nibble)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    codes = unpack_nibbles(packed).reshape(packed.shape[0], -1, group_size)
    return decode_int4(codes, scales[..., None], None if zeros is None else zeros[..., None]).reshape(packed.shape[0], -1)


@torch.library.custom_op("slimgraph::linear_int4", mutates_args=())
@native.cpu_kernel("linear_int4")
def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``x @ W.T + bias`` with W the dequantized int4 weight; native GEMV on CPU when built."""
    kernels = native.for_input(x)
    if kernels is not None:
        return kernels.int4_linear(x.contiguous(), packed, scales, zeros, bias, group_size)
    return F.linear(x, dequantize_int4(packed, scales, zeros, group_size).to(x.dtype), bias)


@linear_int4.register_fake
def _(x, packed, scales, zeros, bias, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _pack(weight: torch.Tensor, options: Int4Options) -> PackedLinear:
    return _packed(*quantize_weight_int4(weight, options.group_size, options.symmetric), options)


def _grid(weight: torch.Tensor, options: Int4Options) -> ScalarGrid:
    return ScalarGrid(options.group_size, lambda groups, _: int4_scales(groups, options.symmetric), encode_int4,
                      decode_int4, lambda codes, scales, zeros: _packed(pack_nibbles(codes), scales, zeros, options))


def _packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, options: Int4Options
            ) -> PackedLinear:
    extra_bits = 16 + (0 if options.symmetric else 8)  # a float16 scale (and a uint8 zero) per group
    return PackedLinear(torch.ops.slimgraph.linear_int4.default,
                        {"packed": packed, "scales": scales, "zeros": zeros},
                        {"group_size": options.group_size}, bits_per_weight=4 + extra_bits / options.group_size)


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    b = packed.buffers
    return dequantize_int4(b["packed"], b["scales"], b["zeros"], packed.params["group_size"])


def _rejects(weight: torch.Tensor, options: Int4Options) -> str | None:
    if weight.shape[1] % options.group_size:
        return f"in_features={weight.shape[1]} is not divisible by group_size={options.group_size}"
    return None


register_format(QuantFormat("int4", _pack, _dequantize, Int4Options, _rejects, grid_quantizer(_grid)))
