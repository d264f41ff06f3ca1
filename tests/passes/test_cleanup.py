"""cleanup: dropout, identities, no-op views, asserts and dead code go; everything else stays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimgraph
from slimgraph import models
from slimgraph.ir.analyses import AnalysisManager
from slimgraph.ir.capture import capture
from slimgraph.passes.instruments import Recorder, default_instruments
from slimgraph.passes.manager import PassContext, Pipeline
from slimgraph.passes.runner import run_pipeline

aten = torch.ops.aten
EXACT = {"rtol": 0, "atol": 0}  # cleanup only removes nodes that return their input: bit-identical outputs


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def only_record(gm):
    (record,) = gm.report.records
    assert record.status == "applied", record.reason
    return record


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_removes_aten_dropout(mlp):
    model, inputs = mlp
    assert aten.dropout.default in targets(capture(model, inputs))
    gm = slimgraph.optimize(model, "cleanup", inputs)
    assert aten.dropout.default not in targets(gm)
    assert only_record(gm).result.stats["dropout"] == 2
    torch.testing.assert_close(gm(*inputs), model(*inputs), **EXACT)


def test_keeps_dropout_when_told_to(mlp):
    model, inputs = mlp
    gm = slimgraph.optimize(model, "cleanup(remove_dropout=false)", inputs)
    assert targets(gm).count(aten.dropout.default) == 2


def test_removes_functional_dropout_from_dynamo_graphs(dynamo, mlp):
    model, inputs = mlp
    recorder = Recorder()
    compiled = torch.compile(model, backend=slimgraph.backend("cleanup", then="eager", instruments=lambda: [
        *default_instruments(), recorder]))
    torch.testing.assert_close(compiled(*inputs), model(*inputs), **EXACT)
    (snapshot,) = recorder.snapshots
    assert snapshot.code_before.count("torch.nn.functional.dropout(") == 2
    assert "dropout" not in snapshot.code_after


def test_removes_dropout_and_identity_modules(traced):
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Identity(), nn.ReLU(), nn.Dropout1d(0.2)).eval()
    x = torch.randn(2, 8, 8)
    gm = traced(model, x)
    reference = model(x)
    ctx = PassContext(AnalysisManager(gm), (x,), reference_outputs=reference)
    (record,) = run_pipeline(Pipeline.parse("cleanup"), gm, ctx, default_instruments())
    assert record.status == "applied"
    assert (record.result.stats["dropout"], record.result.stats["identity"]) == (2, 1)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "3"]
    assert [name for name, _ in gm.named_children()] == ["0", "3"]
    torch.testing.assert_close(gm(x), reference, **EXACT)


class Views(nn.Module):
    """Four no-op views/conversions between real work, and views that do change the tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        x = x.view(4, 16).reshape(4, 16).expand(4, 16).to(torch.float32)
        y = self.fc(x).view(2, 32)
        return y.t() * 2, x.expand(2, 4, 16), x.to(torch.float64)


def test_removes_noop_views_and_keeps_real_ones():
    model, x = Views().eval(), torch.randn(4, 16)
    gm = slimgraph.optimize(model, "cleanup", (x,))
    assert only_record(gm).result.stats["no-op view"] == 4
    kept = targets(gm)
    assert kept.count(aten.view.default) == 1  # (2, 32)
    assert aten.t.default in kept
    assert kept.count(aten.expand.default) == 1  # (2, 4, 16)
    assert aten.to.dtype in kept  # float64
    assert aten.reshape.default not in kept
    torch.testing.assert_close(gm(x), model(x), **EXACT)


class MethodViews(nn.Module):
    def forward(self, x):
        same = x.view(4, 16).reshape(4, 16).contiguous().to(torch.float32).expand(4, 16).permute(0, 1)
        return same + 1, x.t().contiguous(), x.view(2, 32), x.float().detach()


