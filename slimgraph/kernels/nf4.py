"""nf4: the QLoRA NormalFloat-4 code, absmax scale per block of 64 weights.

``w = NF4[q] * absmax[block]``. With ``double_quant`` the block absmaxes are
themselves quantized to 8 bits in blocks of 256 after subtracting their mean
(QLoRA): 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight instead of 4.5.

The CPU fast path is the native 4-bit lookup-table GEMV with the NF4 code as its
table and the absmaxes as float32 group scales (double-quantized ones are expanded
first: one float per 64 weights, negligible next to the GEMV).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimgraph.kernels import native
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.gptq import ScalarGrid, grid_quantizer
from slimgraph.kernels.int4 import pack_nibbles, unpack_nibbles

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
BLOCK_SIZE = 64
SCALE_BLOCK = 256


@dataclass(frozen=True)
class Nf4Options:
    double_quant: bool = False


def quantize_weight_nf4(weight: torch.Tensor, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """Packed codes ``[out, in/2]`` and the block absmaxes (float32, or 8-bit codes + scale + mean)."""
    blocks = weight.detach().float().reshape(-1, BLOCK_SIZE)
    absmax = nf4_absmax(blocks)
    if double_quant:
        absmax_codes, absmax_scales, absmax_mean = _quantize_absmax(absmax)
        absmax = _dequantize_absmax(absmax_codes, absmax_scales, absmax_mean)
    buffers = {"packed": pack_nibbles(encode_nf4(blocks, absmax[:, None]).reshape(weight.shape))}
    if double_quant:
        buffers |= {"absmax": absmax_codes, "absmax_scales": absmax_scales, "absmax_mean": absmax_mean}
    else:
        buffers["absmax"] = absmax
    return buffers


def nf4_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The scale of each block of ``blocks [..., 64]``: its absmax (at least 1e-12)."""
    return blocks.abs().amax(dim=-1).clamp_min(1e-12)


def encode_nf4(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """uint8 codes of the nearest NF4 values of ``values / absmax`` (``absmax`` broadcasts against ``values``)."""
    normalized = (values / absmax).contiguous()  # bucketize copies (and warns) otherwise
    return torch.bucketize(normalized, NF4_MIDPOINTS.to(values.device)).to(torch.uint8)


def decode_nf4(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return NF4_CODE.to(codes.device)[codes.long()] * absmax


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = absmax.mean()
    centered = absmax - mean
    padded = F.pad(centered, (0, -centered.numel() % SCALE_BLOCK)).reshape(-1, SCALE_BLOCK)
    scales = padded.abs().amax(dim=1).clamp_min(1e-12) / 127
    codes = torch.round(padded / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.flatten()[: absmax.numel()], scales, mean.reshape(1)


def _dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    padded = F.pad(codes.float(), (0, -codes.numel() % SCALE_BLOCK)).reshape(-1, SCALE_BLOCK)
    return (padded * scales[:, None]).flatten()[: codes.numel()] + mean


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, absmax_scales: torch.Tensor | None = None,
                   absmax_mean: torch.Tensor | None = None) -> torch.Tensor:
    if absmax_scales is not None:
        absmax = _dequantize_absmax(absmax, absmax_scales, absmax_mean)
    codes = unpack_nibbles(packed).reshape(-1, BLOCK_SIZE)
    return decode_nf4(codes, absmax[:, None]).reshape(packed.shape[0], -1)


@torch.library.custom_op("slimgraph::linear_nf4", mutates_args=())
@native.cpu_kernel("linear_nf4", lambda: (NF4_CODE,))
def linear_nf4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax_scales: torch.Tensor | None,
               absmax_mean: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with W the dequantized NF4 weight; native lookup-table GEMV on CPU when built."""
    kernels = native.for_input(x)
    if kernels is not None:
        if absmax_scales is not None:
            absmax = _dequantize_absmax(absmax, absmax_scales, absmax_mean)
        scales = absmax.reshape(packed.shape[0], -1)  # blocks of 64 run along each row: [out, in/64]
        return kernels.lut4_linear(x.contiguous(), packed, NF4_CODE, scales, bias, BLOCK_SIZE)
    return F.linear(x, dequantize_nf4(packed, absmax, absmax_scales, absmax_mean).to(x.dtype), bias)


@linear_nf4.register_fake
def _(x, packed, absmax, absmax_scales, absmax_mean, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _pack(weight: torch.Tensor, options: Nf4Options) -> PackedLinear:
    return _packed(quantize_weight_nf4(weight, options.double_quant), weight.numel())


def _grid(weight: torch.Tensor, options: Nf4Options) -> ScalarGrid:
    """Without double quantization a group's scale is its absmax; with it, the nearest 8-bit absmax code.

    The 8-bit codes' mean and per-256 scales are fixed from ``weight``'s absmaxes (as RTN
    computes them), so each group's absmax is rounded when GPTQ fixes it and ``pack``
    stores exactly the absmax the group was rounded with.
    """
    if not options.double_quant:
        return ScalarGrid(BLOCK_SIZE, lambda groups, _: (nf4_absmax(groups),), encode_nf4, decode_nf4,
                          lambda codes, absmax: _packed({"packed": pack_nibbles(codes), "absmax": absmax.flatten()},
                                                        codes.numel()))
    out_features, blocks_per_row = weight.shape[0], weight.shape[1] // BLOCK_SIZE
    _, absmax_scales, absmax_mean = _quantize_absmax(nf4_absmax(weight.float().reshape(-1, BLOCK_SIZE)))
    scale_of_block = absmax_scales.repeat_interleave(SCALE_BLOCK)[: out_features * blocks_per_row]
    scale_of_block = scale_of_block.reshape(out_features, blocks_per_row)

    def scales(groups: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        block_scales = scale_of_block[:, first:first + groups.shape[1]]
        codes = torch.round((nf4_absmax(groups) - absmax_mean) / block_scales).clamp(-127, 127)
        return codes * block_scales + absmax_mean, codes.to(torch.int8)  # as _dequantize_absmax computes it

    def packed(codes: torch.Tensor, absmax: torch.Tensor, absmax_codes: torch.Tensor) -> PackedLinear:
        buffers = {"packed": pack_nibbles(codes), "absmax": absmax_codes.flatten(),
                   "absmax_scales": absmax_scales, "absmax_mean": absmax_mean}
        return _packed(buffers, codes.numel())

    return ScalarGrid(BLOCK_SIZE, scales, lambda values, absmax, _: encode_nf4(values, absmax),
                      lambda codes, absmax, _: decode_nf4(codes, absmax), packed)


def _packed(buffers: dict[str, torch.Tensor], numel: int) -> PackedLinear:
    buffers.setdefault("absmax_scales", None)
    buffers.setdefault("absmax_mean", None)
    bits = sum(t.numel() * t.element_size() * 8 for t in buffers.values() if t is not None) / numel
    return PackedLinear(torch.ops.slimgraph.linear_nf4.default, buffers, bits_per_weight=bits)


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    b = packed.buffers
    return dequantize_nf4(b["packed"], b["absmax"], b["absmax_scales"], b["absmax_mean"])


def _rejects(weight: torch.Tensor, options: Nf4Options) -> str | None:
    if weight.shape[1] % BLOCK_SIZE:
        return f"in_features={weight.shape[1]} is not divisible by the NF4 block size {BLOCK_SIZE}"
    return None


register_format(QuantFormat("nf4", _pack, _dequantize, Nf4Options, _rejects, grid_quantizer(_grid)))
