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
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from slimgraph.errors import describe_node
from slimgraph.ir.nodes import get_attr_value
from slimgraph.ir.views import AttentionView, ConvView, LinearView
from slimgraph.passes.coupling_rules import (
    ASSERTS,
    MATMULS,
    NONLINEAR,
    RESHAPES,
    Axis,
    SizeEdit,
    Tagger,
    Tags,
    TensorSlice,
    Unprovable,
    aten,
    rule_for,
    shape_of,
    split_dim,
)


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
            node: shape_of(node)[_feature_dim(view)] // segments[node]
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
        tagger = Tagger(producer_tags)
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
        if rule_for(user) is None:
            raise Unprovable(
                f"{describe_node(user)} is an op the coupling rules do not cover "
                "(norms, reductions and other layers are never cut)"
            )
        if AttentionView.match(user) is not None and self.kind != "channels":
            self.kind = "heads"
        elif user.target in NONLINEAR or _is_product(user):
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
                if u is not node and u in self.region and u.target not in ASSERTS
            ]
            if others:
                raise Unprovable(
                    f"the input of {describe_node(node)} also flows on to {describe_node(others[0])} "
                    "(a residual stream is never cut)"
                )

    def _output_tags(self, node: fx.Node, view: LinearView | ConvView, axis: Axis) -> Tags:
        tags = [None] * len(shape_of(node))
        tags[_feature_dim(view)] = axis
        return tuple(tags)

    def _weight_slices(
        self, tagger: Tagger, groups: int, segments: dict[fx.Node, int]
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
    sizes = {shape_of(view.query)[-1] for view in attention}
    if len(sizes) != 1:
        raise Unprovable(f"attention ops with different head sizes {sorted(sizes)}")
    return sizes.pop()


def _segments(node: fx.Node) -> int:
    """How many equal blocks a fused projection's output is split into (GPT-2's q|k|v → 3), else 1."""
    width = shape_of(node)[-1]
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target in RESHAPES and shape_of(user)[-1] == width:
            node = user
            continue
        last = len(shape_of(node)) - 1
        if user.target is aten.split.Tensor and split_dim(user) % (last + 1) == last:
            size = user.args[1]
            return width // size if width % size == 0 else 1
        break
    return 1


def _joins_producers(node: fx.Node) -> bool:
    """Whether an operand of ``node`` that reaches back to a weighted layer is coupled with it.

    Attention ops couple queries with keys and values; a product of two projections is a gate. Adds
    are not followed back: an add of a layer's output and an outside tensor is a residual connection.
    """
    return AttentionView.match(node) is not None or node.target in MATMULS or _is_product(node)


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
        elif node.op == "call_function" and rule_for(node) is not None:
            stack.extend(node.all_input_nodes)
    return found


def _check_no_residual(node: fx.Node, inside: set[fx.Node]) -> None:
    """An elementwise op mixing the region with an outside tensor of its own shape is a residual or a branch."""
    if rule_for(node) is not Tagger.elementwise:
        return
    for operand in node.all_input_nodes:
        if operand not in inside and operand.op != "get_attr" and shape_of(operand) == shape_of(node):
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



__all__ = [
    "Axis",
    "CoupledSet",
    "SizeEdit",
    "TensorSlice",
    "Unprovable",
    "Unresolved",
    "find_coupled_sets",
]
