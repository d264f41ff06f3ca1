"""Running a pipeline: snapshot, run, check, roll back, record.

For every pass the runner takes a cheap snapshot (graph copy plus the module's
attribute tables: no tensor is copied), runs the pass, asks each instrument to
check the result, and restores the snapshot when the pass raised or a check
failed. Passes must not write tensors in place; the runner enforces it with
tensor version counters, which is what makes the snapshot cheap and the input
model safe.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from slimgraph.errors import PassError
from slimgraph.passes.manager import Pass, PassContext, PassResult, Pipeline


@dataclass
class PassRecord:
    """One line of the report: what a pass did and what it cost."""

    pass_text: str
    status: str = "pending"  # "applied" | "no change" | "rolled back"
    result: PassResult = field(default_factory=PassResult)
    reason: str = ""
    seconds: float = 0.0
    verify_seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    param_bytes_before: int = 0
    param_bytes_after: int = 0
    flops_before: Any = None
    flops_after: Any = None
    output_error: float | None = None


class PassRolledBackWarning(UserWarning):
    """A pass failed or broke the graph and was undone; the report has the details."""


class Instrument:
    """Hooks around every pass. ``check`` returns a problem (rolls the pass back) or ``None``."""

    def before_pipeline(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None: ...

    def check(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> str | None:
        return None

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None: ...


def run_pipeline(
    pipeline: Pipeline,
    gm: fx.GraphModule,
    ctx: PassContext,
    instruments: Sequence[Instrument],
    *,
    strict: bool = False,
) -> list[PassRecord]:
    """Run ``pipeline`` on ``gm`` in place; return one ``PassRecord`` per pass.

    With ``strict=True`` an exception inside a pass propagates (as ``PassError``)
    instead of being rolled back and reported.
    """
    for instrument in instruments:
        instrument.before_pipeline(gm, ctx)
    records = []
    for p in pipeline:
        record = PassRecord(str(p))
        snapshot = _Snapshot(gm)
        for instrument in instruments:
            instrument.before_pass(p, gm, ctx, record)
        problem = _run_and_check(p, gm, ctx, record, instruments, snapshot, strict)
        if problem:
            snapshot.restore(gm)
            ctx.analyses.graph_changed()
            record.status, record.reason = "rolled back", problem
            warnings.warn(f"slimgraph: pass '{p}' was rolled back: {problem}", PassRolledBackWarning,
                          stacklevel=2)
        else:
            record.status = "applied" if record.result.changed else "no change"
        for instrument in instruments:
            instrument.after_pass(p, gm, ctx, record)
        records.append(record)
    return records


def _run_and_check(p, gm, ctx, record, instruments, snapshot, strict) -> str | None:
    try:
        record.result = p.run(gm, ctx)
        snapshot.check_no_tensor_written(p)
        if record.result.changed:
            gm.recompile()
            ctx.analyses.graph_changed(p.preserves)
        return next((problem for i in instruments if (problem := i.check(p, gm, ctx, record))), None)
    except Exception as error:
        if strict:
            raise error if isinstance(error, PassError) else PassError(p.name, str(error)) from error
        return f"{type(error).__name__}: {error}"


class _Snapshot:
    """Graph copy + shallow copies of every module's attribute tables; no tensor data is copied.

    Every module, not only the root: passes delete parameters and submodules anywhere
    in the tree (``eliminate_dead_code`` frees ``encoder.layer.0.weight``).
    """

    def __init__(self, gm: fx.GraphModule):
        with warnings.catch_warnings():  # torch's pytree codegen warns about its own deprecated LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            self.graph = copy.deepcopy(gm.graph)
        self.modules = [(module, dict(vars(module)), {name: dict(vars(module)[name]) for name in _TABLES})
                        for module in gm.modules()]
        # Inference tensors keep no version; passes run outside inference mode, where torch
        # itself refuses to write them.
        self.versions = [(name, tensor, tensor._version) for name, tensor in _tensors(gm) if not tensor.is_inference()]

    def check_no_tensor_written(self, p: Pass) -> None:
        written = [name for name, tensor, version in self.versions if tensor._version != version]
        if written:
            raise PassError(p.name, f"wrote tensors in place: {written[:5]}; passes must create new "
                            "tensors (the originals may be the user's model weights)")

    def restore(self, gm: fx.GraphModule) -> None:
        for module, attributes, tables in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, table in tables.items():
                module.__dict__[name].clear()
                module.__dict__[name].update(table)
        gm.graph = self.graph


_TABLES = ("_parameters", "_buffers", "_modules")


def _tensors(gm: fx.GraphModule):
    seen = set()
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            yield name, value

