"""Record a pipeline run as JSON Lines: one ``run`` line, then one ``pass`` line per pass.

The format (version 1), every line a JSON object::

    {"kind": "run", "version": 1, "model": "...", "pipeline": "cleanup, fold_constants",
     "entry": "optimize" | "compile" | "cli", "graph_index": 0,
     "capture": {"strategy": "export", "seconds": 1.2}, "graph": GRAPH}
    {"kind": "pass", "index": 0, "name": "cleanup", "text": "cleanup", "options": {...},
     "status": "applied" | "no change" | "rolled back", "reason": "", "seconds": 0.01,
     "verify_seconds": 0.02, "matched": 3, "rewritten": 5, "notes": [...], "stats": {...},
     "output_error": 0.0, "totals_before": TOTALS, "totals_after": TOTALS,
     "added": [names], "removed": [names], "replaced": [{"old": name, "new": name}],
     "graph": GRAPH}                       # the graph after the pass

    GRAPH  = {"code": "def forward(...)...", "nodes": [NODE, ...]}
    NODE   = {"name", "op", "target", "kernel", "inputs": [names], "shape": [..] | null,
              "dtype": "torch.float32" | null, "module_path": "encoder.layer.0.attention",
              "module_stack": [[path, type], ...], "source": "model.py:42 `x = ...`",
              "flops": int | str, "bytes": int | str, "provenance": name | null}
    TOTALS = {"nodes": int, "param_bytes": int, "flops": int | str}

Symbolic sizes and costs are written as strings (``"2*batch*seq"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from slimgraph.ir.cost import symbolic_size
from slimgraph.ir.nodes import module_path, module_stack, node_value, op_name, user_source_line
from slimgraph.passes.manager import Pass, PassContext
from slimgraph.passes.runner import Instrument, PassRecord

FORMAT_VERSION = 1


class TraceRecorder(Instrument):
    """Write a trace of the pipeline run to ``path`` (JSON Lines), one line as each pass ends."""

    def __init__(self, path: str | Path, *, model: str = "", pipeline: str = "", entry: str = "optimize",
                 graph_index: int = 0, capture: dict[str, Any] | None = None):
        self.path = Path(path)
        self.header = {"kind": "run", "version": FORMAT_VERSION, "model": model, "pipeline": pipeline,
                       "entry": entry, "graph_index": graph_index, "capture": capture or {}}

    def before_pipeline(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._graph = describe_graph(gm, ctx)
        self._write({**self.header, "graph": self._graph}, mode="w")

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None:
        before = self._graph
        self._graph = describe_graph(gm, ctx) if record.status == "applied" else before
        old = {n["name"] for n in before["nodes"]}
        new = {n["name"] for n in self._graph["nodes"]}
        result = record.result
        self._write({
            "kind": "pass", "index": self._pass_count(), "name": p.name, "text": record.pass_text,
            "options": {k: _jsonable(v) for k, v in p.options().items()},
            "status": record.status, "reason": record.reason, "seconds": record.seconds,
            "verify_seconds": record.verify_seconds, "matched": result.matched, "rewritten": result.rewritten,
            "notes": result.notes, "stats": {k: _jsonable(v) for k, v in result.stats.items()},
            "output_error": record.output_error,
            "totals_before": _totals(record.nodes_before, record.param_bytes_before, record.flops_before),
            "totals_after": _totals(record.nodes_after, record.param_bytes_after, record.flops_after),
            "added": [n["name"] for n in self._graph["nodes"] if n["name"] not in old],
            "removed": [n["name"] for n in before["nodes"] if n["name"] not in new],
            "replaced": [{"old": n["provenance"], "new": n["name"]} for n in self._graph["nodes"]
                         if n["name"] not in old and n["provenance"] in old],
            "graph": self._graph,
        })

    def _pass_count(self) -> int:
        self._passes = getattr(self, "_passes", -1) + 1
        return self._passes

    def _write(self, line: dict[str, Any], mode: str = "a") -> None:
        with self.path.open(mode) as file:
            file.write(json.dumps(line) + "\n")


def describe_graph(gm: fx.GraphModule, ctx: PassContext) -> dict[str, Any]:
    """The ``GRAPH`` record of ``gm``: its code and one ``NODE`` per node."""
    costs = ctx.analysis("costs").per_node
    names = gm.meta.get("slimgraph_symbols", {})
    return {"code": gm.code, "nodes": [_describe_node(n, costs.get(n), names) for n in gm.graph.nodes]}


def _describe_node(node: fx.Node, cost: Any, names: dict[str, str]) -> dict[str, Any]:
    value = node_value(node)
    tensor = value if isinstance(value, torch.Tensor) else None
    return {
        "name": node.name,
        "op": node.op,
        "target": str(node.target) if node.op != "call_function" else op_name(node),
        "kernel": op_name(node),
        "inputs": [a.name for a in node.all_input_nodes],
        "shape": [_number(symbolic_size(s, names)) for s in tensor.shape] if tensor is not None else None,
        "dtype": str(tensor.dtype) if tensor is not None else None,
        "module_path": module_path(node),
        "module_stack": [list(entry) for entry in module_stack(node)],
        "source": user_source_line(node),
        "flops": _number(cost.flops) if cost is not None else 0,
        "bytes": _number(cost.bytes) if cost is not None else 0,
        "provenance": node.meta.get("slimgraph_replaces"),
    }


def _totals(nodes: int, param_bytes: int, flops: Any) -> dict[str, Any]:
    return {"nodes": nodes, "param_bytes": param_bytes, "flops": _number(flops)}


def _number(value: Any) -> int | float | str:
    """Plain numbers stay numbers; symbolic sizes and costs (sympy) become their text."""
    if isinstance(value, torch.SymInt):  # int() would specialise it
        return str(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


@dataclass
class Trace:
    """A recorded run, read back: the ``run`` header and the ``pass`` lines in order."""

    header: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)

    def graph_before(self, index: int) -> dict[str, Any]:
        return self.passes[index - 1]["graph"] if index > 0 else self.header["graph"]

    def graph_after(self, index: int) -> dict[str, Any]:
        return self.passes[index]["graph"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.passes)


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by ``TraceRecorder``; a clear error for anything else."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("kind") != "run":
        raise ValueError(f"{path} is not a slimgraph trace: its first line is not a 'run' record")
    if lines[0].get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has trace format version {lines[0].get('version')}; "
                         f"this slimgraph reads version {FORMAT_VERSION}")
    return Trace(lines[0], [line for line in lines[1:] if line.get("kind") == "pass"])
