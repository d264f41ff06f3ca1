"""fp8: one float8 byte per weight with a float32 scale per output channel.

``w = float(q) * scale[o]`` with ``scale = absmax(row) / max(dtype)``: 448 for e4m3
(``torch.float8_e4m3fn``, 3 mantissa bits, the default) and 57344 for e5m2 (2
mantissa bits, wider range). Rounding is torch's round-to-nearest-even cast. The
CPU fast path is the native 8-bit lookup-table GEMV over the weight's bytes, with
the 256 float8 values decoded once as its table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimgraph.kernels import native
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.gptq import ScalarGrid, grid_quantizer

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _decoded_bytes(dtype: torch.dtype) -> torch.Tensor:
    """Every byte read as ``dtype``, widened: ``[256, 1]`` float32 (the NaN bytes are never produced)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()[:, None]


BYTE_LUTS = {dtype: _decoded_bytes(dtype) for dtype in DTYPES.values()}


@dataclass(frozen=True)
class Fp8Options:
    variant: str = "e4m3"

    def __post_init__(self) -> None:
        if self.variant not in DTYPES:
            raise ValueError(f"fp8 variant={self.variant!r} is not one of {tuple(DTYPES)}")


def quantize_weight_fp8(weight: torch.Tensor, variant: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight float8 [out, in], scales float32 [out])`` with ``scale = absmax / max(dtype)`` per row."""
    weight = weight.detach().float()
    scales = fp8_scales(weight, variant)
    return encode_fp8(weight, scales[:, None], variant), scales


def fp8_scales(rows: torch.Tensor, variant: str) -> torch.Tensor:
    """``absmax / max(dtype)`` of each row of ``rows [..., in]``; a zero row gets scale 1 (no floor on tiny rows)."""
    absmax = rows.abs().amax(dim=-1)
    return torch.where(absmax > 0, absmax / torch.finfo(DTYPES[variant]).max, 1.0)


def encode_fp8(values: torch.Tensor, scales: torch.Tensor, variant: str) -> torch.Tensor:
    """``values / scales`` cast to float8 (round to nearest even); ``scales`` broadcasts against ``values``."""
    largest = torch.finfo(DTYPES[variant]).max
    # The clamp catches w / scale landing a rounding error above the largest value, which the cast makes NaN.
    return (values / scales).clamp(-largest, largest).to(DTYPES[variant])


def dequantize_fp8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return decode_fp8(qweight, scales[:, None])


def decode_fp8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales


@torch.library.custom_op("slimgraph::linear_fp8", mutates_args=())
@native.cpu_kernel("linear_fp8", lambda: (BYTE_LUTS[torch.float8_e4m3fn], BYTE_LUTS[torch.float8_e5m2]))
def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (float(qweight) * scales[:, None]).T + bias``; native lookup-table GEMV on CPU when built."""
    kernels = native.for_input(x)
    if kernels is not None:
        return kernels.lut8_linear(x.contiguous(), qweight.view(torch.uint8), BYTE_LUTS[qweight.dtype],
                                   scales[:, None], bias, qweight.shape[1])
    return F.linear(x, dequantize_fp8(qweight, scales).to(x.dtype), bias)


@linear_fp8.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _pack(weight: torch.Tensor, options: Fp8Options) -> PackedLinear:
    return _packed(*quantize_weight_fp8(weight, options.variant))


def _grid(weight: torch.Tensor, options: Fp8Options) -> ScalarGrid:
    """One group per row: GPTQ fixes every row's scale at the first column, from the whole row."""
    return ScalarGrid(weight.shape[1], lambda rows, _: (fp8_scales(rows, options.variant),),
                      lambda values, scales: encode_fp8(values, scales, options.variant), decode_fp8,
                      lambda qweight, scales: _packed(qweight, scales.flatten()))


def _packed(qweight: torch.Tensor, scales: torch.Tensor) -> PackedLinear:
    return PackedLinear(torch.ops.slimgraph.linear_fp8.default, {"qweight": qweight, "scales": scales},
                        bits_per_weight=8 + 32 / qweight.shape[1])


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    return dequantize_fp8(packed.buffers["qweight"], packed.buffers["scales"])


register_format(QuantFormat("fp8", _pack, _dequantize, Fp8Options, group_quantizer=grid_quantizer(_grid)))
