"""Symbolic cost model: FLOPs and bytes moved per node, as sympy expressions.

Sizes come from the fake values of the shapes analysis. A static graph gives
plain integers (sympy ``Integer``); a graph captured with ``dynamic_shapes``
gives expressions in its size symbols, renamed to the user's ``Dim`` names, so
``graph_cost(gm).flops.subs({batch: 2, seq: 128})`` is the concrete count.

Conventions: a multiply-add is 2 FLOPs; elementwise ops cost one FLOP per
output element; views, getitem and metadata ops cost nothing. Bytes are the
bytes a kernel reads and writes (inputs plus outputs), zero for views.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from slimgraph.ir.nodes import get_attr_value, node_value

aten = torch.ops.aten


@dataclass(frozen=True)
class NodeCost:
    flops: sympy.Expr
    bytes: sympy.Expr


@dataclass
class GraphCost:
    """Per-node costs plus totals. ``evaluate(batch=2, seq=16)`` binds symbols by name."""

    per_node: dict[fx.Node, NodeCost] = field(default_factory=dict)

    @property
    def flops(self) -> sympy.Expr:
        return sympy.sympify(sum(c.flops for c in self.per_node.values()))

    @property
    def bytes(self) -> sympy.Expr:
        return sympy.sympify(sum(c.bytes for c in self.per_node.values()))

    def evaluate(self, **sizes: int) -> tuple[int, int]:
        """``(flops, bytes)`` with each named size symbol bound to a number."""
        bindings = {sympy.Symbol(name, integer=True, positive=True): v for name, v in sizes.items()}
        flops, moved = self.flops.subs(bindings), self.bytes.subs(bindings)
        if flops.free_symbols or moved.free_symbols:
            unbound = sorted(str(s) for s in flops.free_symbols | moved.free_symbols)
            raise ValueError(f"cost still depends on {unbound}; pass them as keyword arguments")
        return int(flops), int(moved)


def graph_cost(gm: fx.GraphModule) -> GraphCost:
    """Cost of every node of ``gm``; needs ``meta["val"]`` from the shapes analysis."""
    names = gm.meta.get("slimgraph_symbols", {})
    cost = GraphCost()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            cost.per_node[node] = node_cost(node, names)
    return cost


def node_cost(node: fx.Node, symbol_names: dict[str, str] | None = None) -> NodeCost:
    """FLOPs and bytes of one node (zero for views and metadata ops)."""
    out = node_value(node)
    inputs = [node_value(a) for a in node.all_input_nodes]
    if _is_view(node, out):
        return NodeCost(sympy.Integer(0), sympy.Integer(0))
    names = symbol_names or {}
    moved = sum(_nbytes(v, names) for v in [*inputs, out])
    flops_rule = _flops_rule(node)
    args = [node_value(a) if isinstance(a, fx.Node) else a for a in node.args]
    flops = flops_rule(node, out, args, names) if flops_rule else _numel(out, names)
    return NodeCost(sympy.sympify(flops), sympy.sympify(moved))


# ---- FLOP rules, keyed by every spelling of the op -------------------------------------------

def _linear_flops(node, out, args, names):
    weight = args[1] if len(args) > 1 else _module_weight(node)
    return 2 * _numel(out, names) * symbolic_size(weight.shape[-1], names)


def _addmm_flops(node, out, args, names):
    return 2 * _numel(out, names) * symbolic_size(args[1].shape[-1], names)


def _matmul_flops(node, out, args, names):
    return 2 * _numel(out, names) * symbolic_size(args[0].shape[-1], names)


def _conv_flops(node, out, args, names):
    weight = args[1] if len(args) > 1 else _module_weight(node)
    per_output = math.prod(int(s) for s in weight.shape[1:])  # in_channels/groups * kernel
    return 2 * _numel(out, names) * per_output


def _sdpa_flops(node, out, args, names):
    query, key = args[0], args[1]
    scores = math.prod((symbolic_size(s, names) for s in query.shape[:-1]), start=1) * symbolic_size(key.shape[-2], names)
    # QK^T and PV are one multiply-add per (score, head-dim) pair each; softmax ~5 ops per score.
    return 2 * scores * symbolic_size(query.shape[-1], names) + 2 * scores * symbolic_size(out.shape[-1], names) + 5 * scores


def _norm_flops(node, out, args, names):
    return 5 * _numel(out, names)


def _no_flops(node, out, args, names):
    return 0


_RULES: dict[Any, Callable] = {}
for _rule, _targets in {
    _linear_flops: [aten.linear.default, torch._C._nn.linear, F.linear, nn.Linear],
    _addmm_flops: [aten.addmm.default, torch.addmm],
    _matmul_flops: [aten.matmul.default, aten.mm.default, aten.bmm.default, torch.matmul, torch.mm,
                    torch.bmm, "matmul", "bmm", "mm", "__matmul__", operator.matmul],
    _conv_flops: [aten.conv1d.default, aten.conv2d.default, aten.convolution.default, torch.conv1d,
                  torch.conv2d, F.conv1d, F.conv2d, nn.Conv1d, nn.Conv2d],
    _sdpa_flops: [aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention,
                  torch._C._nn.scaled_dot_product_attention],
    _norm_flops: [aten.layer_norm.default, aten.rms_norm.default, F.layer_norm, F.rms_norm,
                  nn.LayerNorm, nn.RMSNorm, aten.softmax.int, aten._softmax.default, "softmax"],
    _no_flops: [aten.embedding.default, F.embedding, nn.Embedding, operator.getitem],
}.items():
    for _target in _targets:
        _RULES[_target] = _rule


def _flops_rule(node: fx.Node) -> Callable | None:
    if node.op == "call_module":
        module = get_attr_value(node.graph.owning_module, node.target)
        return _RULES.get(type(module))
    if _is_packed_linear(node.target):
        return _matmul_flops  # x @ W.T from packed weights: 2 · out elements · in_features
    if _is_slimgraph_op(node.target, "conv_"):
        return _conv_flops  # slimgraph::conv_int8(x, qweight [O, I/groups, *kernel], …): a conv's count
    if _is_slimgraph_op(node.target, "lorc_correction"):
        return _low_rank_flops
    return _RULES.get(node.target)


def _is_packed_linear(target: Any) -> bool:
    """slimgraph's quantized linears (``slimgraph::linear_int8`` …); their first argument is x."""
    return _is_slimgraph_op(target, "linear_")


