"""w8a8 and llm_int8: int8 weights times int8 activations quantized at run time.

Both store what ``int8`` stores: symmetric per-output-channel weights, ``w = q · scale[o]``
with q in [−127, 127], 8 + 32/in bits per weight. What differs is the op. It quantizes
each row of ``x`` on the fly (``x_scale = amax|x_row| / 127``, 1 for an all-zero row;
round half to even; clamp to ±127) and multiplies in exact int32::

    y = (xq @ qweight.T) · x_scale[:, None] · scales[None, :] + bias

``llm_int8`` adds LLM.int8()'s outlier decomposition: the activation columns where
any ``|x| > threshold`` are zeroed before the int8 product and multiplied in floating
point against the same columns of the *dequantized* int8 weight (as bitsandbytes
does, so nothing extra is stored). Without outliers it is w8a8, bit for bit::

    packed = FORMATS["llm_int8"].pack(w, threshold=6.0)
    y = packed(x, bias)

The reference multiplies with ``torch._int_mm``, which takes any shape on CPU; on CUDA
it needs more than 16 rows and both dims multiples of 8, and other shapes go through
float64, exact for any ``in`` below 2^53 / 127². The CPU fast path is the native
``int8_dynamic_linear``, which quantizes and multiplies in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimgraph.kernels import native
from slimgraph.kernels.formats import NoOptions, PackedLinear, QuantFormat, register_format
from slimgraph.kernels.int8 import quantize_weight_int8

CUDA_INT_MM_MIN_ROWS = 17  # cuBLASLt int8 GEMM shape rules that torch._int_mm enforces on CUDA
CUDA_INT_MM_MULTIPLE = 8


@dataclass(frozen=True)
class LlmInt8Options:
    """``threshold``: an activation column with any ``|x|`` above it is an outlier (LLM.int8() uses 6.0)."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not math.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(f"llm_int8 threshold={self.threshold!r} must be a finite number > 0 "
                             "(LLM.int8() uses 6.0)")
        object.__setattr__(self, "threshold", float(self.threshold))


@torch.library.custom_op("slimgraph::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T + bias`` with ``x`` quantized to int8 per row at run time."""
    return _dynamic_int8_linear(x, qweight, scales, bias)


@linear_w8a8.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("slimgraph::linear_llm_int8", mutates_args=())
def linear_llm_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    threshold: float) -> torch.Tensor:
    """w8a8 on the inlier columns of ``x`` plus a float product on its outlier columns (``|x| > threshold``)."""
    rows = x.reshape(-1, x.shape[-1])
    outliers = (rows.abs() > threshold).any(dim=0).nonzero().squeeze(1)
    if outliers.numel() == 0:
        return _dynamic_int8_linear(x, qweight, scales, bias)
    inliers = rows.float().index_fill(1, outliers, 0)
    y = _dynamic_int8_linear(inliers, qweight, scales, bias)
    outlier_weight = qweight[:, outliers].float() * scales[:, None]
    y = y + rows[:, outliers].float() @ outlier_weight.T
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


@linear_llm_int8.register_fake
def _(x, qweight, scales, bias, threshold):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq int8 [rows, in], x_scales float32 [rows])``: symmetric absmax per row, round half to even.

    >>> quantize_rows_int8(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
    (tensor([[  64, -127], [0, 0]], dtype=torch.int8), tensor([0.0079, 1.0000]))
    """
    x = x.float()
    amax = x.abs().amax(dim=-1)
    x_scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.round(x / x_scales[:, None]).clamp(-127, 127).to(torch.int8)
    return xq, x_scales


def int8_matmul(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact ``xq @ qweight.T`` as int32 for int8 ``xq [rows, in]`` and ``qweight [out, in]``."""
    rows, in_features = xq.shape
    if xq.device.type == "cpu" or (rows >= CUDA_INT_MM_MIN_ROWS and in_features % CUDA_INT_MM_MULTIPLE == 0
                                   and qweight.shape[0] % CUDA_INT_MM_MULTIPLE == 0):
        return torch._int_mm(xq, qweight.T)
    # Each product is at most 127² and float64 holds integers up to 2^53 exactly.
    return (xq.double() @ qweight.double().T).to(torch.int32)


def _dynamic_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    kernels = native.for_input(x)
    if kernels is not None:
        return kernels.int8_dynamic_linear(x.contiguous(), qweight, scales, bias)
    xq, x_scales = quantize_rows_int8(x.reshape(-1, x.shape[-1]))
    y = int8_matmul(xq, qweight).float() * x_scales[:, None] * scales[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


def _pack(weight: torch.Tensor, options: object) -> PackedLinear:
    return _pack_int8(weight, torch.ops.slimgraph.linear_w8a8.default, {})


def _pack_llm_int8(weight: torch.Tensor, options: LlmInt8Options) -> PackedLinear:
    return _pack_int8(weight, torch.ops.slimgraph.linear_llm_int8.default, {"threshold": options.threshold})


def _pack_int8(weight: torch.Tensor, op: torch._ops.OpOverload, params: dict[str, float]) -> PackedLinear:
    qweight, scales = quantize_weight_int8(weight)
    return PackedLinear(op, {"qweight": qweight, "scales": scales}, params, bits_per_weight=8 + 32 / weight.shape[1])


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    return packed.buffers["qweight"].float() * packed.buffers["scales"][:, None]


register_format(QuantFormat("w8a8", _pack, _dequantize, NoOptions))
register_format(QuantFormat("llm_int8", _pack_llm_int8, _dequantize, LlmInt8Options))
