"""capture(): torch.export first, symbolic_trace as the fallback, CaptureError when both fail."""

from __future__ import annotations

import importlib.util
import inspect
import textwrap

import pytest
import torch
from torch import nn
from torch.export import Dim

from slimgraph import models
from slimgraph.errors import CaptureError
from slimgraph.ir import LinearView, capture, find_all, graph_cost, propagate_shapes
from slimgraph.ir.nodes import module_path

# The captured graph runs the very same ATen kernels as eager mode on CPU, so outputs match
# bit for bit on these models; HF graphs get a hair of slack for kernel-selection differences.
EXACT = {"rtol": 0.0, "atol": 0.0}
HF_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _get_attr_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


# ---- torch.export path ---------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["mlp", "cnn"])
def test_small_models_capture_with_export_and_match_eager(request, fixture):
    model, args = request.getfixturevalue(fixture)
    gm = capture(model, args)
    assert gm.meta["slimgraph_capture"]["strategy"] == "export"
    torch.testing.assert_close(gm(*args), model(*args), **EXACT)
    assert _get_attr_targets(gm) >= {name for name, _ in model.named_parameters()}
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]


def test_hf_models_capture_with_weights_as_constants(hf_model):
    name, model, kwargs = hf_model
    gm = capture(model, (), kwargs)
    with torch.no_grad():
        torch.testing.assert_close(dict(gm(**kwargs)), dict(model(**kwargs)), **HF_TOLERANCE)
    parameters = dict(model.named_parameters())
    assert _get_attr_targets(gm) >= set(parameters)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids"]
    for target in parameters:
        assert gm.get_parameter(target) is not None and torch.equal(gm.get_parameter(target), parameters[target])


def test_llama_grouped_query_attention_is_captured():
    model, kwargs = models.llama(), {"input_ids": torch.randint(0, 128, (2, 12))}
    gm = capture(model, (), kwargs)
    with torch.no_grad():
        torch.testing.assert_close(gm(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state,
                                   **HF_TOLERANCE)
    projections = {v.module_path: v for v in find_all(gm, LinearView)}
    assert projections["layers.0.self_attn.k_proj"].out_features == 2 * 16  # 2 KV heads of 16
    assert projections["layers.0.self_attn.q_proj"].out_features == 4 * 16  # 4 query heads


def test_nodes_keep_module_stack_and_stack_trace(hf_model):
    name, model, kwargs = hf_model
    gm = capture(model, (), kwargs)
    model_file = inspect.getsourcefile(type(model)).rsplit("/", 1)[-1]  # modeling_bert.py, ...
    linear_modules = {path for path, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    views = find_all(gm, LinearView)
    assert {v.module_path for v in views} == linear_modules
    for view in views:
        assert view.node.meta["nn_module_stack"]
        assert model_file in view.node.meta["stack_trace"]


def test_capture_leaves_the_model_untouched(hf_model):
    _, model, kwargs = hf_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, (), kwargs)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not model.training


@pytest.mark.slow
def test_pretrained_minilm_on_real_sentences(minilm):
    model, batch = minilm
    gm = capture(model, (), batch)
    assert gm.meta["slimgraph_capture"]["strategy"] == "export"
    with torch.no_grad():
        got, want = gm(**batch), model(**batch)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **HF_TOLERANCE)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **HF_TOLERANCE)
    assert {v.module_path for v in find_all(gm, LinearView)} >= {
        f"encoder.layer.{i}.attention.self.query" for i in range(6)}


# ---- dynamic shapes ------------------------------------------------------------------------------

