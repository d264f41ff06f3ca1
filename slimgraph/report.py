"""What a pipeline run did, as data and as a rich table."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slimgraph.passes.runner import PassRecord


@dataclass
class OptimizeReport:
    """Attached to an optimized module as ``.report``; ``print(report)`` shows the table."""

    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    capture_seconds: float = 0.0
    capture_strategy: str = ""
    pipeline_seconds: float = 0.0  # the whole pipeline: passes, verification and statistics
    extra_columns: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.records if r.status == "rolled back"]

    def table(self, title: str | None = None) -> Table:
        # Pass text and notes are user data: `formats=[int8, nf4]` must not read as rich markup.
        table = Table(title=title or f"slimgraph: {escape(self.pipeline)}", title_justify="left")
        for column, justify in [("pass", "left"), ("status", "left"), ("what changed", "left"),
                                ("nodes", "right"), ("param bytes", "right"), ("FLOPs", "right"),
                                ("time", "right"), ("output error", "right")]:
            table.add_column(column, justify=justify, overflow="fold")
        for name in self.extra_columns:
            table.add_column(name, justify="right")
        table.add_row("capture", self.capture_strategy, "", "", "", "", _seconds(self.capture_seconds), "",
                      *["" for _ in self.extra_columns])
        for index, r in enumerate(self.records):
            what = escape("; ".join(r.result.notes) or "-")
            if r.reason:
                what = f"[red]{escape(r.reason)}[/red]"
            table.add_row(
                escape(r.pass_text), _status(r.status), what,
                f"{r.nodes_before} → {r.nodes_after}",
                f"{format_bytes(r.param_bytes_before)} → {format_bytes(r.param_bytes_after)}",
                f"{format_count(r.flops_before)} → {format_count(r.flops_after)}",
                _seconds(r.seconds),
                "-" if r.output_error is None else f"{r.output_error:.2e}",
                *[values[index] for values in self.extra_columns.values()],
            )
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=160, force_terminal=False).print(self.table())
        return buffer.getvalue()


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: Any) -> str:
    if not isinstance(n, int):
        return str(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _status(status: str) -> str:
    return {"rolled back": "[red]rolled back[/red]", "applied": "[green]applied[/green]"}.get(status, status)
