"""layer_drop: remove whole repeated blocks, routing the residual stream around them.

The blocks are the main container of the block-structure analysis (``ir/blocks.py``):
``encoder.layer.N``, ``h.N``, ``layers.N``…, found from ``nn_module_stack``, never from
model names. Which blocks go:

- ``layers=[3, 7]``: exactly those.
- ``count=n`` or ``ratio=r`` (n = r · blocks rounded half up, at least 1), by ``criterion``:

  - ``angular`` (ShortGPT's block influence, as an angle): per block, the angular distance
    arccos(cos(h_in, h_out)) / π between its input and output hidden states, averaged over
    every token of every calibration batch; the n blocks with the smallest distance go.
  - ``contiguous`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"):
    the same distance between the input of block ℓ and the output of block ℓ+n−1, for every
    window of n consecutive blocks; the window with the smallest distance goes. Averaged
    over all tokens rather than the paper's last token: an encoder has no privileged one.
  - ``last``: the last n blocks.

  Distances are measured once, on the original graph, from ``optimize(..., calibration=...)``:
  dropping a block changes what the later ones see, and they are not measured again.

A block's *stream* is its one output read outside it and the one activation input with that
output's shape and dtype (masks, position embeddings, cos/sin are other inputs). The rewrite
points the output's users at the input, erases the block's nodes and deletes its parameters.
A block whose stream is ambiguous is never dropped: the report says why, and naming it in
``layers`` is an error. In pipeline text::

    layer_drop(layers=[3, 7])
    layer_drop(ratio=0.25, criterion=contiguous)
    layer_drop(count=2)
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from slimgraph.errors import PassError, PipelineError
from slimgraph.ir.blocks import Block
from slimgraph.ir.graph_utils import eliminate_dead_code
from slimgraph.ir.nodes import mutates
from slimgraph.ir.verify import verify
from slimgraph.passes.activations import node_outputs
from slimgraph.passes.manager import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class LayerDrop(Pass):
    """Drop whole blocks of the main repeated stack: named ones, or n chosen by a criterion."""

    name: ClassVar[str] = "layer_drop"
    requires: ClassVar[tuple[str, ...]] = ("shapes", "blocks")

    layers: tuple[int, ...] = ()
    count: int | None = None
    ratio: float | None = None
    criterion: Literal["angular", "contiguous", "last"] = "angular"

    def __post_init__(self) -> None:
        # Python callers write lists; options are tuples (hashable).
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        super().__post_init__()

    def validate(self) -> None:
        given = [
            name for name in ("layers", "count", "ratio") if getattr(self, name) not in ((), None)
        ]
        if len(given) != 1:
            what = f"got {' and '.join(given)}" if given else "got none"
            raise PipelineError(
                f"pass 'layer_drop': give exactly one of layers=[3, 7], count=2 or "
                f"ratio=0.25 to say which blocks to drop ({what})"
            )
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise PipelineError(
                f"pass 'layer_drop': ratio={self.ratio:g} must be in (0, 1), "
                "the fraction of blocks to drop, e.g. ratio=0.25"
            )
        if self.count is not None and self.count < 1:
            raise PipelineError(f"pass 'layer_drop': count={self.count} must be >= 1")
        if any(index < 0 for index in self.layers):
            raise PipelineError(
                f"pass 'layer_drop': layers={list(self.layers)} has a negative index; "
                "blocks are numbered from 0"
            )
        repeated = sorted({index for index in self.layers if self.layers.count(index) > 1})
        if repeated:
            raise PipelineError(
                f"pass 'layer_drop': layers={list(self.layers)} names block "
                f"{repeated[0]} twice; list each block once"
            )
        if self.layers and self.criterion != "angular":
            raise PipelineError(
                f"pass 'layer_drop': criterion={self.criterion} chooses blocks itself; "
                "with layers=[...] leave it out, or give count= or ratio= instead"
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        blocks: list[Block] = ctx.analysis("blocks").main
        if not blocks:
            raise PassError(
                self.name,
                "found no repeated blocks (a container of modules numbered 0..n-1 "
                "of one type, such as encoder.layer.N or model.layers.N); layer_drop only "
                "drops blocks of such a stack",
            )
        container = blocks[0].path.rpartition(".")[0] or "the root module"
        shapes = ctx.analysis("shapes")
        streams = [find_stream(block, shapes) for block in blocks]
        chosen, scores, stats = self._choose(gm, ctx, container, streams)
        parameters_before = _parameter_count(gm)
        for index in sorted(chosen, reverse=True):  # later first: an earlier output feeds it
            _drop(gm, streams[index])
        dead_nodes, freed = eliminate_dead_code(gm)
        verify(gm)  # lint and shape re-propagation: a broken graph fails here, inside the pass
        stats |= {
            "container": container,
            "dead_nodes": dead_nodes,
            "freed_tensors": freed,
            "params_removed": parameters_before - _parameter_count(gm),
            "blocks": [
                {
                    "block": s.path,
                    "index": s.index,
                    "score": scores[s.index],
                    "dropped": s.index in chosen,
                }
                for s in streams
            ],
        }
        return PassResult(
            matched=len(streams),
            rewritten=len(chosen),
            stats=stats,
            notes=self._notes(streams, chosen, scores, stats),
        )

    def _choose(
        self, gm: fx.GraphModule, ctx: PassContext, container: str, streams: list[Stream]
    ) -> tuple[list[int], list[float | None], dict[str, Any]]:
        """``(indices to drop, score per block, stats)``, after every range check."""
        total = len(streams)
        missing = [index for index in self.layers if index >= total]
        if missing:
            raise PassError(
                self.name,
                f"block {missing[0]} does not exist: {container} has blocks "
                f"0..{total - 1}; choose layers in that range",
            )
        n = len(self.layers) or self.count or max(1, math.floor(self.ratio * total + 0.5))
        if n >= total:
            asked = f"ratio={self.ratio:g} means" if self.ratio is not None else "that is"
            raise PassError(
                self.name,
                f"dropping {n} of the {total} blocks of {container} would leave "
                f"none ({asked} {n}); drop at most {total - 1}",
            )
        droppable = [s.index for s in streams if s.reason is None]
        scores: list[float | None] = [None] * total
        if self.layers:
            blocked = next((streams[i] for i in self.layers if streams[i].reason), None)
            if blocked is not None:
                raise PassError(
                    self.name, f"block {blocked.path} cannot be dropped: {blocked.reason}"
                )
            return sorted(self.layers), scores, {"criterion": "layers"}
        if len(droppable) < n:
            raise PassError(
                self.name,
                f"only {len(droppable)} of the {total} blocks of {container} can be "
                f"dropped, fewer than the {n} asked for; {_why_not(streams)}",
            )
        if self.criterion == "last":
            return droppable[-n:], scores, {"criterion": "last"}
        if not ctx.calibration:
            raise PassError(
                self.name,
                f"criterion={self.criterion} measures hidden states on calibration "
                "inputs; pass optimize(..., calibration=[batch, ...]) (a few real inputs "
                "shaped like the example inputs), or use criterion=last or layers=[...]",
            )
        if self.criterion == "angular":
            spans = {i: (streams[i].input, streams[i].output) for i in droppable}
        else:  # window i..i+n-1, keyed by its first block
            spans = {
                i: (streams[i].input, streams[i + n - 1].output)
                for i in range(total - n + 1)
                if all(j in droppable for j in range(i, i + n))
            }
            if not spans:
                raise PassError(
                    self.name,
                    f"no {n} consecutive blocks of {container} can all be dropped; "
                    f"{_why_not(streams)}",
                )
        distances = mean_angular_distances(gm, list(spans.values()), ctx.calibration)
        for start, distance in zip(spans, distances, strict=True):
            scores[start] = distance
        stats = {"criterion": self.criterion, "calibration_batches": len(ctx.calibration)}
        if self.criterion == "angular":
            return sorted(sorted(spans, key=lambda i: scores[i])[:n]), scores, stats
        best = min(spans, key=lambda i: scores[i])
        stats["windows"] = [{"start": i, "end": i + n - 1, "score": scores[i]} for i in spans]
        return list(range(best, best + n)), scores, stats

    def _notes(
        self,
        streams: list[Stream],
        chosen: list[int],
        scores: list[float | None],
        stats: dict[str, Any],
    ) -> list[str]:
        criterion = stats["criterion"]
        what = {"angular": "angular distance", "contiguous": "window distance"}.get(criterion)
        notes = [
            f"dropped {len(chosen)} of {len(streams)} blocks of {stats['container']} "
            f"({criterion}): {chosen}; {stats['params_removed']} parameters removed"
        ]
        if what:
            notes.append(
                f"distances measured once on the original graph over "
                f"{stats['calibration_batches']} calibration batches"
            )
        for s in streams:
            score = f"{what} {scores[s.index]:.4f}, " if scores[s.index] is not None else ""
            state = "dropped" if s.index in chosen else "kept"
            reason = f" (cannot be dropped: {s.reason})" if s.reason else ""
            notes.append(f"{s.path}: {score}{state}{reason}")
        return notes


@dataclass
class Stream:
    """A block's residual stream: the input its output replaces when the block is dropped."""

    index: int
    path: str
    nodes: list[fx.Node]  # what dropping erases: the block's nodes and the getitems unpacking it
    input: fx.Node | None = None
    output: fx.Node | None = None
    reason: str | None = None  # why the stream is not unambiguous; None when it is


