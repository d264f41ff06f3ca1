"""ConvView: 1-D and 2-D convolutions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from slimgraph.ir.views.base import (
    Weight,
    WeightedView,
    arg,
    aten,
    called_module,
    is_call,
    module_weight,
    weight_of,
)

_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, torch.conv1d: 1, torch.conv2d: 2,
         F.conv1d: 1, F.conv2d: 2,
         aten.conv1d.padding: 1, aten.conv2d.padding: 2}  # export's overloads for padding="same"/"valid"


@dataclass
class ConvView(WeightedView):
    """1-D or 2-D convolution with its weight, bias and hyper-parameters."""

    input: fx.Node = None
    weight_ref: Weight = None
    bias_ref: Weight | None = None
    spatial_dims: int = 2
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] | str = (0,)  # or "same" / "valid"
    dilation: tuple[int, ...] = (1,)
    groups: int = 1

    @classmethod
    def match(cls, node: fx.Node) -> ConvView | None:
        module = called_module(node)
        if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode == "zeros":
            return cls(node, node.args[0], module_weight(node, "weight"), module_weight(node, "bias"),
                       1 if isinstance(module, nn.Conv1d) else 2, module.stride, module.padding,
                       module.dilation, module.groups)
        if is_call(node, set(_CONV)) or is_call(node, {aten.convolution.default}):
            weight, bias = weight_of(arg(node, 1, "weight")), arg(node, 2, "bias")
            if weight is None or (bias is not None and weight_of(bias) is None):
                return None
            dims = _CONV.get(node.target, weight.tensor.dim() - 2)
            if node.target is aten.convolution.default and (node.args[6] or dims not in (1, 2)):
                return None  # transposed convolution
            groups_index = 8 if node.target is aten.convolution.default else 6
            stride, padding, dilation = (_per_dim(arg(node, i, name, default), dims) for i, name, default
                                         in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
            return cls(node, node.args[0], weight, weight_of(bias), dims, stride, padding, dilation,
                       arg(node, groups_index, "groups", 1))
        return None


def _per_dim(value: Any, dims: int) -> tuple[int, ...] | str:
    """One spelling for every graph: ``1``, ``[1]`` and ``[1, 1]`` all become ``(1, 1)`` in 2-D."""
    if isinstance(value, str):
        return value
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    return values * dims if len(values) == 1 else values
