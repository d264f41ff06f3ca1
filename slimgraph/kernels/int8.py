"""int8: symmetric per-output-channel weights, ``w = q * scale[o]`` with q in [-127, 127].

Everything about the format, side by side: packing, the custom op with its torch
reference and fake implementation, and the CPU fast path (``kernels.native``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimgraph.kernels import native
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.gptq import ScalarGrid, grid_quantizer


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight int8 [out, in], scales float32 [out])`` with ``scale = absmax / 127`` per row."""
    weight = weight.detach().float()
    scales = int8_scales(weight)
    return encode_int8(weight, scales[:, None]), scales


def int8_scales(rows: torch.Tensor) -> torch.Tensor:
    """``absmax / 127`` of each row of ``rows [..., in]``."""
    return rows.abs().amax(dim=-1).clamp_min(1e-12) / 127.0


def encode_int8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.round(values / scales).clamp(-127, 127).to(torch.int8)


def decode_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales


@torch.library.custom_op("slimgraph::linear_int8", mutates_args=())
@native.cpu_kernel("linear_int8")
def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T + bias``; native AVX2 GEMV on CPU when built."""
    kernels = native.for_input(x)
    if kernels is not None:
        return kernels.int8_linear(x.contiguous(), qweight, scales, bias)
    return F.linear(x, qweight.to(x.dtype) * scales[:, None].to(x.dtype), bias)


@linear_int8.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("slimgraph::embedding_int8", mutates_args=())
def embedding_int8(indices: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``weight[indices]`` of an int8 table with one scale per row: only the rows looked up are widened."""
    return qweight[indices].float() * scales[indices].unsqueeze(-1)


@embedding_int8.register_fake
def _(indices, qweight, scales):
    return scales.new_empty((*indices.shape, qweight.shape[1]))


def _pack(weight: torch.Tensor, options: object) -> PackedLinear:
    return _packed(*quantize_weight_int8(weight))


def _grid(weight: torch.Tensor, options: object) -> ScalarGrid:
    """One group per row: GPTQ fixes every row's scale at the first column, from the whole row."""
    return ScalarGrid(weight.shape[1], lambda rows, _: (int8_scales(rows),), encode_int8, decode_int8,
                      lambda qweight, scales: _packed(qweight, scales.flatten()))


def _packed(qweight: torch.Tensor, scales: torch.Tensor) -> PackedLinear:
    return PackedLinear(torch.ops.slimgraph.linear_int8.default, {"qweight": qweight, "scales": scales},
                        bits_per_weight=8 + 32 / qweight.shape[1])


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    return decode_int8(packed.buffers["qweight"], packed.buffers["scales"][:, None])


register_format(QuantFormat("int8", _pack, _dequantize, group_quantizer=grid_quantizer(_grid)))
