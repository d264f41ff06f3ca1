"""The Graphviz view of a trace: one DOT file (and SVG) per pass, the graph after that pass.

Nodes sit in nested clusters, one per module path (``encoder`` ⊃ ``encoder.0``),
labelled with the module's class. What the pass changed is coloured: added nodes
green, replacements blue (their label names the node they replace), and the
nodes it removed are drawn from the graph before, dashed and grey.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimgraph.tools.dump.recorder import Trace

GRAPHVIZ_MISSING = ("Graphviz `dot` is not on PATH, so no SVG was rendered (the .dot files are written); "
                    "install Graphviz: apt-get install graphviz (macOS: brew install graphviz), "
                    "or ask for the .dot files only")

_STYLES = {
    "added": 'style="rounded,filled", fillcolor="palegreen", color="darkgreen"',
    "replaced": 'style="rounded,filled", fillcolor="lightblue", color="blue"',
    "removed": 'style="rounded,dashed", color="gray60", fontcolor="gray50"',
    "kept": 'style="rounded"',
}


class GraphvizMissingError(RuntimeError):
    """SVG rendering was asked for but Graphviz is not installed; ``written`` has the .dot files."""

    def __init__(self, message: str, written: list[Path]):
        super().__init__(message)
        self.written = written


def write_dot(trace: Trace, out_dir: str | Path, *, svg: bool = True) -> list[Path]:
    """Write ``NN_pass.dot`` per pass into ``out_dir`` (and ``NN_pass.svg`` with ``svg=True``).

    Returns the paths written. Example: for ``cleanup, fold_constants`` it writes
    ``00_cleanup.dot``, ``00_cleanup.svg``, ``01_fold_constants.dot``, ``01_fold_constants.svg``.
    With ``svg=True`` and no Graphviz installed the .dot files are still written,
    then ``GraphvizMissingError`` says how to install it and carries their paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dot_files = []
    for index, record in enumerate(trace.passes):
        path = out / f"{index:02d}_{_file_name(record['text'])}.dot"
        path.write_text(pass_to_dot(trace, index))
        dot_files.append(path)
    if not svg:
        return dot_files
    if shutil.which("dot") is None:
        raise GraphvizMissingError(f"{GRAPHVIZ_MISSING} ({out})", dot_files)
    written = []
    for path in dot_files:
        written += [path, _render_svg(path)]
    return written


def pass_to_dot(trace: Trace, index: int) -> str:
    """The DOT text for pass ``index``: its graph after, plus the nodes it removed."""
    record = trace.passes[index]
    before, after = trace.graph_before(index), trace.graph_after(index)
    replaced = {r["new"]: r["old"] for r in record["replaced"]}
    added = set(record["added"])
    removed_names = set(record["removed"])
    removed = [n for n in before["nodes"] if n["name"] in removed_names]
    nodes = after["nodes"] + removed
    kinds = {n["name"]: _kind(n["name"], added, replaced, removed_names) for n in nodes}
    title = f"[{index}] {record['text']}: {record['status']}"
    lines = ["digraph slimgraph {", f"  label={_quote(title)};", '  labelloc="t";', "  rankdir=TB;",
             '  node [shape=box, fontname="Helvetica", fontsize=10];', '  edge [color="gray30"];']
    lines += _cluster_lines(_module_tree(nodes), kinds, replaced, _module_types(nodes), depth=1)
    lines += _edge_lines(nodes, kinds)
    lines += [f'  {_quote(old)} -> {_quote(new)} [style="dotted", color="blue", constraint=false];'
              for new, old in replaced.items() if old in kinds]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _kind(name: str, added: set[str], replaced: dict[str, str], removed: set[str]) -> str:
    if name in replaced:
        return "replaced"
    if name in added:
        return "added"
    return "removed" if name in removed else "kept"


@dataclass
class _Cluster:
    """Nodes of one module path and the clusters of its child modules."""

    path: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    children: dict[str, _Cluster] = field(default_factory=dict)


def _module_tree(nodes: list[dict[str, Any]]) -> _Cluster:
    root = _Cluster("")
    for node in nodes:
        cluster = root
        parts = node["module_path"].split(".") if node["module_path"] else []
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            cluster = cluster.children.setdefault(path, _Cluster(path))
        cluster.nodes.append(node)
    return root


def _module_types(nodes: list[dict[str, Any]]) -> dict[str, str]:
    return {path: kind.rsplit(".", 1)[-1] for n in nodes for path, kind in n["module_stack"] if kind}


def _cluster_lines(cluster: _Cluster, kinds: dict[str, str], replaced: dict[str, str],
                   types: dict[str, str], depth: int) -> Iterator[str]:
    indent = "  " * depth
    for node in cluster.nodes:
        yield f"{indent}{_quote(node['name'])} [label={_quote(_label(node, replaced))}, " \
              f"tooltip={_quote(node['source'] or node['name'])}, {_STYLES[kinds[node['name']]]}];"
    for child in cluster.children.values():
        label = child.path + (f" ({types[child.path]})" if child.path in types else "")
        yield f"{indent}subgraph {_quote('cluster_' + child.path)} {{"
        yield f"{indent}  label={_quote(label)}; style=\"rounded\"; color=\"gray70\"; fontsize=9;"
        yield from _cluster_lines(child, kinds, replaced, types, depth + 1)
        yield f"{indent}}}"


def _label(node: dict[str, Any], replaced: dict[str, str]) -> str:
    lines = [node["name"], node["kernel"]]
    if node["shape"] is not None:
        lines.append(f"[{', '.join(str(s) for s in node['shape'])}] {node['dtype'].removeprefix('torch.')}")
    if node["name"] in replaced:
        lines.append(f"replaces {replaced[node['name']]}")
    return "\n".join(lines)


def _edge_lines(nodes: list[dict[str, Any]], kinds: dict[str, str]) -> Iterator[str]:
    for node in nodes:
        style = ' [style="dashed", color="gray60"]' if kinds[node["name"]] == "removed" else ""
        for source in node["inputs"]:
            if source in kinds:
                yield f"  {_quote(source)} -> {_quote(node['name'])}{style};"


def _quote(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as centred line breaks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _file_name(pass_text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", pass_text).strip("_")[:60] or "pass"


def _render_svg(dot_file: Path) -> Path:
    svg_file = dot_file.with_suffix(".svg")
    result = subprocess.run(["dot", "-Tsvg", str(dot_file), "-o", str(svg_file)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"Graphviz failed on {dot_file}: {result.stderr.strip()}")
    return svg_file
