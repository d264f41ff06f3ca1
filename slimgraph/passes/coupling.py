"""Coupled dimensions: the rows and columns of different tensors that must be removed together.

Structured pruning removes a *group*: hidden unit j of an FFN (row j of fc1 and its bias entry,
column j of fc2), an attention head (its rows of q/k/v, its columns of the output projection; with
grouped-query attention a key/value head together with its query heads), a conv channel (filter c,
BatchNorm entry c, input channel c of the next conv). ``find_coupled_sets`` finds them on the
data-flow graph:

1. From a seed layer (a ``LinearView``/``ConvView``, the *producer*), the *region* is every node its
   output reaches before it becomes the input of another weighted layer (a *consumer*). Operands of
   attention ops and of products that come from other weighted layers join as producers too (the key
   and value projections; Llama's ``up_proj`` in ``act(gate(x)) * up(x)``).
2. Every tensor of the region gets *tags*, one per dim: ``Axis(groups, segments)`` when the dim is laid
   out group-major (index = group · unit + offset, in ``segments`` concatenated blocks such as GPT-2's
   fused q|k|v) and ``None`` when it does not carry the groups. One rule per op moves the tags forward
   (``view [b, s, 768] → [b, s, 12, 64]`` moves the tag to the heads dim) and records the literal sizes
   that shrink with the groups (that view becomes ``[b, s, 6, 64]``).
3. An op no rule covers (a norm, a reduction), a residual add, a slice along the pruned dim, a grouped
   conv or a tied weight makes the set unprovable: it is returned with the reason, never guessed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from slimgraph.errors import describe_node
from slimgraph.ir.nodes import get_attr_value, module_path, node_value
from slimgraph.ir.views import AttentionView, ConvView, LinearView

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


@dataclass
class CoupledSet:
    """Groups that can be removed together: every tensor slice and literal size that depends on them."""

    kind: str  # "ffn" | "heads" | "channels"
    groups: int
    unit: int  # narrowest width of one group among the producers (rounding works on widths)
    producers: list[fx.Node]
    consumers: list[fx.Node]
    slices: list[TensorSlice]
    edits: list[SizeEdit] = field(default_factory=list)
    # Grouped-query attention: a group is one key/value head and this many query heads.
    query_heads_per_group: int = 1

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(s.layer for s in self.slices if s.role != "param"))

    @property
    def path(self) -> str:
        """Longest common module prefix of the layers (``encoder.layer.0`` for BERT's FFN)."""
        parts = [layer.split(".") for layer in self.layers]
        common = itertools.takewhile(lambda names: len(set(names)) == 1, zip(*parts, strict=False))
        return ".".join(names[0] for names in common) or self.layers[0]


@dataclass(frozen=True)
class Unresolved:
    """A seed layer whose coupling could not be proven; ``kind`` is the target it would belong to."""

    kind: str
    layer: str
    reason: str


class Unprovable(Exception):
    """The coupling of a set cannot be shown consistent; the message says where and why."""


def find_coupled_sets(
    gm: fx.GraphModule, dataflow: nx.DiGraph
) -> tuple[list[CoupledSet], list[Unresolved]]:
    """Every provable coupled set of ``gm``, and the seeds that looked prunable but are not.

    Example: for BERT each layer gives a ``heads`` set (query/key/value → attention.output.dense) and
    an ``ffn`` set (intermediate.dense → output.dense). A linear feeding a residual add directly
    (``output.dense``) is no unit of anything and is not reported; the pooler's
    ``dense → tanh → output`` is reported as unresolved (it reaches the model output).
    """
    readers = _tensor_readers(gm)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    sets, unresolved, claimed = [], [], set()
    for node in gm.graph.nodes:
        seed = _weighted(node)
        if seed is None or node in claimed:
            continue
        finder = _SetFinder(dataflow, readers, order)
        try:
            found = finder.find(seed)
            if claimed & {*found.producers, *finder.region}:
                raise Unprovable("it overlaps a coupled set found before it")
        except Unprovable as problem:
            claimed.update(finder.producers)
            if finder.kind is not None:
                unresolved.append(
                    Unresolved(finder.kind, seed.module_path or node.name, str(problem))
                )
            continue
        claimed.update(found.producers, finder.region)
        sets.append(found)
    return sets, unresolved


# ---- growing a set from a seed ------------------------------------------------------------------

_NONLINEAR = {
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


class _SetFinder:
    def __init__(
        self, dataflow: nx.DiGraph, readers: dict[int, set[fx.Node]], order: dict[fx.Node, int]
    ):
        self.dataflow, self.readers, self.order = dataflow, readers, order
        self.queue: list[tuple[int, fx.Node]] = []  # a heap in graph order, see ``_grow``
        self.producers: dict[fx.Node, LinearView | ConvView] = {}
        self.consumers: dict[fx.Node, LinearView | ConvView] = {}
        self.region: set[fx.Node] = set()
        self.kind: str | None = None  # what the set looks like so far (None: not a prunable unit)

    def find(self, seed: LinearView | ConvView) -> CoupledSet:
        if isinstance(seed, ConvView):
            self.kind = "channels"
        self._grow(seed)
        attention = [view for n in self.region if (view := AttentionView.match(n)) is not None]
        if not self.consumers:
            raise Unprovable("its output reaches no other layer")
        self._check_layers()
        unit = _head_dim(attention) if attention else 1
        segments = {
            node: _segments(node) if isinstance(view, LinearView) else 1
            for node, view in self.producers.items()
        }
        widths = {
            node: _shape(node)[_feature_dim(view)] // segments[node]
            for node, view in self.producers.items()
        }
        if any(width % unit for width in widths.values()):
            raise Unprovable(
                f"projection widths {sorted(set(widths.values()))} are not multiples of the "
                f"head size {unit}"
            )
        groups = math.gcd(*(width // unit for width in widths.values()))
        if groups < 2:
            what = "key/value head shared by every query head" if attention else "unit"
            raise Unprovable(f"a single group (one {what}): removing it would remove everything")
        producer_tags = {
            node: self._output_tags(node, view, Axis(groups, segments[node]))
            for node, view in self.producers.items()
        }
        tagger = _Tagger(producer_tags)
        for node in sorted(self.region, key=self.order.__getitem__):
            tagger.visit(node)
        slices = self._weight_slices(tagger, groups, segments) + tagger.params
        self._check_untied(slices)
        kind = "heads" if attention else self.kind or "ffn"
        narrowest, widest = (f(widths.values()) // groups for f in (min, max))
        return CoupledSet(
            kind=kind,
            groups=groups,
            unit=narrowest,
            producers=list(self.producers),
            consumers=list(self.consumers),
            slices=slices,
            edits=tagger.edits,
            query_heads_per_group=widest // narrowest if attention else 1,
        )

    def _grow(self, seed: LinearView | ConvView) -> None:
        """Collect region, producers and consumers, visiting nodes in graph order.

        In graph order every operand of a node that the producers reach has been visited before the
        node itself, so an operand still outside the region then really comes from outside.
        """
        self._add_producer(seed)
        while self.queue:
            _, node = heapq.heappop(self.queue)
            if node in self.region:
                _check_no_residual(node, self.region | set(self.producers))
            for user in self.dataflow.successors(node):
                if user not in self.region and user not in self.consumers:
                    self._visit(node, user)

    def _enqueue(self, node: fx.Node) -> None:
        heapq.heappush(self.queue, (self.order[node], node))

    def _add_producer(self, view: LinearView | ConvView) -> None:
        if view.node in self.consumers:
            raise Unprovable(
                f"{describe_node(view.node)} both reads and produces the pruned dimension"
            )
        if view.node not in self.producers:
            self.producers[view.node] = view
            self._enqueue(view.node)

    def _visit(self, node: fx.Node, user: fx.Node) -> None:
        view = _weighted(user)
        if view is not None:
            if view.input is not node or user in self.producers:
                raise Unprovable(f"{describe_node(user)} reads it as a weight, not as its input")
            self.consumers[user] = view
            return
        if user.op == "output":
            raise Unprovable("it reaches the model's output")
        if _rule(user) is None:
            raise Unprovable(
                f"{describe_node(user)} is an op the coupling rules do not cover "
                "(norms, reductions and other layers are never cut)"
            )
        if AttentionView.match(user) is not None and self.kind != "channels":
            self.kind = "heads"
        elif user.target in _NONLINEAR or _is_product(user):
            self.kind = self.kind or "ffn"
        self.region.add(user)
        self._enqueue(user)
        if _joins_producers(user):
            for operand in user.all_input_nodes:
                if operand not in self.region and operand not in self.producers:
                    for producer in _upstream_producers(operand):
                        self._add_producer(producer)

    def _check_layers(self) -> None:
        for node, view in [*self.producers.items(), *self.consumers.items()]:
            if isinstance(view, ConvView) and view.groups != 1:
                raise Unprovable(
                    f"{describe_node(node)} is a grouped convolution (groups={view.groups})"
                )
            if view.weight_ref.node is None or (
                view.bias_ref is not None and view.bias_ref.node is None
            ):
                raise Unprovable(
                    f"{describe_node(node)} keeps its weights in a module; capture with "
                    "slimgraph.ir.capture so they are graph constants"
                )
        for node, view in self.consumers.items():
            others = [
                u
                for u in view.input.users
                if u is not node and u in self.region and u.target not in _ASSERTS
            ]
            if others:
                raise Unprovable(
                    f"the input of {describe_node(node)} also flows on to {describe_node(others[0])} "
                    "(a residual stream is never cut)"
                )

    def _output_tags(self, node: fx.Node, view: LinearView | ConvView, axis: Axis) -> Tags:
        tags = [None] * len(_shape(node))
        tags[_feature_dim(view)] = axis
        return tuple(tags)

    def _weight_slices(
        self, tagger: _Tagger, groups: int, segments: dict[fx.Node, int]
    ) -> list[TensorSlice]:
        slices = []
        for node, view in self.producers.items():
            axis = Axis(groups, segments[node])
            slices.append(_weight_slice(view, "out", axis))
            if view.bias_ref is not None:
                path = view.module_path or node.name
                slices.append(TensorSlice(path, node, view.bias_ref.node, 0, axis, "param"))
        for node, view in self.consumers.items():
            tags = tagger.tags[view.input]
            axis = tags[_feature_dim(view)]
            if axis is None or sum(t is not None for t in tags) != 1:
                raise Unprovable(
                    f"{describe_node(node)} reads the pruned groups along a dim other than its "
                    "input features"
                )
            slices.append(_weight_slice(view, "in", axis))
        return slices

    def _check_untied(self, slices: list[TensorSlice]) -> None:
        for s in slices:
            readers = self.readers.get(
                id(get_attr_value(s.source.graph.owning_module, s.source.target)), set()
            )
            others = sorted(r.name for r in readers if r is not s.user)
            if others:
                raise Unprovable(
                    f"tensor '{s.source.target}' is also read by {', '.join(others)} (tied); "
                    "slicing it for one reader would change the others"
                )


def _weighted(node: fx.Node) -> LinearView | ConvView | None:
    return LinearView.match(node) or ConvView.match(node)


def _weight_slice(view: LinearView | ConvView, role: str, axis: Axis) -> TensorSlice:
    """A producer's rows (``out``) or a consumer's columns (``in``) of the stored weight."""
    input_dim = 0 if view.weight_ref.transposed else 1  # GPT-2's Conv1D stores [in, out]
    dim = input_dim if role == "in" else 1 - input_dim
    path, conv = view.module_path or view.node.name, isinstance(view, ConvView)
    return TensorSlice(
        path, view.node, view.weight_ref.node, dim, axis, role, view.input, input_dim, conv
    )


def _feature_dim(view: LinearView | ConvView) -> int:
    """The dim of the layer's input and output that holds its features: channels of a conv, last of a linear."""
    return 1 if isinstance(view, ConvView) else -1


def _head_dim(attention: list[AttentionView]) -> int:
    sizes = {_shape(view.query)[-1] for view in attention}
    if len(sizes) != 1:
        raise Unprovable(f"attention ops with different head sizes {sorted(sizes)}")
    return sizes.pop()


def _segments(node: fx.Node) -> int:
    """How many equal blocks a fused projection's output is split into (GPT-2's q|k|v → 3), else 1."""
    width = _shape(node)[-1]
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target in _RESHAPES and _shape(user)[-1] == width:
            node = user
            continue
        last = len(_shape(node)) - 1
        if user.target is aten.split.Tensor and _split_dim(user) % (last + 1) == last:
            size = user.args[1]
            return width // size if width % size == 0 else 1
        break
    return 1


def _joins_producers(node: fx.Node) -> bool:
    """Whether an operand of ``node`` that reaches back to a weighted layer is coupled with it.

    Attention ops couple queries with keys and values; a product of two projections is a gate. Adds
    are not followed back: an add of a layer's output and an outside tensor is a residual connection.
    """
    return AttentionView.match(node) is not None or node.target in _MATMULS or _is_product(node)


def _is_product(node: fx.Node) -> bool:
    return node.target is aten.mul.Tensor and sum(isinstance(a, fx.Node) for a in node.args) == 2


def _upstream_producers(start: fx.Node) -> list[LinearView | ConvView]:
    """Weighted layers ``start`` is computed from through ops the rules cover (the key projection behind RoPE)."""
    found, seen, stack = [], set(), [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if (view := _weighted(node)) is not None:
            found.append(view)
        elif node.op == "call_function" and _rule(node) is not None:
            stack.extend(node.all_input_nodes)
    return found


def _check_no_residual(node: fx.Node, inside: set[fx.Node]) -> None:
    """An elementwise op mixing the region with an outside tensor of its own shape is a residual or a branch."""
    if _rule(node) is not _Tagger.elementwise:
        return
    for operand in node.all_input_nodes:
        if operand not in inside and operand.op != "get_attr" and _shape(operand) == _shape(node):
            raise Unprovable(
                f"{describe_node(node)} combines it with {describe_node(operand)} of the same shape "
                "(a residual connection or a branch from outside the coupled layers)"
            )


def _tensor_readers(gm: fx.GraphModule) -> dict[int, set[fx.Node]]:
    """``id(tensor) → the nodes reading it`` through any ``get_attr``, so tied weights are seen."""
    readers: dict[int, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(
            value := get_attr_value(gm, node.target), torch.Tensor
        ):
            readers.setdefault(id(value), set()).update(node.users)
    return readers


# ---- tags: which dim of each region tensor carries the groups ----------------------------------


class _Tagger:
    """Carries tags through the region in graph order; each rule checks its op keeps groups separate."""

    def __init__(self, producer_tags: dict[fx.Node, Tags]):
        self.tags: dict[fx.Node, Any] = dict(producer_tags)
        self.edits: list[SizeEdit] = []
        self.params: list[TensorSlice] = []

    def visit(self, node: fx.Node) -> None:
        self.tags[node] = _rule(node)(self, node)

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
        out_shape = _shape(node)
        inside = [a for a in node.all_input_nodes if a in self.tags]
        tags = self._combine(node, [(self.tags[a], _shape(a)) for a in inside], len(out_shape))
        for operand in node.all_input_nodes:
            shape = _shape(operand)
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
        sizes = list(node.args[1]) if node.target in _RESHAPES else None  # flatten: no sizes
        in_shape, out_shape, in_tags = _shape(source), _shape(node), self.tags[source]
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
        tags, shape = self.tags[node.args[0]], _shape(node.args[0])
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
        tags, shape = self.tags[node.args[0]], _shape(node.args[0])
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
        dim = _split_dim(node) % len(tags)
        pieces = len(node_value(node))
        axis = tags[dim]
        if axis is not None:
            if (
                node.target is not aten.split.Tensor
                or axis.segments != pieces
                or _shape(node.args[0])[dim] != pieces * node.args[1]
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
        batch = [(self.tags[a][:-2], _shape(a)[:-2]) for a in (left, right)]
        return (*self._combine(node, batch, len(_shape(node)) - 2), None, None)

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
        if isinstance(mask, fx.Node) and len(shape := _shape(mask)) >= 3 and shape[-3] != 1:
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


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_MATMULS = {aten.matmul.default, aten.bmm.default}
_ASSERTS = {aten._assert_tensor_metadata.default}
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
    *_NONLINEAR,
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
_RULES: dict[Any, Callable[[_Tagger, fx.Node], Any]] = {
    **dict.fromkeys(_ELEMENTWISE, _Tagger.elementwise),
    **dict.fromkeys(_ASSERTS, _Tagger.assertion),
    **dict.fromkeys(_RESHAPES, _Tagger.reshape),
    aten.flatten.using_ints: _Tagger.reshape,
    aten.transpose.int: _Tagger.transpose,
    aten.t.default: _Tagger.transpose,
    aten.permute.default: _Tagger.permute,
    aten.unsqueeze.default: _Tagger.unsqueeze,
    aten.squeeze.dim: _Tagger.squeeze,
    aten.squeeze.dims: _Tagger.squeeze,
    aten.squeeze.default: _Tagger.squeeze,
    aten.expand.default: _Tagger.expand,
    aten.slice.Tensor: _Tagger.slice,
    aten.select.int: _Tagger.select,
    aten.cat.default: _Tagger.cat,
    aten.split.Tensor: _Tagger.split,
    aten.split_with_sizes.default: _Tagger.split,
    operator.getitem: _Tagger.getitem,
    aten.softmax.int: _Tagger.softmax,
    aten._softmax.default: _Tagger.softmax,
    **dict.fromkeys(_MATMULS, _Tagger.matmul),
    **dict.fromkeys(_POOLS, _Tagger.pool),
    **dict.fromkeys(_REDUCTIONS, _Tagger.reduce),
    aten.scaled_dot_product_attention.default: _Tagger.attention,
    aten.batch_norm.default: _Tagger.batch_norm,
    aten._native_batch_norm_legit_no_training.default: _Tagger.batch_norm,
}


def _rule(node: fx.Node) -> Callable[[_Tagger, fx.Node], Any] | None:
    return _RULES.get(node.target) if node.op == "call_function" else None


# ---- shapes -------------------------------------------------------------------------------------


def _shape(node: Any) -> tuple[int, ...] | None:
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


def _split_dim(node: fx.Node) -> int:
    return _arg(node, 2, "dim", 0)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


__all__ = [
    "Axis",
    "CoupledSet",
    "SizeEdit",
    "TensorSlice",
    "Unprovable",
    "Unresolved",
    "find_coupled_sets",
]
