"""NormView: LayerNorm and RMSNorm, including the decomposed RMSNorm of Llama-style models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from slimgraph.ir.nodes import node_value
from slimgraph.ir.views.base import (
    ADD,
    CAST,
    CAST_METHODS,
    MUL,
    Weight,
    WeightedView,
    arg,
    aten,
    called_module,
    is_call,
    module_weight,
    weight_of,
)

_LAYER_NORM = {aten.layer_norm.default, F.layer_norm, torch.layer_norm}
_RMS_NORM = {aten.rms_norm.default, F.rms_norm, getattr(torch, "rms_norm", F.rms_norm)}


@dataclass
class NormView(WeightedView):
    """LayerNorm or RMSNorm, including the decomposed RMSNorm of Llama-style models."""

    kind: str = "layer_norm"
    input: fx.Node = None
    weight_ref: Weight | None = None
    bias_ref: Weight | None = None
    eps: float = 1e-5
    nodes: list[fx.Node] = field(default_factory=list)

    @classmethod
    def match(cls, node: fx.Node) -> NormView | None:
        module = called_module(node)
        if isinstance(module, nn.LayerNorm | nn.RMSNorm):
            kind = "layer_norm" if isinstance(module, nn.LayerNorm) else "rms_norm"
            eps = _norm_eps(module.eps, node.args[0])
            return cls(node, kind, node.args[0], module_weight(node, "weight"),
                       module_weight(node, "bias") if kind == "layer_norm" else None, eps, [node])
        if is_call(node, _LAYER_NORM):
            return cls(node, "layer_norm", node.args[0], weight_of(arg(node, 2, "weight")),
                       weight_of(arg(node, 3, "bias")), arg(node, 4, "eps", 1e-5), [node])
        if is_call(node, _RMS_NORM):
            return cls(node, "rms_norm", node.args[0], weight_of(arg(node, 2, "weight")), None,
                       _norm_eps(arg(node, 3, "eps"), node.args[0]), [node])
        return _match_decomposed_rms_norm(cls, node)


def _norm_eps(eps: float | None, input: Any) -> float:
    """``eps=None`` means ``finfo(dtype).eps`` of the input (float32 when its dtype is unknown)."""
    if eps is not None:
        return float(eps)
    value = node_value(input) if isinstance(input, fx.Node) else None
    return torch.finfo(value.dtype if isinstance(value, torch.Tensor) else torch.float32).eps


def _match_decomposed_rms_norm(cls: type[NormView], node: fx.Node) -> NormView | None:
    """``weight * (x * rsqrt(mean(x**2, -1, keepdim) + eps)).to(dtype)``, anchored at the final mul."""
    if not is_call(node, MUL, {"mul", "__mul__"}):
        return None
    weight_arg = next((a for a in node.args if weight_of(a)), None)
    normed = next((a for a in node.args if isinstance(a, fx.Node) and a is not weight_arg), None)
    if weight_arg is None or normed is None:
        return None
    cast = normed if is_call(normed, CAST, CAST_METHODS) else None
    scaled = cast.args[0] if cast else normed
    if not is_call(scaled, MUL, {"mul", "__mul__"}):
        return None
    rsqrt = next((a for a in scaled.args if is_call(a, {aten.rsqrt.default, torch.rsqrt}, {"rsqrt"})), None)
    if rsqrt is None or not is_call(rsqrt.args[0], ADD, {"add", "__add__"}):
        return None
    mean, eps = rsqrt.args[0].args
    if not is_call(mean, {aten.mean.dim, torch.mean}, {"mean"}) or not _is_last_dim_mean(mean):
        return None
    square = mean.args[0]
    if not is_call(square, {aten.pow.Tensor_Scalar, torch.pow}, {"pow"}) or square.args[1] != 2:
        return None
    x = square.args[0]
    if x not in scaled.args:
        return None
    nodes = [square, mean, rsqrt.args[0], rsqrt, scaled, *([cast] if cast else []), node]
    return cls(node, "rms_norm", x, weight_of(weight_arg), None, float(eps), nodes)


def _is_last_dim_mean(mean: fx.Node) -> bool:
    """``mean(..., dim=-1, keepdim=True)``: a mean over any other dim is not an RMSNorm."""
    dims = arg(mean, 1, "dim")
    dims = list(dims) if isinstance(dims, list | tuple) else [dims]
    value = node_value(mean.args[0])
    last = {-1, value.dim() - 1} if isinstance(value, torch.Tensor) else {-1}
    return len(dims) == 1 and dims[0] in last and bool(arg(mean, 2, "keepdim", False))
