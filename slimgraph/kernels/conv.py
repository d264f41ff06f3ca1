"""conv_int8: Conv1d/Conv2d weights as int8, one float32 scale per output channel.

The weight ``[O, I/groups, *kernel]`` is viewed as ``[O, I/groups·kernel]`` (each output
channel's row of the im2col matmul) and quantized like ``int8`` linears: ``w = q · scale[o]``
with ``q`` in [-127, 127]. ``qweight`` keeps the conv shape, so the op recovers the kernel
size from it::

    packed = pack_conv_int8(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = packed(x, conv.bias)                          # slimgraph::conv_int8
    w_hat = dequantize_conv_int8(packed)              # what the conv runs with

No native path: a convolution does ``H·W`` multiply-adds per weight it reads, so it is
compute bound and widening the weight once per call costs little next to it; the op
dequantizes and calls the float convolution (oneDNN on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slimgraph.kernels.formats import PackedLinear
from slimgraph.kernels.int8 import quantize_weight_int8

_CONV = {1: F.conv1d, 2: F.conv2d}


def pack_conv_int8(
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> PackedLinear:
    """The buffers (``qweight`` int8 in the conv shape, ``scales`` float32 ``[O]``) and static params."""
    qweight, scales = quantize_weight_int8(weight.detach().flatten(1))
    params = {
        "stride": list(stride),
        "padding": list(padding),
        "dilation": list(dilation),
        "groups": groups,
    }
    return PackedLinear(
        torch.ops.slimgraph.conv_int8.default,
        {"qweight": qweight.view(weight.shape), "scales": scales},
        params,
        bits_per_weight=8 + 32 / weight[0].numel(),
        format="int8",
    )


def dequantize_conv_int8(packed: PackedLinear) -> torch.Tensor:
    """The float32 weight ``[O, I/groups, *kernel]`` the op convolves with."""
    qweight, scales = packed.buffers["qweight"], packed.buffers["scales"]
    return qweight.float() * _per_channel(scales, qweight.dim())


def explicit_padding(
    padding: Sequence[int] | str, kernel: Sequence[int], dilation: Sequence[int]
) -> tuple[int, ...] | None:
    """Per-dimension padding for ``'valid'``/``'same'``; ``None`` when ``'same'`` pads one side more.

    >>> explicit_padding("same", (3, 5), (1, 2))
    (1, 4)
    """
    if not isinstance(padding, str):
        return tuple(padding)
    total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    if padding == "valid":
        return (0,) * len(total)
    return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None


@torch.library.custom_op("slimgraph::conv_int8", mutates_args=())
def conv_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """``conv(x, qweight · scales[o], bias)``, 1-D or 2-D by ``qweight``'s rank."""
    weight = qweight.to(x.dtype) * _per_channel(scales, qweight.dim()).to(x.dtype)
    return _conv(qweight)(x, weight, bias, stride, padding, dilation, groups)


@conv_int8.register_fake
def _(x, qweight, scales, bias, stride, padding, dilation, groups):
    # The float conv on fake tensors: output sizes (symbolic ones too) and argument checks as the real op's.
    return _conv(qweight)(x, x.new_empty(qweight.shape), bias, stride, padding, dilation, groups)


def _conv(qweight: torch.Tensor):
    spatial_dims = qweight.dim() - 2
    if spatial_dims not in _CONV:
        raise ValueError(
            f"slimgraph::conv_int8: qweight {tuple(qweight.shape)} is not a 1-D or 2-D conv weight "
            "[out, in/groups, *kernel]"
        )
    return _CONV[spatial_dims]


def _per_channel(scales: torch.Tensor, dims: int) -> torch.Tensor:
    return scales.view(-1, *[1] * (dims - 1))