def _is_slimgraph_op(target: Any, prefix: str) -> bool:
    return (isinstance(target, torch._ops.OpOverload) and target.namespace == "slimgraph"
            and target._opname.startswith(prefix))


def _low_rank_flops(node, out, args, names):
    """``y + (x @ v.T) @ u.T`` with ``u [out, r]``: 2·r FLOPs per element of x and of the output."""
    rank = symbolic_size(args[2].shape[-1], names)
    return 2 * rank * (_numel(args[1], names) + _numel(out, names))


def _is_view(node: fx.Node, out: Any) -> bool:
    target = node.target
    if target in _VIEW_OPS:
        return True
    if target in (operator.getitem, getattr):  # one output of a multi-output op, or a slice
        return not any(isinstance(node_value(i), torch.Tensor) for i in node.all_input_nodes[1:])
    if isinstance(target, torch._ops.OpOverload):
        return target.is_view or torch.Tag.pointwise not in target.tags and _is_metadata(out)
    if node.op == "call_method":
        return target in _VIEW_METHODS
    return _is_metadata(out)


_VIEW_OPS = {aten.reshape.default, aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default,
             aten.expand_as.default, torch.reshape, torch.flatten, torch.transpose, torch.permute,
             torch.unsqueeze, torch.squeeze, torch.t, torch.split, torch.chunk, torch.narrow, torch.select}
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                 "flatten", "contiguous", "size", "dim", "t", "unflatten", "view_as", "expand_as",
                 "split", "chunk", "narrow", "select"}


def _is_metadata(value: Any) -> bool:
    """Values that hold no tensor (sizes, bools) cost nothing to produce.

    A tuple of tensors (``max.dim``, ``topk``) is the output of real work, not metadata.
    """
    if isinstance(value, list | tuple):
        return all(_is_metadata(v) for v in value)
    return not isinstance(value, torch.Tensor)


def _module_weight(node: fx.Node) -> torch.Tensor:
    return get_attr_value(node.graph.owning_module, f"{node.target}.weight")


def _numel(value: Any, names: dict[str, str]) -> int | sympy.Expr:
    if isinstance(value, torch.Tensor):
        return math.prod((symbolic_size(s, names) for s in value.shape), start=1)
    if isinstance(value, list | tuple):
        return sum(_numel(v, names) for v in value)
    return 0


def _nbytes(value: Any, names: dict[str, str]) -> int | sympy.Expr:
    if isinstance(value, torch.Tensor):
        return _numel(value, names) * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v, names) for v in value)
    return 0


def symbolic_size(size: Any, names: dict[str, str]) -> int | sympy.Expr:
    """A tensor size as a number, or as a sympy expression in the user's ``Dim`` names
    (``names`` maps export's ``s0`` to ``batch``). Never specialises a SymInt."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        renames = {s: sympy.Symbol(names.get(str(s), str(s)), integer=True, positive=True)
                   for s in expr.free_symbols}
        return expr.xreplace(renames)
    return int(size)