def test_dynamic_shapes_name_the_symbols_and_run_at_other_sizes():
    model = models.bert()
    kwargs = {"input_ids": torch.randint(0, 128, (2, 12))}
    batch, seq = Dim("batch"), Dim("seq", max=128)
    gm = capture(model, (), kwargs, dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    size_batch, size_seq = placeholder.meta["val"].shape
    assert gm.meta["slimgraph_symbols"] == {str(size_batch.node.expr): "batch", str(size_seq.node.expr): "seq"}
    for shape in [(3, 7), (1, 20)]:
        ids = torch.randint(0, 128, shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(input_ids=ids).last_hidden_state,
                                       model(input_ids=ids).last_hidden_state, **HF_TOLERANCE)


def test_dynamic_shapes_given_as_a_tuple(mlp):
    model, (x,) = mlp
    gm = capture(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    assert list(gm.meta["slimgraph_symbols"].values()) == ["batch"]
    wide = torch.randn(9, 16)
    torch.testing.assert_close(gm(wide), model(wide), **EXACT)


def test_static_capture_records_no_symbols(mlp):
    model, args = mlp
    assert capture(model, args).meta["slimgraph_symbols"] == {}


# ---- symbolic_trace fallback ---------------------------------------------------------------------

class Settings:
    """A plain Python object: torch.export rejects it as an input, symbolic_trace reads its fields."""

    def __init__(self, gain: float):
        self.gain = gain


class SettingsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, settings, mask=None):
        if mask is None:
            mask = torch.ones_like(x)
        return torch.relu(self.lin(x * mask)) * settings.gain


@pytest.fixture
def fallback():
    model, x, settings = SettingsModel(), torch.randn(2, 4), Settings(3.0)
    return model, (x, settings), capture(model, (x, settings))


def test_fallback_to_symbolic_trace_when_export_fails(fallback):
    model, args, gm = fallback
    meta = gm.meta["slimgraph_capture"]
    assert meta["strategy"] == "symbolic_trace"
    assert "Unsupported input type" in meta["export_error"]
    torch.testing.assert_close(gm(*args), model(*args), **EXACT)
    assert _get_attr_targets(gm) == {"lin.weight", "lin.bias"}
    (view,) = find_all(gm, LinearView)
    assert view.module_path == "lin"
    assert view.node.meta["nn_module_stack"]


def test_fallback_binds_optional_arguments_the_caller_left_out(fallback):
    """Traced as a proxy, ``mask`` is never ``None``: the graph would compute ``x * None``."""
    model, args, gm = fallback
    torch.testing.assert_close(gm(*args, mask=None), model(*args), **EXACT)
    with pytest.raises(AssertionError, match="mask has been specialized"):
        gm(*args, mask=torch.zeros(2, 4))


def test_fallback_records_stack_traces(fallback):
    _, _, gm = fallback
    (view,) = find_all(gm, LinearView)
    line = _line_of(SettingsModel.forward, "self.lin(x * mask)")
    assert f'File "{__file__}", line {line}, in forward' in view.node.meta["stack_trace"]
    assert view.source_line == f"test_capture.py:{line} `return torch.relu(self.lin(x * mask)) * settings.gain`"


def test_fallback_shapes_are_static_and_costs_are_numbers(fallback):
    """Only ``dynamic_shapes`` makes sizes symbolic; otherwise costs come out in anonymous symbols."""
    _, _, gm = fallback
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert tuple(x.meta["val"].shape) == (2, 4) and all(type(s) is int for s in x.meta["val"].shape)
    propagate_shapes(gm)
    (view,) = find_all(gm, LinearView)
    assert graph_cost(gm).per_node[view.node].flops == 2 * 2 * 4 * 3
    assert graph_cost(gm).flops.is_Integer


def test_leaf_modules_stay_opaque_in_the_fallback():
    model, args = SettingsModel(), (torch.randn(2, 4), Settings(0.5))
    gm = capture(model, args, leaf_modules=(nn.Linear,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin"]
    torch.testing.assert_close(gm(*args), model(*args), **EXACT)


# ---- CaptureError --------------------------------------------------------------------------------

class BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


def _line_of(function, code: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if code in line)


def test_capture_error_names_construct_source_line_and_what_to_try():
    with pytest.raises(CaptureError) as caught:
        capture(BranchOnData(), (torch.randn(2, 4),))
    message = str(caught.value)
    assert f"{__file__}:{_line_of(BranchOnData.forward, 'if x.sum() > 0:')}" in message
    assert "`if x.sum() > 0:`" in message
    assert "data-dependent" in message  # what torch.export tripped on
    assert "control flow" in message  # what symbolic_trace tripped on
    assert "what to try: the model branches on a tensor's value" in message
    assert "torch.where" in message
    assert caught.value.__cause__ is not None


def test_capture_error_finds_user_code_in_a_checkout_named_slimgraph(tmp_path):
    """The user's own project may live in a directory called ``slimgraph``."""
    source = tmp_path / "slimgraph" / "user_model.py"
    source.parent.mkdir()
    source.write_text(textwrap.dedent("""\
        import torch
        from torch import nn


        class Branchy(nn.Module):
            def forward(self, x):
                if x.mean() > 0:
                    return x
                return -x
        """))
    spec = importlib.util.spec_from_file_location("user_model_in_slimgraph_dir", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(CaptureError, match=rf"failing construct at {source}:7 in forward"):
        capture(module.Branchy(), (torch.randn(3),))


def test_capture_rejects_non_modules():
    with pytest.raises(TypeError, match="expects an nn.Module, got function"):
        capture(lambda x: x, (torch.randn(2),))


def test_module_path_of_captured_linear(mlp):
    model, args = mlp
    gm = capture(model, args)
    assert [module_path(v.node) for v in find_all(gm, LinearView)] == ["net.0", "net.3"]


def test_running_other_sizes_fails_with_a_hint_about_dynamic_shapes():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    gm = capture(model, (torch.randn(2, 8),))
    with pytest.raises(AssertionError, match=r"Guard failed: input.size\(\)\[0\] == 2: the graph was captured "
                       r"for the example inputs' sizes.*dynamic_shapes=\{'input': \{0: torch.export.Dim\('batch'\)\}\}"):
        gm(torch.randn(3, 8))
    torch.testing.assert_close(gm(torch.ones(2, 8)), model(torch.ones(2, 8)), rtol=0, atol=0)


def test_eager_calls_run_exports_check_without_dynamos_config_patch(monkeypatch):
    """The patch around export's guards costs ~10 µs a call; eager calls skip it, checks intact."""
    gm = capture(nn.Sequential(nn.Linear(8, 8)).eval(), (torch.randn(2, 8),))
    guards = gm._guards_fn
    assert guards.check.__name__ == "_"  # export's check, found under its decorator
    entered = []
    monkeypatch.setattr(torch._dynamo.decorators.DynamoConfigPatchProxy, "__enter__",
                        lambda self: entered.append(self))
    gm(torch.randn(2, 8))
    assert entered == []
    with pytest.raises(AssertionError, match=r"Guard failed: input.size\(\)\[1\] == 8"):
        gm(torch.randn(2, 9))
