"""AttentionView: sdpa, and the ``matmul → softmax → matmul`` subgraph."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from slimgraph.ir.nodes import node_value
from slimgraph.ir.views.base import ADD, CAST, CAST_METHODS, OpView, arg, aten, is_call

_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention,
         torch._C._nn.scaled_dot_product_attention}
_MATMUL = {aten.matmul.default, aten.bmm.default, torch.matmul, torch.bmm, operator.matmul}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax}
_TRANSPOSE = {aten.transpose.int, torch.transpose}
_SCALE = {aten.mul.Tensor, aten.div.Tensor, torch.mul, torch.div, operator.mul, operator.truediv}
_DROPOUT = {aten.dropout.default, F.dropout, torch.dropout}


@dataclass
class AttentionView(OpView):
    """Scaled dot-product attention, as one sdpa op or as ``matmul → softmax → matmul``.

    ``query``/``key``/``value`` are ``[..., heads, seq, head_dim]`` nodes. ``scale``
    multiplies the scores; ``None`` means sdpa's default 1/sqrt(head_dim). For the
    subgraph form, ``nodes`` lists every node of the pattern (anchor last) and
    ``scale`` is the literal multiplier found, 1.0 when the scores are not scaled.
    """

    kind: str = "sdpa"
    query: fx.Node = None
    key: fx.Node = None
    value: fx.Node = None
    attn_mask: fx.Node | None = None
    scale: float | None = None
    is_causal: bool = False
    nodes: list[fx.Node] = field(default_factory=list)
    dropout_p: float = 0.0
    enable_gqa: bool = False  # sdpa repeats key/value heads itself (grouped-query attention)

    @classmethod
    def match(cls, node: fx.Node) -> AttentionView | None:
        if is_call(node, _SDPA):
            return cls(node, "sdpa", node.args[0], node.args[1], node.args[2], arg(node, 3, "attn_mask"),
                       node.kwargs.get("scale"), bool(arg(node, 5, "is_causal", False)), [node],
                       float(arg(node, 4, "dropout_p", 0.0)), bool(node.kwargs.get("enable_gqa", False)))
        return _match_attention_subgraph(cls, node)

    @property
    def num_heads(self) -> int | None:
        value = node_value(self.query)
        return value.shape[-3] if value is not None and value.dim() >= 4 else None  # [..., heads, seq, dim]


def _match_attention_subgraph(cls: type[AttentionView], node: fx.Node) -> AttentionView | None:
    """Anchor: the final ``probs @ value`` matmul."""
    if not is_call(node, _MATMUL, {"matmul", "__matmul__", "bmm"}):
        return None
    probs, value = node.args[0], node.args[1]
    nodes = [node]
    if is_call(probs, _DROPOUT, {"dropout"}) or is_call(probs, CAST, CAST_METHODS):
        nodes.append(probs)
        probs = probs.args[0]
    if is_call(probs, CAST, CAST_METHODS):
        nodes.append(probs)
        probs = probs.args[0]
    if not is_call(probs, _SOFTMAX, {"softmax"}) or arg(probs, 1, "dim") not in (-1, 3):
        return None
    nodes.append(probs)
    scores, mask, scale = probs.args[0], None, None
    for _ in range(2):  # mask and scale, in either order
        if is_call(scores, ADD, {"add", "__add__"}) and mask is None:
            nodes.append(scores)
            scores, mask = scores.args[0], scores.args[1]
        elif is_call(scores, _SCALE, {"mul", "div", "__mul__", "__truediv__"}) and scale is None:
            divides = scores.target in (aten.div.Tensor, torch.div, operator.truediv, "div", "__truediv__")
            tensor, factor = scores.args[0], scores.args[1]
            if not divides and isinstance(tensor, int | float):  # `0.125 * scores`
                tensor, factor = factor, tensor
            if not isinstance(factor, int | float):
                return None
            nodes.append(scores)
            scores, scale = tensor, 1.0 / factor if divides else float(factor)
    if not is_call(scores, _MATMUL, {"matmul", "__matmul__", "bmm"}):
        return None
    query, key_t = scores.args[0], scores.args[1]
    if not is_call(key_t, _TRANSPOSE, {"transpose"}) or sorted(key_t.args[1:]) not in ([-2, -1], [2, 3]):
        return None
    nodes += [scores, key_t]
    scale = 1.0 if scale is None else scale  # unscaled scores: sdpa's default would rescale them
    return cls(node, "matmul_softmax", query, key_t.args[0], value, mask, scale, False, nodes[::-1])
