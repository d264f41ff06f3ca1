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

``smooth=α`` (both formats) is SmoothQuant (Xiao et al. 2022): per-token int8 rounds
every column of a row with the step of its largest entry, so the few input channels
whose activations are much larger than the rest cost all the others their precision.
From each input channel's ``max|X_j|`` on calibration data (``input_absmax``) and the
weight's ``max|W_j|``, ``s_j = max|X_j|^α / max|W_j|^(1−α)`` moves part of that range
into the weight: ``W·diag(s)`` is quantized and stored, and the op multiplies ``x`` by
the stored float32 ``smooth = 1/s`` before quantizing it, so ``y`` is unchanged in exact
arithmetic. ``bits_per_weight`` counts the 32 bits per input channel::

    packed = smoothquant_pack(FORMATS["w8a8"], w, input_absmax, W8a8Options(smooth=0.5))
    y = packed(x, bias)  # w8a8 of (x · smooth) against the int8 weight of W · diag(s)

The ``quantize`` pass gathers ``input_absmax`` from ``optimize(..., calibration=...)``
(``quantize(format=w8a8, smooth=0.5)``). Pretrained MiniLM, mean sentence-embedding
cosine to fp32 (``benchmarks/quant_quality.py``): w8a8 0.9975, smoothed with α = 0.3 /
0.5 / 0.7: 0.9983 / 0.9991 / 0.9990; llm_int8 0.9993, smoothed (α = 0.5) 0.9994.

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
from slimgraph.kernels.formats import PackedLinear, QuantFormat, register_format
from slimgraph.kernels.int8 import quantize_weight_int8

CUDA_INT_MM_MIN_ROWS = 17  # cuBLASLt int8 GEMM shape rules that torch._int_mm enforces on CUDA
CUDA_INT_MM_MULTIPLE = 8


@dataclass(frozen=True)
class W8a8Options:
    """``smooth``: SmoothQuant's migration strength α in [0, 1] (0.5 in the paper), or ``None`` for none."""

    smooth: float | None = None

    def __post_init__(self) -> None:
        _check_smooth(self.smooth, "w8a8")


@dataclass(frozen=True)
class LlmInt8Options:
    """``threshold``: an activation column with any ``|x|`` above it is an outlier (LLM.int8() uses 6.0);
    ``smooth``: as for w8a8 (outliers are then the columns of the smoothed ``x``)."""

    threshold: float = 6.0
    smooth: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not math.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(f"llm_int8 threshold={self.threshold!r} must be a finite number > 0 "
                             "(LLM.int8() uses 6.0)")
        object.__setattr__(self, "threshold", float(self.threshold))
        _check_smooth(self.smooth, "llm_int8")


