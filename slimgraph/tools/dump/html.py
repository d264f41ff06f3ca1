"""Render a trace as one self-contained HTML page: a pass timeline, the module tree,
each pass's graph before and after side by side, and a panel for the clicked node.

The page needs no network: the CSS and JavaScript (``assets/``) are inlined and the
trace is embedded as JSON. Example::

    trace = load_trace("dump/trace.jsonl")
    write_html(trace, "dump/dump.html")   # open it in any browser

The trace stores the whole graph after every pass, and most nodes are unchanged by a
pass, so the page stores each distinct node record once (``nodes``) and every graph as
a list of indices into it (``graphs``): a 48-layer GPT-2 page stays a few MB.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from slimgraph.tools.dump.recorder import Trace

_ASSETS = resources.files("slimgraph.tools.dump") / "assets"


def render_html(trace: Trace) -> str:
    """The page for ``trace`` as a string; ``write_html`` writes it to a file.

    Example::

        page = render_html(load_trace("dump/trace.jsonl"))
        assert page.startswith("<!DOCTYPE html>")
    """
    title = f"slimgraph dump: {trace.header.get('model', '')} ({trace.header.get('pipeline', '')})"
    return _PAGE.format(
        title=html.escape(title),
        css=(_ASSETS / "dump.css").read_text(),
        data=embed_json(page_data(trace)),
        js=(_ASSETS / "dump.js").read_text(),
    )


def write_html(trace: Trace, path: str | Path) -> Path:
    """Write the page for ``trace`` to ``path`` (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(trace), encoding="utf-8")
    return path


def page_data(trace: Trace) -> dict[str, Any]:
    """The JSON the page reads: the header and passes without their graphs, the distinct
    node records, and every graph (captured, then after each pass) as indices into them."""
    table: list[dict[str, Any]] = []
    index: dict[str, int] = {}

    def intern(node: dict[str, Any]) -> int:
        key = json.dumps(node, sort_keys=True)
        if key not in index:
            index[key] = len(table)
            table.append(node)
        return index[key]

    graphs = [trace.header["graph"]] + [p["graph"] for p in trace.passes]
    return {
        "header": {k: v for k, v in trace.header.items() if k != "graph"},
        "passes": [{k: v for k, v in p.items() if k != "graph"} for p in trace.passes],
        "nodes": table,
        "graphs": [[intern(node) for node in graph["nodes"]] for graph in graphs],
    }


def embed_json(value: Any) -> str:
    """``value`` as JSON that is safe inside ``<script>``: ``<``, ``>`` and ``&`` are
    written as ``\\u`` escapes, so a ``</script>`` in a source line cannot end the tag."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<header>
  <h1>slimgraph dump</h1>
  <div class="meta" id="meta"></div>
  <label><input type="checkbox" id="changes-only"> changes only</label>
  <input type="search" id="search" placeholder="filter by node or module name" autocomplete="off">
</header>
<aside>
  <h2>Passes</h2>
  <ol id="timeline"></ol>
  <h2>Modules (nodes before &rarr; after)</h2>
  <div class="tree" id="tree"></div>
</aside>
<main>
  <div id="totals"></div>
  <div class="legend"><span class="swatch-added">added</span><span class="swatch-removed">removed</span><span class="swatch-replaced">replaced (provenance)</span></div>
  <div id="graphs">
    <section class="column" id="before"><h2>Before <span class="count"></span></h2><div class="body"></div></section>
    <section class="column" id="after"><h2>After <span class="count"></span></h2><div class="body"></div></section>
  </div>
</main>
<section id="node-panel"><h2>Node</h2><p class="empty">Click a node to see its details.</p></section>
<script type="application/json" id="trace-data">{data}</script>
<script>
{js}
</script>
</body>
</html>
"""
