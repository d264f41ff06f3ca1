"""The torch.compile backend: entry point, freezing, graph breaks, eager and Inductor hand-off."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backend import freeze_parameters

CLOSE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_and_run(model, *args, passes="cleanup, fold_constants", **kwargs):
    be = slimgraph.backend(passes, then="eager")
    with torch.no_grad():
        return torch.compile(model, backend=be)(*args, **kwargs), be


def assert_no_rollback(be):
    for report in be.reports:
        assert not report.rolled_back, [(r.pass_text, r.reason) for r in report.rolled_back]


def freeze_inside_dynamo(model, *args):
    """Run ``freeze_parameters`` where the backend does: on the graph Dynamo hands over.

    Returns ``(placeholders of Dynamo's graph before, the same after, example inputs, frozen, kept)``.
    """
    grabbed = []

    def freeze(gm, example_inputs):
        before = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        frozen, kept = freeze_parameters(gm, example_inputs)
        after = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        grabbed.append((before, after, list(example_inputs), frozen, kept))
        return gm.forward

    torch.compile(model, backend=freeze)(*args)
    (result,) = grabbed
    return result


# ---- the registered "slimgraph" backend --------------------------------------------------------------

ENTRY_POINT_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    assert "slimgraph" not in sys.modules
    out = torch.compile(model, backend="slimgraph"{options})(x)
    assert "slimgraph.backend" in sys.modules, "the backend was not loaded from the entry point"
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def run_without_importing_slimgraph(options: str) -> None:
    result = subprocess.run([sys.executable, "-c", ENTRY_POINT_SCRIPT.format(options=options)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.slow
def test_entry_point_resolves_the_backend_by_name_with_inductor():
    run_without_importing_slimgraph(options="")


@pytest.mark.slow
def test_entry_point_passes_compile_options_through():
    run_without_importing_slimgraph(options=', options={"then": "eager", "passes": "cleanup"}')


def test_compile_options_reach_the_backend(mlp):
    model, inputs = mlp
    compiled = torch.compile(model, backend="slimgraph", options={"then": "eager", "passes": "cleanup"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), **CLOSE)


def test_then_must_be_inductor_or_eager():
    with pytest.raises(ValueError, match="then='tvm': choose 'inductor'"):
        slimgraph.backend(then="tvm")


# ---- eager hand-off: outputs equal eager -----------------------------------------------------------

def test_mlp(mlp):
    model, inputs = mlp
    outputs, be = compile_and_run(model, *inputs)
    torch.testing.assert_close(outputs, model(*inputs), **CLOSE)
    (report,) = be.reports
    assert [r.status for r in report.records] == ["applied", "no change"]
    assert report.records[0].result.stats["dropout"] == 2


def test_cnn(cnn):
    model, inputs = cnn
    outputs, be = compile_and_run(model, *inputs)
    torch.testing.assert_close(outputs, model(*inputs), **CLOSE)
    assert len(be.reports) == 1
    assert_no_rollback(be)


def test_hugging_face_models(hf_model):
    name, model, kwargs = hf_model
    outputs, be = compile_and_run(model, **kwargs)
    with torch.no_grad():
        expected = model(**kwargs)
    torch.testing.assert_close(outputs.last_hidden_state, expected.last_hidden_state, **CLOSE)
    assert len(be.reports) == 1
    assert [r.status for r in be.reports[0].records] == ["applied", "applied"], name


@pytest.mark.slow
def test_pretrained_minilm_on_real_sentences(minilm):
    model, batch = minilm
    outputs, be = compile_and_run(model, **batch)
    with torch.no_grad():
        expected = model(**batch)
    torch.testing.assert_close(outputs.last_hidden_state, expected.last_hidden_state, **CLOSE)
    assert_no_rollback(be)
    assert sum(r.result.stats.get("dropout", 0) for report in be.reports for r in report.records) == 13


def test_dynamic_shapes_compile_one_graph_for_every_size(mlp):
    # Dynamo hands sizes over as SymInt inputs; the reference run needs their example values.
    model, _ = mlp
    be = slimgraph.backend("cleanup, fold_constants", then="eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        for batch in (3, 5, 9):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), model(x), **CLOSE)
    (report,) = be.reports
    assert [r.status for r in report.records] == ["applied", "no change"]


class TwoHalves(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2))
        self.second = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.2))

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_graph_break_gives_two_graphs_both_optimized():
    model, x = TwoHalves().eval(), torch.randn(3, 8)
    outputs, be = compile_and_run(model, x, passes="cleanup")
    torch.testing.assert_close(outputs, model(x), **CLOSE)
    assert len(be.reports) == 2
    for report in be.reports:
        (record,) = report.records
        assert record.status == "applied" and record.result.stats["dropout"] == 1


# ---- freezing ----------------------------------------------------------------------------------------

def test_freeze_turns_parameter_placeholders_into_get_attr(mlp):
    model, (x,) = mlp
    before, after, example_inputs, frozen, kept = freeze_inside_dynamo(model, x)
    assert len(before) == 5  # four parameters and x
    assert [example_inputs[i] for i in kept] == [x]
    assert [n.op for n in frozen.graph.nodes].count("placeholder") == 1
    constants = [frozen.get_parameter(n.target) for n in frozen.graph.nodes if n.op == "get_attr"]
    assert {t.data_ptr() for t in constants} == {p.data_ptr() for p in model.parameters()}
    assert not any(t.requires_grad for t in constants)
    # Dynamo reads the graph it handed over to decide what to pass: it must be left alone.
    assert after == before
    with torch.no_grad():
        torch.testing.assert_close(frozen(x)[0], model(x), rtol=0, atol=0)


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_freeze_turns_buffers_into_get_attr_too():
    model, x = WithBatchNorm().eval(), torch.randn(2, 3, 8, 8)
    model.norm.running_mean.uniform_()
    _, _, example_inputs, frozen, kept = freeze_inside_dynamo(model, x)
    assert [example_inputs[i] for i in kept] == [x]
    buffers = [frozen.get_buffer(n.target) for n in frozen.graph.nodes
               if n.op == "get_attr" and n.target in dict(frozen.named_buffers())]
    assert {b.data_ptr() for b in buffers} == {model.norm.running_mean.data_ptr(),
                                               model.norm.running_var.data_ptr()}
    torch._dynamo.reset()
    outputs, _ = compile_and_run(model, x)
    torch.testing.assert_close(outputs, model(x), **CLOSE)


# ---- Inductor hand-off ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_inductor_hand_off(mlp):
    model, inputs = mlp
    be = slimgraph.backend("cleanup, fold_constants", then="inductor")
    with torch.no_grad():
        outputs = torch.compile(model, backend=be)(*inputs)
    torch.testing.assert_close(outputs, model(*inputs), **CLOSE)
    (report,) = be.reports
    assert report.records[0].status == "applied"


def test_compile_mode_and_extra_options_become_inductor_config(monkeypatch, mlp):
    """torch.compile(backend="slimgraph", mode=..., options=...) splits ours from Inductor's."""
    backend_module = sys.modules["slimgraph.backend"]  # the attribute slimgraph.backend is the function

    seen = {}

    def fake_backend(**kwargs):
        seen.update(kwargs)
        return lambda gm, example_inputs: gm.forward

    monkeypatch.setattr(backend_module, "backend", fake_backend)
    model, inputs = mlp
    torch.compile(model, backend="slimgraph", mode="max-autotune-no-cudagraphs")(*inputs)
    assert seen["inductor_config"]["max_autotune"] is True
    torch._dynamo.reset()  # torch.compile accepts mode or options, not both
    seen.clear()
    torch.compile(model, backend="slimgraph",
                  options={"then": "inductor", "passes": "cleanup", "epilogue_fusion": False})(*inputs)
    assert seen["then"] == "inductor" and seen["passes"] == "cleanup"
    assert seen["inductor_config"] == {"epilogue_fusion": False}


def test_inductor_config_needs_the_inductor_hand_off():
    with pytest.raises(ValueError, match="has no effect with then='eager'"):
        slimgraph.backend(then="eager", inductor_config={"max_autotune": True})
