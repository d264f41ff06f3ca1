"""LinearView: ``nn.Linear`` in all its spellings, including GPT-2's ``Conv1D`` as ``addmm``."""

from __future__ import annotations

from dataclasses import dataclass

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

_LINEAR = {aten.linear.default, torch._C._nn.linear, F.linear}
ADDMM = {aten.addmm.default, torch.addmm}


@dataclass
class LinearView(WeightedView):
    """``y = x @ weight.T + bias`` with ``weight`` reported as ``[out_features, in_features]``."""

    input: fx.Node = None
    weight_ref: Weight = None
    bias_ref: Weight | None = None

    @classmethod
    def match(cls, node: fx.Node) -> LinearView | None:
        if is_call(node, _LINEAR):
            weight, bias = weight_of(arg(node, 1, "weight")), arg(node, 2, "bias")
            if weight is not None and (bias is None or weight_of(bias) is not None):
                return cls(node, arg(node, 0, "input"), weight, weight_of(bias))
        if is_call(node, ADDMM) and not node.kwargs:  # GPT-2 Conv1D: addmm(bias, x2d, W[in, out])
            bias, weight = weight_of(node.args[0]), weight_of(node.args[2], transposed=True)
            if weight is not None and bias is not None:
                return cls(node, node.args[1], weight, bias)
        if isinstance(called_module(node), nn.Linear):
            return cls(node, node.args[0], module_weight(node, "weight"), module_weight(node, "bias"))
        return None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]
