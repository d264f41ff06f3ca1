"""Analyses computed lazily and cached per graph version.

A pass asks ``ctx.analysis("shapes")``; the manager computes it once and keeps
it until a pass changes the graph, unless that pass declared the analysis
``preserves``-d. Each analysis is a function of the GraphModule, registered
with the analyses it depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch.fx as fx

from slimgraph.ir.blocks import find_blocks
from slimgraph.ir.cost import graph_cost
from slimgraph.ir.nodes import has_value, node_value, op_name
from slimgraph.ir.shapes import propagate_shapes


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """A networkx view of data flow: one vertex per FX node, an edge from producer to user."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node, op=node.op, target=op_name(node))
        graph.add_edges_from((source, node) for source in node.all_input_nodes)
    return graph


@dataclass(frozen=True)
class Analysis:
    name: str
    compute: Callable[[fx.GraphModule], Any]
    requires: tuple[str, ...] = ()


ANALYSES: dict[str, Analysis] = {
    a.name: a
    for a in (
        Analysis("shapes", propagate_shapes),
        Analysis("blocks", find_blocks),
        Analysis("costs", graph_cost, requires=("shapes",)),
        Analysis("dataflow", dataflow_graph),
    )
}


class AnalysisManager:
    """Cache of analysis results for one GraphModule, keyed by name and graph version."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.version = 0
        self._cache: dict[str, tuple[int, Any]] = {}

    def get(self, name: str) -> Any:
        """The result of analysis ``name`` for the current graph version, computed if needed."""
        if name not in ANALYSES:
            raise KeyError(f"unknown analysis '{name}'; known analyses: {', '.join(sorted(ANALYSES))}")
        cached = self._cache.get(name)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        analysis = ANALYSES[name]
        for dependency in analysis.requires:
            self.get(dependency)
        result = analysis.compute(self.gm)
        self._cache[name] = (self.version, result)
        return result

    @classmethod
    def for_captured(cls, gm: fx.GraphModule) -> AnalysisManager:
        """A manager that starts from the shapes the capture recorded, when it recorded them all."""
        manager = cls(gm)
        manager.adopt_capture_shapes()
        return manager

    def adopt_capture_shapes(self) -> bool:
        """Use the fake values ``torch.export``/Dynamo recorded on every node as the shapes result.

        Saves a full propagation right after capture; returns False (nothing adopted)
        when some node has no value.
        """
        # Module calls count when something reads them (export's ``_guards_fn`` returns nothing).
        nodes = [n for n in self.gm.graph.nodes if n.op in ("placeholder", "call_function", "call_method")
                 or n.op == "call_module" and n.users]
        if not all(has_value(n) for n in nodes):
            return False
        values = {n: node_value(n) for n in self.gm.graph.nodes if n.op != "output"}
        self._cache["shapes"] = (self.version, values)
        return True

    def recompute(self, name: str) -> Any:
        """Drop the cached result of ``name`` and compute it again."""
        self._cache.pop(name, None)
        return self.get(name)

    def is_cached(self, name: str) -> bool:
        cached = self._cache.get(name)
        return cached is not None and cached[0] == self.version

    def graph_changed(self, preserved: tuple[str, ...] = ()) -> None:
        """Start a new graph version; results named in ``preserved`` carry over to it.

        Only results valid for the version being left carry over: a result already
        stale (from an earlier change) stays stale.
        """
        carried = {name: self._cache[name][1] for name in preserved if self.is_cached(name)}
        self.version += 1
        for name, result in carried.items():
            self._cache[name] = (self.version, result)

    def rebind(self, gm: fx.GraphModule) -> None:
        """Point at a different GraphModule (after a rollback); everything is recomputed."""
        self.gm = gm
        self.version += 1
