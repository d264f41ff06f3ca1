"""The text view of a trace: per pass, what it did, the nodes it changed, and the code diff.

Plain text, no colour and no terminal-width wrapping, so it reads the same in a
terminal, a file, a CI log and a golden test.
"""

from __future__ import annotations

import difflib
from typing import Any

from slimgraph.report import format_bytes, format_count
from slimgraph.tools.dump.recorder import Trace

_COLUMNS = ("change", "node", "op / kernel", "shape", "dtype", "module", "FLOPs", "source")


def render_text(trace: Trace, *, only_changed: bool = False, timings: bool = True) -> str:
    """The whole trace as text: a run header, then one section per pass.

    ``only_changed`` keeps only the passes whose status is ``applied``.
    ``timings=False`` leaves out every wall-clock time, so the text of a
    deterministic run is itself deterministic (what the golden tests compare).

    Example section::

        [0] cleanup: applied in 1.2 ms (verify 4.2 ms)
            notes: removed 1 dropout
            totals: nodes 15 → 14, param bytes 864 B → 864 B, FLOPs 1268 → 1220, output error 0
            changed nodes:
              change   node     op / kernel          shape   dtype          module     FLOPs  source
              removed  dropout  aten.dropout.default  [3, 16]  torch.float32  encoder.1  48  model.py:13 `...`
            code diff:
              --- before cleanup
              +++ after cleanup
              ...
    """
    sections = [_run_header(trace.header, timings)]
    for index, record in enumerate(trace.passes):
        if only_changed and record["status"] != "applied":
            continue
        sections.append(_pass_section(trace, index, record, timings))
    return "\n\n".join(sections) + "\n"


def _run_header(header: dict[str, Any], timings: bool) -> str:
    capture = header.get("capture", {})
    captured = f"captured with {capture.get('strategy') or 'unknown strategy'}"
    if timings and "seconds" in capture:
        captured += f" in {capture['seconds']:.2f} s"
    nodes = len(header["graph"]["nodes"])
    return (f"slimgraph dump: {header['model']} ({header['entry']}, graph {header['graph_index']})\n"
            f"pipeline: {header['pipeline']}\n"
            f"{captured}: {nodes} nodes")


def _pass_section(trace: Trace, index: int, record: dict[str, Any], timings: bool) -> str:
    lines = [_pass_title(record, timings)]
    if record["notes"]:
        lines.append(f"    notes: {'; '.join(record['notes'])}")
    lines.append(f"    totals: {_totals(record)}")
    if record["status"] != "applied":
        return "\n".join(lines)
    before, after = trace.graph_before(index), trace.graph_after(index)
    rows = _changed_rows(record, before, after)
    if rows:
        lines.append("    changed nodes:")
        lines.extend("      " + line for line in _table(rows))
    diff = _code_diff(record["text"], before["code"], after["code"])
    if diff:
        lines.append("    code diff:")
        lines.extend("      " + line if line else "" for line in diff)
    return "\n".join(lines)


def _pass_title(record: dict[str, Any], timings: bool) -> str:
    title = f"[{record['index']}] {record['text']}: {record['status']}"
    if record["reason"]:
        title += f" ({record['reason']})"
    if timings:
        title += f" in {_ms(record['seconds'])} (verify {_ms(record['verify_seconds'])})"
    return title


def _totals(record: dict[str, Any]) -> str:
    before, after = record["totals_before"], record["totals_after"]
    error = record["output_error"]
    return (f"nodes {before['nodes']} → {after['nodes']}, "
            f"param bytes {format_bytes(before['param_bytes'])} → {format_bytes(after['param_bytes'])}, "
            f"FLOPs {format_count(before['flops'])} → {format_count(after['flops'])}, "
            f"output error {'not checked' if error is None else _error(error)}")


def _changed_rows(record: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per replacement, then per other added node, then per other removed node."""
    old_nodes = {n["name"]: n for n in before["nodes"]}
    new_nodes = {n["name"]: n for n in after["nodes"]}
    replaced_old = {r["old"] for r in record["replaced"]}
    replaced_new = {r["new"] for r in record["replaced"]}
    rows = [_row("replaced", f"{r['old']} → {r['new']}", new_nodes[r["new"]]) for r in record["replaced"]]
    rows += [_row("added", name, new_nodes[name]) for name in record["added"] if name not in replaced_new]
    rows += [_row("removed", name, old_nodes[name]) for name in record["removed"] if name not in replaced_old]
    return rows


def _row(change: str, label: str, node: dict[str, Any]) -> tuple[str, ...]:
    shape = "-" if node["shape"] is None else "[" + ", ".join(str(s) for s in node["shape"]) + "]"
    return (change, label, node["kernel"], shape, node["dtype"] or "-", node["module_path"] or "-",
            format_count(node["flops"]), node["source"] or "-")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [_COLUMNS, *rows]]


def _code_diff(pass_text: str, before: str, after: str) -> list[str]:
    return list(difflib.unified_diff(before.strip().splitlines(), after.strip().splitlines(),
                                     f"before {pass_text}", f"after {pass_text}", lineterm=""))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _error(error: float) -> str:
    return "0" if error == 0 else f"{error:.2e}"