def test_noop_views_as_call_method_and_layout_changing_contiguous(traced):
    model, x = MethodViews(), torch.randn(4, 16)
    gm = traced(model, x)
    ctx = PassContext(AnalysisManager(gm), (x,), reference_outputs=model(x))
    (record,) = run_pipeline(Pipeline.parse("cleanup"), gm, ctx, default_instruments())
    assert record.result.stats["no-op view"] == 8
    methods = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert sorted(methods) == ["contiguous", "t", "view"]  # x.t().contiguous() changes strides
    torch.testing.assert_close(gm(x), model(x), **EXACT)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_removes_export_asserts_from_hf_models(name):
    model = getattr(models, name)()
    kwargs = {"input_ids": torch.randint(0, 128, (2, 12))}
    with torch.no_grad():  # as optimize() captures
        asserts = targets(capture(model, (), kwargs)).count(aten._assert_tensor_metadata.default)
    assert asserts > 0
    gm = slimgraph.optimize(model, "cleanup", example_kwargs=kwargs)
    assert aten._assert_tensor_metadata.default not in targets(gm)
    assert only_record(gm).result.stats["assert"] == asserts
    torch.testing.assert_close(gm(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state, **EXACT)


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(16, 8)
        self.unused = nn.Linear(16, 64)

    def forward(self, x):
        self.unused(x).relu()
        return self.used(x)


def test_removes_dead_code_and_frees_the_parameters_it_read():
    model, x = DeadBranch().eval(), torch.randn(4, 16)
    gm = slimgraph.optimize(model, "cleanup", (x,))
    record = only_record(gm)
    assert record.result.stats["dead_nodes"] == 4  # linear, relu, and the weight and bias get_attrs
    assert record.result.stats["freed_tensors"] == 2
    assert "unused.weight" not in gm.state_dict() and "used.weight" in gm.state_dict()
    assert record.result.bytes_saved == (64 * 16 + 64) * 4
    torch.testing.assert_close(gm(x), model(x), **EXACT)


def test_keeps_exports_guards_fn(mlp):
    model, inputs = mlp
    gm = slimgraph.optimize(model, "cleanup", inputs)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["_guards_fn"]


class CloneThenInPlace(nn.Module):
    def __init__(self, inplace_module: bool):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True) if inplace_module else None

    def forward(self, x):
        y = self.fc(x)
        z = y.clone()
        z = self.act(z) if self.act is not None else z.relu_()
        return y + z


class CloneOnly(nn.Module):
    def forward(self, x):
        return x.clone() + 1


def test_keeps_clone_when_the_graph_has_in_place_ops():
    model, x = CloneThenInPlace(inplace_module=False).eval(), torch.randn(4, 8)
    gm = slimgraph.optimize(model, "cleanup", (x,))
    assert aten.clone.default in targets(gm)
    torch.testing.assert_close(gm(x), model(x), **EXACT)


def test_removes_clone_when_nothing_is_written_in_place():
    gm = slimgraph.optimize(CloneOnly(), "cleanup", (torch.randn(4, 8),))
    assert aten.clone.default not in targets(gm)


def test_keeps_clone_before_inplace_relu_module_in_dynamo_graphs(dynamo):
    # Dynamo records nn.ReLU(inplace=True) as F.relu(z, inplace=True): an in-place op too.
    model, x = CloneThenInPlace(inplace_module=True).eval(), torch.randn(4, 8)
    reference = model(x)
    be = slimgraph.backend("cleanup", then="eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(x), reference, **EXACT)
    assert be.reports[0].records[0].output_error == 0.0


def test_keeps_clone_before_inplace_relu_module_in_traced_graphs(traced):
    model, x = CloneThenInPlace(inplace_module=True).eval(), torch.randn(4, 8)
    reference = model(x)
    gm = traced(model, x)
    ctx = PassContext(AnalysisManager(gm), (x,), reference_outputs=reference)
    run_pipeline(Pipeline.parse("cleanup"), gm, ctx, default_instruments())
    assert "clone" in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(gm(x), reference, **EXACT)


def test_functional_dropout_keyword_spelling(traced):
    class KeywordDropout(nn.Module):
        def forward(self, x):
            return F.dropout(x, p=0.3, training=False) * 2

    model, x = KeywordDropout(), torch.randn(3, 5)
    gm = traced(model, x)
    ctx = PassContext(AnalysisManager(gm), (x,), reference_outputs=model(x))
    (record,) = run_pipeline(Pipeline.parse("cleanup"), gm, ctx, default_instruments())
    assert record.result.stats["dropout"] == 1
    torch.testing.assert_close(gm(x), model(x), **EXACT)


def test_dropout_called_with_training_true_is_kept():
    """Monte-Carlo dropout written as F.dropout(x, training=True) is part of the model's meaning."""

    class MonteCarlo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.dropout(self.fc(x), 0.5, training=True)

    optimized = slimgraph.optimize(MonteCarlo(), "cleanup", (torch.randn(2, 8),), strict=True)
    record = optimized.report.records[0]
    assert record.result.stats["kept_active_dropout"] == 1
    assert any(n.target is torch.ops.aten.dropout.default for n in optimized.graph.nodes)
    assert "kept 1 dropout called with training=True" in record.result.notes


def test_input_model_training_flags_restored_with_inplace():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)).train()
    model[0].eval()
    slimgraph.optimize(model, "cleanup", (torch.randn(2, 4),), inplace=True)
    assert model.training and not model[0].training and model[1].training


def test_a_returned_copy_is_kept_so_the_output_never_aliases_the_input():
    class ReturnsCopy(nn.Module):
        def forward(self, x):
            return x.clone(), torch.relu(x).clone()

    x = torch.randn(3, 4)
    gm = slimgraph.optimize(ReturnsCopy(), "cleanup", (x,), strict=True)
    first, _ = gm(x)
    first.add_(1.0)
    assert not torch.equal(first, x)  # writing the output left the input alone