def find_stream(block: Block, shapes: dict[fx.Node, Any]) -> Stream:
    """Find ``block``'s stream, or the reason it has none (``Stream.reason``).

    Example: for GPT-2's ``h.1`` the input is ``add_7`` (what ``h.0`` returned) and the
    output ``add_11``; the attention mask ``expand_2`` is another input, of another shape.
    """
    inside = set(block.nodes)
    stream = Stream(block.index, block.path, list(block.nodes))
    outputs = []
    for node in block.outputs:
        items = _tuple_items(node, inside, shapes)
        stream.nodes += items
        outputs += [item for item in items if item.users] if items else [node]
    writer = next(
        (n for n in block.nodes if mutates(n) and any(a not in inside for a in n.all_input_nodes)),
        None,
    )
    if writer is not None:
        stream.reason = f"node {writer.name} writes in place to a tensor from outside the block"
        return stream
    if len(outputs) != 1:
        stream.reason = (
            f"{len(outputs)} of its values are read outside it "
            f"({', '.join(n.name for n in outputs)}), not one residual stream"
        )
        return stream
    output, value = outputs[0], shapes.get(outputs[0])
    if not isinstance(value, torch.Tensor):
        stream.reason = f"its output {output.name} is not a tensor"
        return stream
    same = [
        n for n in block.inputs if n.op != "get_attr" and _same_tensor_type(shapes.get(n), value)
    ]
    if len(same) != 1:
        found = f"inputs {', '.join(n.name for n in same)} all have" if same else "no input has"
        stream.reason = (
            f"{found} the shape {list(value.shape)} and dtype of its output {output.name}, "
            "so its residual stream is ambiguous"
        )
        return stream
    stream.input, stream.output = same[0], output
    return stream


