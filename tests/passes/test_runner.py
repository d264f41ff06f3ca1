"""run_pipeline: rollback, strict mode, in-place-write detection, and the instruments."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from toy_models import TransposedWeight

from slimgraph.errors import PassError
from slimgraph.ir.analyses import AnalysisManager
from slimgraph.ir.capture import capture
from slimgraph.ir.graph_utils import eliminate_dead_code
from slimgraph.ir.nodes import get_attr_value
from slimgraph.ir.verify import relative_error
from slimgraph.passes.instruments import (
    Recorder,
    Statistics,
    Timing,
    Verification,
    default_instruments,
)
from slimgraph.passes.manager import Pass, PassContext, PassResult, Pipeline
from slimgraph.passes.runner import PassRolledBackWarning, run_pipeline

# These tests roll passes back on purpose; the warning itself is checked in one test below.
pytestmark = pytest.mark.filterwarnings("ignore::slimgraph.PassRolledBackWarning")

aten = torch.ops.aten


def run(model, inputs, pipeline, *, tolerance=None, instruments=None, strict=False):
    """Capture ``model`` and run ``pipeline`` on it as ``optimize`` does; return ``(gm, records)``."""
    with torch.no_grad():
        gm = capture(model, inputs)
        ctx = PassContext(AnalysisManager(gm), inputs, tolerance=tolerance, reference_outputs=model(*inputs))
        chosen = default_instruments() if instruments is None else instruments
        return gm, run_pipeline(Pipeline.coerce(pipeline), gm, ctx, chosen, strict=strict)


def get_attr_node(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


# ---- test-only passes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RaisesMidway(Pass):
    """Rewrites the graph and the module tree, then fails."""

    name: ClassVar[str] = "test_runner_raises"

    def run(self, gm, ctx):
        next(n for n in gm.graph.nodes if n.target is aten.relu.default).target = aten.sigmoid.default
        delattr(gm.get_submodule("net.0"), "bias")
        gm.register_buffer("scratch", torch.zeros(3))
        raise RuntimeError("boom")


@dataclass(frozen=True)
class WrongShape(Pass):
    """Points the first linear at a weight of the wrong shape."""

    name: ClassVar[str] = "test_runner_wrong_shape"

    def run(self, gm, ctx):
        gm.register_buffer("wrong", torch.randn(5, 7))
        get_attr_node(gm, "net.0.weight").target = "wrong"
        return PassResult(matched=1, rewritten=1)


@dataclass(frozen=True)
class ScaleWeight(Pass):
    """Replaces the first linear's weight by a scaled copy and frees the original."""

    name: ClassVar[str] = "test_runner_scale_weight"
    factor: float = 1.01

    def run(self, gm, ctx):
        node = get_attr_node(gm, "net.0.weight")
        gm.register_buffer("scaled_weight", get_attr_value(gm, node.target) * self.factor)
        node.target = "scaled_weight"
        eliminate_dead_code(gm)
        return PassResult(matched=1, rewritten=1)


@dataclass(frozen=True)
class WritesInPlace(Pass):
    name: ClassVar[str] = "test_runner_writes_in_place"

    def run(self, gm, ctx):
        with torch.no_grad():
            get_attr_value(gm, "net.0.weight").add_(0.0)
        return PassResult()


@dataclass(frozen=True)
class Touch(Pass):
    """Claims to change the graph (or not) without touching it."""

    name: ClassVar[str] = "test_runner_touch"
    preserves: ClassVar[tuple[str, ...]] = ("shapes",)
    change: bool = True

    def run(self, gm, ctx):
        return PassResult(rewritten=int(self.change))


@dataclass(frozen=True)
class TouchPreservingNothing(Pass):
    name: ClassVar[str] = "test_runner_touch_nothing_preserved"

    def run(self, gm, ctx):
        return PassResult(rewritten=1)


@pytest.fixture
def test_passes(register):
    for cls in (RaisesMidway, WrongShape, ScaleWeight, WritesInPlace, Touch, TouchPreservingNothing):
        register(cls)


