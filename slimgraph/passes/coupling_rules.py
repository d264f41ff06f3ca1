"""Tags: which dim of each tensor carries the groups of a coupled set, moved through op by op.

``coupling.py`` finds a coupled set's region; ``Tagger`` walks it in graph order. Every tensor
gets one tag per dim: ``Axis(groups, segments)`` where the dim is laid out group-major and
``None`` where it does not carry the groups. One rule per ATen op (views and reshapes, transposes,
expand, split, matmul, sdpa, batch norm, pooling, elementwise ops) moves the tags forward, checks
that the op keeps groups apart, and records the literal sizes that shrink with them
(``SizeEdit``) and the weights sliced with them (``TensorSlice``). An op it cannot prove safe
raises ``Unprovable`` with the reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from slimgraph.errors import describe_node
from slimgraph.ir.nodes import module_path, node_value
from slimgraph.ir.views import AttentionView

aten = torch.ops.aten
Tags = tuple  # one ``Axis | None`` per dim of a tensor


@dataclass(frozen=True)
class Axis:
    """A dim holding ``segments`` blocks of ``groups`` equal, group-major units."""

    groups: int
    segments: int = 1

    def indices(self, size: int, kept: list[int]) -> torch.Tensor:
        """Positions along a dim of ``size`` that belong to the ``kept`` groups, in order.

        >>> Axis(2, segments=3).indices(12, [1]).tolist()  # q|k|v blocks of 2 heads of width 2
        [2, 3, 6, 7, 10, 11]
        """
        segment = size // self.segments
        unit = segment // self.groups
        starts = [s * segment + g * unit for s in range(self.segments) for g in kept]
        return torch.tensor([start + i for start in starts for i in range(unit)], dtype=torch.long)

    def resize(self, size: int, kept_count: int) -> int:
        return size // self.groups * kept_count


@dataclass(frozen=True)
class TensorSlice:
    """Tensor ``source`` (a ``get_attr`` read by ``user`` only) loses entries along ``dim``.

    ``role`` is ``out`` (a producer's weight rows), ``in`` (a consumer's weight columns) or
    ``param`` (a bias, BatchNorm statistics, a per-channel scale). For weights, ``input`` is the
    activation the layer reads and ``input_dim`` the dim of ``source`` that multiplies it.
    """

    layer: str
    user: fx.Node
    source: fx.Node
    dim: int
    axis: Axis
    role: str
    input: fx.Node | None = None
    input_dim: int | None = None
    input_channels_first: bool = False  # a conv's input: features along dim 1, not the last dim


@dataclass(frozen=True)
class SizeEdit:
    """The literal size ``node.args[arg]`` (or its element ``position``) shrinks with the groups."""

    node: fx.Node
    arg: int
    position: int | None
    axis: Axis

    def apply(self, kept_count: int) -> None:
        args = list(self.node.args)
        if self.position is None:
            args[self.arg] = self.axis.resize(args[self.arg], kept_count)
        else:
            sizes = list(args[self.arg])
            sizes[self.position] = self.axis.resize(sizes[self.position], kept_count)
            args[self.arg] = sizes
        self.node.args = tuple(args)


class Unprovable(Exception):
    """The coupling of a set cannot be shown consistent; the message says where and why."""


# ---- tags: which dim of each region tensor carries the groups ----------------------------------


class Tagger:
    """Carries tags through the region in graph order; each rule checks its op keeps groups separate."""

    def __init__(self, producer_tags: dict[fx.Node, Tags]):
        self.tags: dict[fx.Node, Any] = dict(producer_tags)
        self.edits: list[SizeEdit] = []
        self.params: list[TensorSlice] = []

    def visit(self, node: fx.Node) -> None:
        self.tags[node] = rule_for(node)(self, node)

    def _fail(self, node: fx.Node, why: str) -> Unprovable:
        return Unprovable(f"{describe_node(node)}: {why}")

    def _combine(
        self, node: fx.Node, parts: list[tuple[Tags, tuple[int, ...]]], ndim: int
    ) -> list[Axis | None]:
        """Broadcast the tags of region operands (``(tags, shape)``) to ``ndim`` dims.

        A broadcast dim carries the groups in every operand where it is not of size 1, or in none.
        """
        tags: list[Axis | None] = [None] * ndim
        for part, _ in parts:
            for dim, axis in _aligned(part, ndim):
                if axis is not None and tags[dim] not in (None, axis):
                    raise self._fail(node, "combines tensors whose groups are laid out differently")
                tags[dim] = tags[dim] or axis
        for part, shape in parts:
            for (dim, axis), size in zip(_aligned(part, ndim), shape, strict=True):
                if tags[dim] is not None and size != 1 and axis != tags[dim]:
                    raise self._fail(node, "combines a pruned dim with an unpruned one")
        return tags

    def elementwise(self, node: fx.Node) -> Tags:
        out_shape = shape_of(node)
        inside = [a for a in node.all_input_nodes if a in self.tags]
        tags = self._combine(node, [(self.tags[a], shape_of(a)) for a in inside], len(out_shape))
        for operand in node.all_input_nodes:
            shape = shape_of(operand)
            if operand in self.tags or shape is None:
                continue
            for out_dim, size in _aligned(shape, len(out_shape)):
                if tags[out_dim] is None or size == 1:
                    continue
                if operand.op != "get_attr":
                    raise self._fail(
                        node,
                        f"combines the pruned dim with {describe_node(operand)} from outside "
                        "the coupled layers",
                    )
                self.params.append(
                    TensorSlice(
                        module_path(node) or node.name,
                        node,
                        operand,
                        out_dim - len(out_shape) + len(shape),
                        tags[out_dim],
                        "param",
                    )
                )
        return tuple(tags)

    def assertion(self, node: fx.Node) -> Tags:
        return ()

    def reshape(self, node: fx.Node) -> Tags:
        source = node.args[0]
        sizes = list(node.args[1]) if node.target in RESHAPES else None  # flatten: no sizes
        in_shape, out_shape, in_tags = shape_of(source), shape_of(node), self.tags[source]
        tags: list[Axis | None] = [None] * len(out_shape)
        for in_dims, out_dims in _dim_groups(in_shape, out_shape):
            tagged = [d for d in in_dims if in_tags[d] is not None]
            if not tagged:
                continue
            axis = in_tags[tagged[0]]
            if tagged != in_dims[:1] or len(in_dims) > 1 and len(out_dims) > 1:
                raise self._fail(node, "the reshape mixes the pruned dim with a dim outside it")
            if axis.segments > 1 and (len(in_dims) > 1 or len(out_dims) > 1):
                raise self._fail(node, "the reshape splits or merges a fused projection's blocks")
            if out_shape[out_dims[0]] % axis.groups:
                raise self._fail(
                    node, f"size {out_shape[out_dims[0]]} is not a multiple of {axis.groups} groups"
                )
            tags[out_dims[0]] = axis
            if sizes is not None:
                self._edit_size(node, 1, sizes, out_dims[0], axis)
        return tuple(tags)

    def transpose(self, node: fx.Node) -> Tags:
        tags = list(self.tags[node.args[0]])
        if node.target is aten.t.default:
            return tuple(reversed(tags))
        first, second = (d % len(tags) for d in node.args[1:3])
        tags[first], tags[second] = tags[second], tags[first]
        return tuple(tags)

    def permute(self, node: fx.Node) -> Tags:
        tags = self.tags[node.args[0]]
        return tuple(tags[d % len(tags)] for d in node.args[1])

    def unsqueeze(self, node: fx.Node) -> Tags:
        tags = list(self.tags[node.args[0]])
        tags.insert(node.args[1] % (len(tags) + 1), None)
        return tuple(tags)

    def squeeze(self, node: fx.Node) -> Tags:
        tags, shape = self.tags[node.args[0]], shape_of(node.args[0])
        dims = _arg(node, 1, "dim", range(len(tags)))
        dims = {d % len(tags) for d in ([dims] if isinstance(dims, int) else dims)}
        return tuple(t for d, t in enumerate(tags) if d not in dims or shape[d] != 1)

    def expand(self, node: fx.Node) -> Tags:
        sizes = list(node.args[1])
        tags = [None] * (len(sizes) - len(self.tags[node.args[0]])) + list(self.tags[node.args[0]])
        for dim, axis in enumerate(tags):
            if axis is not None:
                self._edit_size(node, 1, sizes, dim, axis)
        return tuple(tags)

    def slice(self, node: fx.Node) -> Tags:
        tags, shape = self.tags[node.args[0]], shape_of(node.args[0])
        dim = _arg(node, 1, "dim", 0) % len(tags)
        start, end, step = _arg(node, 2, "start", 0), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
        whole = start in (None, 0) and (end is None or end >= shape[dim]) and step == 1
        if tags[dim] is not None and not whole:
            raise self._fail(node, "slices along the pruned dim")
        return tags

    def select(self, node: fx.Node) -> Tags:
        tags = list(self.tags[node.args[0]])
        dim = node.args[1] % len(tags)
        if tags.pop(dim) is not None:
            raise self._fail(node, "indexes into the pruned dim")
        return tuple(tags)

    def cat(self, node: fx.Node) -> Tags:
        parts = node.args[0]
        if not all(isinstance(p, fx.Node) and p in self.tags for p in parts):
            raise self._fail(
                node, "concatenates the pruned tensor with a tensor from outside the coupled layers"
            )
        tags = {self.tags[p] for p in parts}
        dim = _arg(node, 1, "dim", 0)
        if len(tags) != 1 or next(iter(tags))[dim] is not None:
            raise self._fail(
                node, "concatenates along the pruned dim, or tensors with different layouts"
            )
        return tags.pop()

    def split(self, node: fx.Node) -> list[Tags]:
        tags = list(self.tags[node.args[0]])
        dim = split_dim(node) % len(tags)
        pieces = len(node_value(node))
        axis = tags[dim]
        if axis is not None:
            if (
                node.target is not aten.split.Tensor
                or axis.segments != pieces
                or shape_of(node.args[0])[dim] != pieces * node.args[1]
            ):
                raise self._fail(
                    node, "splits the pruned dim other than into a fused projection's blocks"
                )
            tags[dim] = Axis(axis.groups)
            self.edits.append(SizeEdit(node, 1, None, Axis(axis.groups)))
        return [tuple(tags)] * pieces

    def getitem(self, node: fx.Node) -> Tags:
        tags = self.tags[node.args[0]][node.args[1]]
        if tags is None:
            raise self._fail(
                node, "reads an output of a BatchNorm other than the normalized tensor"
            )
        return tags

    def softmax(self, node: fx.Node) -> Tags:
        tags = self.tags[node.args[0]]
        if tags[node.args[1] % len(tags)] is not None:
            raise self._fail(node, "normalizes along the pruned dim")
        return tags

    def pool(self, node: fx.Node) -> Tags:
        tags = self.tags[node.args[0]]
        if any(axis is not None for axis in tags[2:]):
            raise self._fail(node, "pools over the pruned dim")
        return tags

    def reduce(self, node: fx.Node) -> Tags:
        tags = self.tags[node.args[0]]
        dims = _arg(node, 1, "dim")
        dims = {
            d % len(tags) for d in ([dims] if isinstance(dims, int) else dims or range(len(tags)))
        }
        if any(tags[d] is not None for d in dims):
            raise self._fail(node, "reduces over the pruned dim")
        keepdim = _arg(node, 2, "keepdim", False)
        return tuple(
            None if d in dims else axis for d, axis in enumerate(tags) if keepdim or d not in dims
        )

    def matmul(self, node: fx.Node) -> Tags:
        left, right = node.args[0], node.args[1]
        if left not in self.tags or right not in self.tags:
            raise self._fail(node, "multiplies by a tensor from outside the coupled layers")
        if any(t is not None for t in (*self.tags[left][-2:], *self.tags[right][-2:])):
            raise self._fail(node, "contracts over the pruned dim")
        batch = [(self.tags[a][:-2], shape_of(a)[:-2]) for a in (left, right)]
        return (*self._combine(node, batch, len(shape_of(node)) - 2), None, None)

    def attention(self, node: fx.Node) -> Tags:
        view = AttentionView.match(node)
        tensors = (view.query, view.key, view.value)
        if not all(t in self.tags for t in tensors):
            raise self._fail(
                node, "attends over a query, key or value from outside the coupled layers"
            )
        heads = {self.tags[t][-3] if len(self.tags[t]) >= 3 else None for t in tensors}
        rest = [
            axis
            for t in tensors
            for i, axis in enumerate(self.tags[t])
            if i != len(self.tags[t]) - 3
        ]
        if len(heads) != 1 or None in heads or any(rest):
            raise self._fail(
                node, "query, key and value do not carry the groups along their heads dim"
            )
        mask = view.attn_mask
        if isinstance(mask, fx.Node) and len(shape := shape_of(mask)) >= 3 and shape[-3] != 1:
            raise self._fail(
                node, f"the attention mask {describe_node(mask)} has one slice per head"
            )
        return self.tags[view.query]

    def batch_norm(self, node: fx.Node) -> Any:
        tags = self.tags[node.args[0]]
        if any(axis is not None for i, axis in enumerate(tags) if i != 1):
            raise self._fail(node, "the pruned dim is not the channel dim")
        training = node.target is aten.batch_norm.default and node.args[5]
        if training:
            raise self._fail(node, "BatchNorm in training mode")
        for tensor in node.args[1:5]:
            if isinstance(tensor, fx.Node):
                if tensor.op != "get_attr":
                    raise self._fail(node, "BatchNorm statistics are computed, not constants")
                self.params.append(
                    TensorSlice(module_path(node) or node.name, node, tensor, 0, tags[1], "param")
                )
        return tags if node.target is aten.batch_norm.default else [tags, None, None]

    def _edit_size(self, node: fx.Node, arg: int, sizes: list, position: int, axis: Axis) -> None:
        size = sizes[position]
        if isinstance(size, int) and size != -1:
            self.edits.append(SizeEdit(node, arg, position, axis))
        elif size != -1:
            raise self._fail(node, f"the pruned dim's size is computed at run time ({size})")


NONLINEAR = {
    aten.gelu.default,
    aten.silu.default,
    aten.relu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.erf.default,
    aten.hardtanh.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.softplus.default,
}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
ASSERTS = {aten._assert_tensor_metadata.default}
_POOLS = {
    aten.max_pool2d.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.max_pool1d.default,
    aten.avg_pool1d.default,
    aten.adaptive_avg_pool1d.default,
}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_ELEMENTWISE = {
    *NONLINEAR,
    aten.neg.default,
    aten.exp.default,
    aten.abs.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.rsub.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.clamp.default,
    aten.where.self,
}
_RULES: dict[Any, Callable[[Tagger, fx.Node], Any]] = {
    **dict.fromkeys(_ELEMENTWISE, Tagger.elementwise),
    **dict.fromkeys(ASSERTS, Tagger.assertion),
    **dict.fromkeys(RESHAPES, Tagger.reshape),
    aten.flatten.using_ints: Tagger.reshape,
    aten.transpose.int: Tagger.transpose,
    aten.t.default: Tagger.transpose,
    aten.permute.default: Tagger.permute,
    aten.unsqueeze.default: Tagger.unsqueeze,
    aten.squeeze.dim: Tagger.squeeze,
    aten.squeeze.dims: Tagger.squeeze,
    aten.squeeze.default: Tagger.squeeze,
    aten.expand.default: Tagger.expand,
    aten.slice.Tensor: Tagger.slice,
    aten.select.int: Tagger.select,
    aten.cat.default: Tagger.cat,
    aten.split.Tensor: Tagger.split,
    aten.split_with_sizes.default: Tagger.split,
    operator.getitem: Tagger.getitem,
    aten.softmax.int: Tagger.softmax,
    aten._softmax.default: Tagger.softmax,
    **dict.fromkeys(MATMULS, Tagger.matmul),
    **dict.fromkeys(_POOLS, Tagger.pool),
    **dict.fromkeys(_REDUCTIONS, Tagger.reduce),
    aten.scaled_dot_product_attention.default: Tagger.attention,
    aten.batch_norm.default: Tagger.batch_norm,
    aten._native_batch_norm_legit_no_training.default: Tagger.batch_norm,
}


def rule_for(node: fx.Node) -> Callable[[Tagger, fx.Node], Any] | None:
    return _RULES.get(node.target) if node.op == "call_function" else None


# ---- shapes -------------------------------------------------------------------------------------


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Sizes of a node's tensor value (a symbolic size reads as its example value)."""
    value = node_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else s.node.hint for s in value.shape)


def _aligned(values: tuple, ndim: int) -> list[tuple[int, Any]]:
    """``(output dim, value)`` for per-dim ``values`` of an operand broadcast to ``ndim`` dims."""
    offset = ndim - len(values)
    return [(offset + i, v) for i, v in enumerate(values)]


def _dim_groups(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with the runs of output dims a reshape maps them to (size-1 dims left out).

    >>> _dim_groups((2, 12, 64), (2, 12, 4, 16))
    [([0], [0]), ([1], [1]), ([2], [2, 3])]
    """
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        in_dims, out_dims = [ins[i]], [outs[j]]
        in_size, out_size = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while in_size != out_size:
            if in_size < out_size and i < len(ins):
                in_dims.append(ins[i])
                in_size, i = in_size * in_shape[ins[i]], i + 1
            elif out_size < in_size and j < len(outs):
                out_dims.append(outs[j])
                out_size, j = out_size * out_shape[outs[j]], j + 1
            else:
                raise Unprovable(
                    f"reshape {in_shape} → {out_shape} does not keep the element count"
                )
        groups.append((in_dims, out_dims))
    return groups


def split_dim(node: fx.Node) -> int:
    return _arg(node, 2, "dim", 0)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