def mean_angular_distances(
    gm: fx.GraphModule,
    spans: list[tuple[fx.Node, fx.Node]],
    calibration: list[tuple[tuple, dict[str, Any]]],
) -> list[float]:
    """For each ``(a, b)`` node pair, arccos(cos(a, b)) / π per token, averaged over all batches' tokens."""
    names = {node.name for span in spans for node in span}
    totals, tokens = [0.0] * len(spans), 0
    for values in node_outputs(
        gm, sorted(names), calibration, description="layer_drop: block distances"
    ):
        for k, (a, b) in enumerate(spans):
            distance = angular_distance(values[a.name], values[b.name])
            totals[k] += distance.sum().item()
        tokens += distance.numel()
    return [total / tokens for total in totals]


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / π along the last dimension, in float64: 0 same direction, 1 opposite.

    A zero vector (e.g. a padding token's embedding) has no direction; it counts as
    orthogonal, distance 1/2.
    """
    cosine = F.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


def _why_not(streams: list[Stream]) -> str:
    """The undroppable blocks and their reasons, for an error message."""
    return "; ".join(f"{s.path}: {s.reason}" for s in streams if s.reason)


def _drop(gm: fx.GraphModule, stream: Stream) -> None:
    stream.output.replace_all_uses_with(stream.input)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in sorted(
        stream.nodes, key=position.__getitem__, reverse=True
    ):  # users before producers
        gm.graph.erase_node(node)


def _tuple_items(node: fx.Node, inside: set[fx.Node], shapes: dict[fx.Node, Any]) -> list[fx.Node]:
    """The ``getitem``s outside the block unpacking a tuple it returns (a block traced as one call)."""
    outside = [user for user in node.users if user not in inside]
    unpacked = all(u.op == "call_function" and u.target is operator.getitem for u in outside)
    return outside if unpacked and isinstance(shapes.get(node), tuple | list) else []


def _same_tensor_type(a: Any, b: torch.Tensor) -> bool:
    if not isinstance(a, torch.Tensor) or a.dtype != b.dtype or a.dim() != b.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True))


def _parameter_count(gm: fx.GraphModule) -> int:
    return sum(t.numel() for t in (*gm.parameters(), *gm.buffers()))