def scaled_error(model, x, factor=1.01):
    """The relative output error of ``model`` with its first weight scaled, computed without slimgraph."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.net[0].weight.mul_(factor)
        return relative_error(scaled(x), model(x))


# ---- rollback ------------------------------------------------------------------------------------

def test_pass_that_raises_is_rolled_back_with_its_reason(test_passes, mlp):
    model, inputs = mlp
    gm = capture(model, inputs)
    code, bias = gm.code, gm.get_submodule("net.0").bias
    with torch.no_grad():
        before = gm(*inputs)
        ctx = PassContext(AnalysisManager(gm), inputs, reference_outputs=before)
        with pytest.warns(PassRolledBackWarning, match="pass 'test_runner_raises' was rolled back: RuntimeError: boom"):
            (record,) = run_pipeline(Pipeline.parse("test_runner_raises"), gm, ctx, default_instruments())
        after = gm(*inputs)
    assert record.status == "rolled back"
    assert record.reason == "RuntimeError: boom"
    assert record.seconds > 0
    assert gm.code == code
    assert gm.get_submodule("net.0").bias is bias
    assert not hasattr(gm, "scratch")
    assert torch.equal(after, before)


def test_strict_mode_propagates_the_failure_as_pass_error(test_passes, mlp):
    with pytest.raises(PassError, match="pass 'test_runner_raises': boom") as error:
        run(*mlp, "test_runner_raises", strict=True)
    assert error.value.pass_name == "test_runner_raises"
    assert isinstance(error.value.__cause__, RuntimeError)


def test_pass_that_breaks_shapes_is_caught_by_verification(test_passes, mlp):
    model, inputs = mlp
    gm, (record,) = run(model, inputs, "test_runner_wrong_shape")
    assert record.status == "rolled back"
    assert record.reason.startswith("shape propagation failed at node 'linear'")
    assert get_attr_node(gm, "net.0.weight") is not None
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


def test_pass_exceeding_tolerance_is_rolled_back_with_the_error(test_passes, mlp):
    model, inputs = mlp
    expected = scaled_error(model, *inputs)
    assert 1e-4 < expected < 1e-1
    gm, (record,) = run(model, inputs, "test_runner_scale_weight", tolerance=1e-4)
    assert record.status == "rolled back"
    assert re.fullmatch(rf"outputs differ from the reference: relative error {expected:.3g} > tolerance 0.0001",
                        record.reason)
    assert record.output_error == 0.0
    # The pass freed `net.0.weight` from a submodule: rollback must bring it back.
    assert torch.equal(gm.get_submodule("net.0").weight, model.net[0].weight)
    assert torch.equal(gm(*inputs), model(*inputs))


def test_pass_within_tolerance_is_kept(test_passes, mlp):
    model, inputs = mlp
    gm, (record,) = run(model, inputs, "test_runner_scale_weight", tolerance=0.5)
    assert record.status == "applied"
    assert record.output_error == pytest.approx(scaled_error(model, *inputs), rel=1e-6)


def test_without_tolerance_the_pass_is_kept_and_its_error_recorded(test_passes, mlp):
    model, inputs = mlp
    gm, records = run(model, inputs, "test_runner_scale_weight, fold_constants")
    expected = scaled_error(model, *inputs)
    assert [r.status for r in records] == ["applied", "no change"]
    assert records[0].output_error == pytest.approx(expected, rel=1e-6)
    assert records[1].output_error == records[0].output_error  # carried through a pass that changed nothing
    assert not hasattr(gm.get_submodule("net.0"), "weight")
    assert relative_error(gm(*inputs), model(*inputs)) == pytest.approx(expected, rel=1e-6)


def test_pass_writing_a_weight_in_place_is_rolled_back(test_passes, mlp):
    _, (record,) = run(*mlp, "test_runner_writes_in_place")
    assert record.status == "rolled back"
    assert record.reason.startswith(
        "PassError: pass 'test_runner_writes_in_place': wrote tensors in place: ['net.0.weight']")


def test_pass_writing_in_place_fails_in_strict_mode(test_passes, mlp):
    with pytest.raises(PassError, match=r"wrote tensors in place: \['net.0.weight'\]"):
        run(*mlp, "test_runner_writes_in_place", strict=True)


# ---- instruments ----------------------------------------------------------------------------------

class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(16, 8)
        self.unused = nn.Linear(16, 64)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        self.unused(x)
        return self.drop(self.used(x)) + torch.ones(8) * 2


def test_statistics_measure_bytes_and_flops_saved():
    model, x = WithUnusedLayer().eval(), torch.randn(4, 16)
    _, (cleanup, fold) = run(model, (x,), "cleanup, fold_constants")
    unused_bytes = sum(p.numel() * p.element_size() for p in model.unused.parameters())
    assert cleanup.result.bytes_saved == unused_bytes
    assert cleanup.param_bytes_before - cleanup.param_bytes_after == unused_bytes
    assert cleanup.result.flops_saved == cleanup.flops_before - cleanup.flops_after > 4 * 16 * 64
    assert cleanup.nodes_after < cleanup.nodes_before
    assert fold.status == "applied"
    assert fold.flops_before == cleanup.flops_after
    assert fold.result.flops_saved == fold.flops_before - fold.flops_after > 0  # `ones * 2` now a buffer


def test_statistics_of_a_rolled_back_pass_show_no_change(test_passes, mlp):
    _, (record,) = run(*mlp, "test_runner_wrong_shape")
    assert (record.nodes_after, record.param_bytes_after, record.flops_after) == (
        record.nodes_before, record.param_bytes_before, record.flops_before)
    assert record.result.bytes_saved == record.result.flops_saved == 0


def test_timing_fills_seconds_for_every_pass(mlp):
    _, records = run(*mlp, "cleanup, fold_constants", instruments=[Timing(), Verification(), Statistics()])
    assert all(r.seconds > 0 for r in records)
    assert records[0].verify_seconds > 0  # cleanup changed the graph, so it was verified


def test_without_timing_seconds_stay_zero(mlp):
    _, records = run(*mlp, "cleanup", instruments=[Verification()])
    assert records[0].seconds == 0.0


def test_recorder_lists_added_and_removed_nodes(mlp):
    recorder = Recorder()
    run(*mlp, "cleanup, fold_constants", instruments=[*default_instruments(), recorder])
    cleanup, fold = recorder.snapshots
    assert (cleanup.pass_text, cleanup.status) == ("cleanup", "applied")
    assert cleanup.removed == ["dropout", "dropout_1"]
    assert cleanup.added == []
    assert "aten.dropout" in cleanup.code_before and "aten.dropout" not in cleanup.code_after
    assert (fold.status, fold.added, fold.removed) == ("no change", [], [])
    assert fold.code_before == fold.code_after


def test_recorder_lists_the_folded_buffer_as_added():
    recorder = Recorder()
    run(TransposedWeight(), (torch.randn(4, 16),), "fold_constants", instruments=[recorder])
    (snapshot,) = recorder.snapshots
    assert snapshot.added == ["_folded_0"]
    assert sorted(snapshot.removed) == ["t", "w"]


def test_analyses_are_invalidated_after_a_change_unless_preserved(test_passes, mlp):
    model, inputs = mlp
    gm = capture(model, inputs)
    ctx = PassContext(AnalysisManager(gm), inputs)

    def cached_after(pipeline):
        ctx.analysis("shapes"), ctx.analysis("dataflow")
        run_pipeline(Pipeline.parse(pipeline), gm, ctx, [])
        return ctx.analyses.is_cached("shapes"), ctx.analyses.is_cached("dataflow")

    assert cached_after("test_runner_touch(change=false)") == (True, True)
    assert cached_after("test_runner_touch") == (True, False)
    assert cached_after("test_runner_touch_nothing_preserved") == (False, False)
    assert cached_after("test_runner_raises") == (False, False)


def test_verification_without_numeric_check_records_no_error(mlp):
    _, (record,) = run(*mlp, "cleanup", instruments=[Verification(numeric=False)])
    assert record.status == "applied"
    assert record.output_error is None
