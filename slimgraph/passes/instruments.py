"""Instruments: hooks the runner calls around every pass.

- ``Timing``       wall time of each pass (excluding checks).
- ``Verification`` lint + shape re-propagation + numeric check; a failure rolls the pass back.
- ``Statistics``   nodes, parameter bytes and FLOPs before/after; fills ``bytes_saved``/``flops_saved``.
- ``Recorder``     before/after graph of every pass, for the dump tool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from slimgraph.errors import VerificationError
from slimgraph.ir.nodes import get_attr_value, has_value
from slimgraph.ir.verify import verify
from slimgraph.passes.manager import Pass, PassContext
from slimgraph.passes.runner import Instrument, PassRecord


class Timing(Instrument):
    """Put first in the list so ``record.seconds`` covers only the pass itself."""

    def before_pass(self, p, gm, ctx, record):
        self.start = time.perf_counter()

    def check(self, p, gm, ctx, record):
        record.seconds = time.perf_counter() - self.start
        return None

    def after_pass(self, p, gm, ctx, record):
        if not record.seconds:  # the pass raised, so no check ran: time up to the rollback
            record.seconds = time.perf_counter() - self.start


@dataclass
class Verification(Instrument):
    """Verify the graph after every pass that changed it.

    ``numeric`` compares outputs with ``ctx.reference_outputs`` on the example inputs
    (recording ``record.output_error``); ``ctx.tolerance`` turns that into a check.
    """

    shapes: bool = True
    numeric: bool = True

    def check(self, p, gm, ctx, record):
        start = time.perf_counter()
        try:
            if not record.result.changed:
                record.output_error = self.last_error
                return None
            reference = ctx.reference_outputs if self.numeric else None
            if self.shapes:
                _check_shapes(p, gm, ctx, trust_preserved=reference is not None)
            result = verify(gm, example_inputs=ctx.example_inputs, example_kwargs=ctx.example_kwargs,
                            reference=reference, tolerance=ctx.tolerance, check_shapes=False)
            record.output_error = result.output_error
        except VerificationError as error:
            return str(error)
        finally:
            record.verify_seconds = time.perf_counter() - start
        return None

    def after_pass(self, p, gm, ctx, record):
        if record.status == "rolled back":
            record.output_error = self.last_error
        else:
            self.last_error = record.output_error

    def before_pipeline(self, gm, ctx):
        self.last_error = 0.0 if ctx.reference_outputs is not None and self.numeric else None


def _check_shapes(p: Pass, gm: fx.GraphModule, ctx: PassContext, trust_preserved: bool) -> None:
    """Re-propagate shapes, unless the pass promised to keep them: then every node must have one.

    Full propagation is the expensive part of verification. A pass that declares
    ``preserves=("shapes",)`` sets ``meta["val"]`` on the nodes it creates; it is taken
    at its word only when the numeric check will run the real graph anyway.
    """
    if "shapes" not in p.preserves or not trust_preserved:
        ctx.analyses.recompute("shapes")
        return
    missing = [n.name for n in gm.graph.nodes
               if n.op in ("call_function", "call_method") and not has_value(n)]
    if missing:
        raise VerificationError(f"pass '{p.name}' declares it preserves shapes but left nodes "
                                f"without meta['val']: {missing[:5]}")


class Statistics(Instrument):
    """Measure graph size before and after each pass; the pass's saved bytes/FLOPs come from here."""

    def before_pipeline(self, gm, ctx):
        self.current = measure(gm, ctx)

    def before_pass(self, p, gm, ctx, record):
        record.nodes_before, record.param_bytes_before, record.flops_before = self.current

    def after_pass(self, p, gm, ctx, record):
        if record.status == "applied":
            self.current = measure(gm, ctx)
        record.nodes_after, record.param_bytes_after, record.flops_after = self.current
        record.result.bytes_saved = record.param_bytes_before - record.param_bytes_after
        if isinstance(record.flops_before, int) and isinstance(record.flops_after, int):
            record.result.flops_saved = record.flops_before - record.flops_after


def measure(gm: fx.GraphModule, ctx: PassContext) -> tuple[int, int, int | sympy.Expr]:
    """``(node count, bytes of tensors the graph uses, total FLOPs)``."""
    flops = ctx.analysis("costs").flops
    return len(gm.graph.nodes), parameter_bytes(gm), int(flops) if flops.is_number else flops


def parameter_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the distinct tensors reachable from ``get_attr`` and ``call_module`` nodes."""
    tensors: dict[tuple, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr_value(gm, node.target)
            found = [value] if isinstance(value, torch.Tensor) else []
        elif node.op == "call_module":
            found = list(get_attr_value(gm, node.target).state_dict(keep_vars=True).values())
        else:
            continue
        for tensor in found:
            tensors[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)] = tensor
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class PassSnapshot:
    pass_text: str
    status: str
    code_before: str
    code_after: str
    nodes_before: list[str]
    nodes_after: list[str]

    @property
    def added(self) -> list[str]:
        before = set(self.nodes_before)
        return [n for n in self.nodes_after if n not in before]

    @property
    def removed(self) -> list[str]:
        after = set(self.nodes_after)
        return [n for n in self.nodes_before if n not in after]


@dataclass
class Recorder(Instrument):
    """Keep the generated code and node names before/after every pass (the dump tool's hook)."""

    snapshots: list[PassSnapshot] = field(default_factory=list)

    def before_pass(self, p: Pass, gm, ctx, record: PassRecord):
        self._before = (gm.code, [n.name for n in gm.graph.nodes])

    def after_pass(self, p: Pass, gm, ctx, record: PassRecord):
        code, nodes = self._before
        self.snapshots.append(PassSnapshot(record.pass_text, record.status, code, gm.code,
                                           nodes, [n.name for n in gm.graph.nodes]))


def default_instruments(verify_numeric: bool = True) -> list[Instrument]:
    return [Timing(), Verification(numeric=verify_numeric), Statistics()]
