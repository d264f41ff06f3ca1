"""cleanup: remove what does nothing at inference time, then dead code.

Matches, in every spelling (ATen, torch-level, call_method, call_module):
- dropout (and ``nn.Dropout``/``nn.Identity`` modules)      → its input
- views/copies whose result equals their input: same shape, strides and dtype
  (``view``/``reshape``/``expand``/``permute``/``to``/``contiguous``/``clone``…) → input
- runtime asserts (``_assert_tensor_metadata``, ``_assert_scalar``…)  → removed
then dead-code elimination and deletion of attributes nothing uses.
Verified by the runner: shapes re-propagated, outputs compared to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from slimgraph.ir.graph_utils import eliminate_dead_code
from slimgraph.ir.nodes import get_attr_value, mutates, node_value
from slimgraph.passes.manager import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten

DROPOUT_OPS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
ASSERT_OPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.msg,
              aten._assert_async.default, aten.sym_constrain_range.default,
              aten.sym_constrain_range_for_size.default, torch._assert}
# Ops that return their input's values unchanged, possibly as a copy or a re-view.
VALUE_PRESERVING_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.flatten.using_ints, aten.squeeze.dim,
    aten.squeeze.dims, aten.slice.Tensor, aten.alias.default, aten.detach.default,
    aten.contiguous.default, aten.clone.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten._to_copy.default, aten.type_as.default, aten.lift_fresh_copy.default,
    torch.reshape, torch.flatten, torch.squeeze, torch.permute, torch.transpose, torch.clone,
}
VALUE_PRESERVING_METHODS = {"view", "reshape", "expand", "permute", "transpose", "flatten", "squeeze",
                            "contiguous", "clone", "to", "type_as", "float", "detach", "view_as",
                            "expand_as", "type"}
COPY_OPS = {aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default, torch.clone, "clone"}


@register_pass
@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove dropout, identities, no-op views/copies and asserts; then dead code."""

    name: ClassVar[str] = "cleanup"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    preserves: ClassVar[tuple[str, ...]] = ("shapes", "blocks")

    remove_dropout: bool = True
    remove_noop_views: bool = True
    remove_asserts: bool = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.analysis("shapes")
        copies_are_safe = not any(mutates(n) for n in gm.graph.nodes)
        counts = {"dropout": 0, "identity": 0, "no-op view": 0, "assert": 0}
        kept_active = 0
        for node in list(gm.graph.nodes):
            kind = self._classify(node, copies_are_safe)
            kept_active += kind == "active dropout"
            if kind is None or kind == "active dropout":
                continue
            counts[kind] += 1
            if kind != "assert":
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        dead_nodes, freed = eliminate_dead_code(gm)
        removed = sum(counts.values())
        notes = [f"removed {n} {kind}" for kind, n in counts.items() if n]
        notes += [f"dead code: {dead_nodes} nodes"] if dead_nodes else []
        notes += [f"freed {freed} unused tensors"] if freed else []
        notes += [f"kept {kept_active} dropout called with training=True"] if kept_active else []
        return PassResult(matched=removed + kept_active, rewritten=removed + dead_nodes + freed, notes=notes,
                          stats=dict(counts, dead_nodes=dead_nodes, freed_tensors=freed,
                                     kept_active_dropout=kept_active))

    def _classify(self, node: fx.Node, copies_are_safe: bool) -> str | None:
        if self.remove_asserts and node.op == "call_function" and node.target in ASSERT_OPS:
            return "assert"
        if self.remove_dropout and _is_dropout(node):
            return "active dropout" if _dropout_is_active(node) else "dropout"
        if node.op == "call_module" and isinstance(get_attr_value(node.graph.owning_module, node.target),
                                                   nn.Identity):
            return "identity"
        if self.remove_noop_views and _is_noop_view(node, copies_are_safe):
            return "no-op view"
        return None


def _is_dropout(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in DROPOUT_OPS
    return node.op == "call_module" and isinstance(
        get_attr_value(node.graph.owning_module, node.target), DROPOUT_MODULES)


def _dropout_is_active(node: fx.Node) -> bool:
    """True when the dropout runs in training mode (e.g. Monte-Carlo dropout written as
    ``F.dropout(x, training=True)``): removing it would change what the model computes."""
    if node.op == "call_module":
        return get_attr_value(node.graph.owning_module, node.target).training
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", node.kwargs.get("train", True))
    return train is not False


def _is_noop_view(node: fx.Node, copies_are_safe: bool) -> bool:
    if node.op == "call_function":
        if node.target not in VALUE_PRESERVING_OPS:
            return False
    elif node.op != "call_method" or node.target not in VALUE_PRESERVING_METHODS:
        return False
    if node.target in COPY_OPS and (not copies_are_safe or any(u.op == "output" for u in node.users)):
        return False  # a returned copy must not become an alias of an input or a weight
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    return _same_tensor_layout(node_value(source), node_value(node))


def _same_tensor_layout(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if (a.dtype, a.device, a.layout) != (b.dtype, b.device, b.layout) or a.dim() != b.dim():
        return False
    pairs = [*zip(a.shape, b.shape, strict=True), *zip(a.stride(), b.stride(), strict=True)]
    return all(statically_known_true(x == y) for x, y in pairs)