def smoothquant_pack(fmt: QuantFormat, weight: torch.Tensor, input_absmax: torch.Tensor | None,
                     options: W8a8Options | LlmInt8Options) -> PackedLinear:
    """Pack ``weight [out, in]`` in w8a8 or llm_int8 with SmoothQuant's factors for ``options.smooth``.

    ``input_absmax [in]`` is ``max|x_j|`` over the calibration tokens entering the layer
    (:func:`input_absmax` gathers it). A channel that is zero on every calibration
    token, or whose weight column is zero, keeps ``s_j = 1``.

        >>> packed = smoothquant_pack(FORMATS["w8a8"], w, x.abs().amax(0), W8a8Options(smooth=0.5))
        >>> list(packed.buffers)
        ['qweight', 'scales', 'smooth']
    """
    if fmt.name not in ("w8a8", "llm_int8") or options.smooth is None:
        raise ValueError(f"smoothquant_pack: needs format w8a8 or llm_int8 with smooth=α set, got '{fmt.name}' "
                         f"with {options}")
    if input_absmax is None or input_absmax.shape != (weight.shape[1],) or not torch.isfinite(input_absmax).all():
        got = None if input_absmax is None else list(input_absmax.shape)
        raise ValueError(f"smoothquant_pack: input_absmax must be [in] = [{weight.shape[1]}] finite values (max |x_j| "
                         f"on calibration data) for a {tuple(weight.shape)} weight, got {got}")
    factors = smoothing_factors(input_absmax, weight, options.smooth)
    return _pack_int8(weight.detach().float() * factors, fmt.name, options, smooth=1 / factors)


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` (float32 ``[in]``), 1 where either maximum is 0.

        >>> smoothing_factors(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([[1.0, 4.0, 2.0]]), 0.5)
        tensor([4.0000, 0.5000, 1.0000])
    """
    activation = input_absmax.detach().float().to(weight.device)
    weight_absmax = weight.detach().float().abs().amax(dim=0)
    usable = (activation > 0) & (weight_absmax > 0)
    factors = activation.pow(alpha) / weight_absmax.pow(1 - alpha)
    return torch.where(usable & torch.isfinite(factors) & (factors > 0), factors, 1.0)


def input_absmax(x: torch.Tensor, running: torch.Tensor | None) -> torch.Tensor:
    """``max|x_j|`` per feature over every row of ``x``, float32: an ``activations.input_statistics`` statistic."""
    update = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    return update if running is None else torch.maximum(running, update)


@torch.library.custom_op("slimgraph::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``(x · smooth) @ (qweight · scales[:, None]).T + bias`` with ``x · smooth`` quantized to int8 per row.

    ``smooth`` (SmoothQuant's ``1/s``) is ``None`` for plain w8a8.
    """
    return _dynamic_int8_linear(_smoothed(x, smooth), qweight, scales, bias)


@linear_w8a8.register_fake
def _(x, qweight, scales, smooth, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("slimgraph::linear_llm_int8", mutates_args=())
def linear_llm_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor | None,
                    bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """w8a8 on the inlier columns of ``x · smooth`` plus a float product on its outlier columns (above ``threshold``)."""
    x = _smoothed(x, smooth)
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
def _(x, qweight, scales, smooth, bias, threshold):
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


def _smoothed(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """``x`` times SmoothQuant's per-channel ``1/s``, in ``x``'s dtype (the op's output dtype follows it)."""
    return x if smooth is None else x * smooth.to(x.dtype)


def _check_smooth(smooth: float | None, name: str) -> None:
    if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, int | float)
                               or not 0 <= smooth <= 1):
        raise ValueError(f"{name} smooth={smooth!r} must be a number in [0, 1] (SmoothQuant's α; 0.5 is usual) "
                         "or unset")


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


def _pack_w8a8(weight: torch.Tensor, options: W8a8Options) -> PackedLinear:
    return _pack_int8(weight, "w8a8", options)


def _pack_llm_int8(weight: torch.Tensor, options: LlmInt8Options) -> PackedLinear:
    return _pack_int8(weight, "llm_int8", options)


def _pack_int8(weight: torch.Tensor, name: str, options: W8a8Options | LlmInt8Options,
               smooth: torch.Tensor | None = None) -> PackedLinear:
    """``weight`` (already times ``s`` when smoothed) as int8 per output channel; ``smooth = 1/s`` or ``None``."""
    if options.smooth is not None and smooth is None:
        raise ValueError(f"{name} smooth={options.smooth} needs each input channel's max |x| from calibration "
                         f"data: use quantize(format={name}, smooth={options.smooth}) with "
                         "optimize(..., calibration=[...]), or smoothquant_pack(fmt, weight, input_absmax, options)")
    qweight, scales = quantize_weight_int8(weight)
    op = torch.ops.slimgraph.linear_w8a8.default if name == "w8a8" else torch.ops.slimgraph.linear_llm_int8.default
    params = {"threshold": options.threshold} if name == "llm_int8" else {}
    smooth_bits = 0 if smooth is None else 32 / weight.shape[0]  # one float32 per input channel
    return PackedLinear(op, {"qweight": qweight, "scales": scales, "smooth": smooth}, params,
                        bits_per_weight=8 + 32 / weight.shape[1] + smooth_bits)


def _dequantize(packed: PackedLinear) -> torch.Tensor:
    """The weight that unsmoothed ``x`` meets: ``qweight · scales[:, None] · smooth[None, :]``."""
    weight = packed.buffers["qweight"].float() * packed.buffers["scales"][:, None]
    smooth = packed.buffers["smooth"]
    return weight if smooth is None else weight * smooth[None, :]


register_format(QuantFormat("w8a8", _pack_w8a8, _dequantize, W8a8Options))
register_format(QuantFormat("llm_int8", _pack_llm_int8, _dequantize, LlmInt8Options))
