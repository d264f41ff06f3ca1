"""EmbeddingView: table lookups."""

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


@dataclass
class EmbeddingView(WeightedView):
    """Table lookup ``weight[indices]``."""

    indices: fx.Node = None
    weight_ref: Weight = None
    padding_idx: int | None = None

    @classmethod
    def match(cls, node: fx.Node) -> EmbeddingView | None:
        if isinstance(module := called_module(node), nn.Embedding):
            return cls(node, node.args[0], module_weight(node, "weight"), module.padding_idx)
        if is_call(node, {aten.embedding.default, torch.embedding}) and weight_of(node.args[0]):
            padding = arg(node, 2, "padding_idx", -1)
            return cls(node, node.args[1], weight_of(node.args[0]), None if padding == -1 else padding)
        if is_call(node, {F.embedding}) and weight_of(arg(node, 1, "weight")):
            return cls(node, node.args[0], weight_of(arg(node, 1, "weight")), arg(node, 2, "padding_idx"))
        return None
