"""Analyses: shapes, blocks, cost, dataflow, and the AnalysisManager that caches them."""

from __future__ import annotations

import networkx as nx
import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim

from slimgraph import models
from slimgraph.errors import VerificationError
from slimgraph.ir import (
    ANALYSES,
    AnalysisManager,
    AttentionView,
    ConvView,
    LinearView,
    NormView,
    capture,
    dataflow_graph,
    find_all,
    find_blocks,
    graph_cost,
    node_cost,
    propagate_shapes,
)
from slimgraph.ir.analyses import Analysis
from slimgraph.ir.nodes import module_path, op_name

# ---- shapes --------------------------------------------------------------------------------------


class RecordingInterpreter(fx.Interpreter):
    """Runs the graph on real tensors and keeps every node's value."""

    def run_node(self, node):
        value = super().run_node(node)
        self.values[node] = value
        return value


def real_values(gm: fx.GraphModule, *args, **kwargs) -> dict:
    interpreter = RecordingInterpreter(gm)
    interpreter.values = {}
    with torch.no_grad():
        interpreter.run(*args, *kwargs.values())
    return interpreter.values


def assert_same_metadata(fake, real, node):
    if isinstance(real, torch.Tensor):
        assert isinstance(fake, torch.Tensor), node
        assert (tuple(fake.shape), fake.dtype) == (tuple(real.shape), real.dtype), node
    elif isinstance(real, list | tuple):
        assert len(fake) == len(real), node
        for f, r in zip(fake, real, strict=True):
            assert_same_metadata(f, r, node)
    elif isinstance(real, int | float | bool):
        assert fake == real, node


def test_propagated_shapes_match_real_execution(hf_model):
    _, model, kwargs = hf_model
    gm = capture(model, (), kwargs)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            node.meta.pop("val", None)  # export recorded them; make propagation produce its own
    values = propagate_shapes(gm)
    real = real_values(gm, **kwargs)
    compared = [n for n in gm.graph.nodes if n.op not in ("output",)]
    assert set(values) == set(compared)
    for node in compared:
        assert node.meta["val"] is values[node]
        assert_same_metadata(values[node], real[node], node)
    assert any(v.dtype == torch.int64 for v in values.values() if isinstance(v, torch.Tensor))


def test_shape_propagation_failure_names_the_node(mlp):
    model, args = mlp
    gm = capture(model, args)
    linear = find_all(gm, LinearView)[0].node
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(linear):
        bad = gm.graph.call_function(torch.ops.aten.mm.default, (x, x))  # [4, 16] @ [4, 16]
    bad.meta["nn_module_stack"] = linear.meta["nn_module_stack"]
    with pytest.raises(VerificationError, match=rf"shape propagation failed at node '{bad.name}' "
                                                r"\(aten.mm.default\) in module 'net.0'.*same reduction dim"):
        propagate_shapes(gm)


def test_shape_propagation_needs_example_values(mlp):
    model, _ = mlp
    with pytest.raises(VerificationError, match=r"placeholders \['x'\] have no example value.*capture"):
        propagate_shapes(fx.symbolic_trace(model))


class OptionalBias(nn.Module):
    def forward(self, x, bias=None):
        return torch.relu(x) if bias is None else torch.relu(x + bias)


def test_an_input_left_as_none_is_a_value_not_a_missing_one():
    gm = fx.symbolic_trace(OptionalBias(), concrete_args={"bias": None})
    x, bias = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x.meta["val"], bias.meta["val"] = FakeTensorMode().from_tensor(torch.randn(2, 3)), None
    values = propagate_shapes(gm)
    assert [tuple(v.shape) for n, v in values.items() if n.op == "call_function" and n.target is torch.relu] == [
        (2, 3)]


def test_shape_propagation_reads_call_module_parameters(mlp):
    model, (x,) = mlp
    gm = fx.symbolic_trace(model)
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"] = FakeTensorMode().from_tensor(x)
    values = propagate_shapes(gm)
    assert [tuple(v.shape) for n, v in values.items() if n.op == "call_module"] == [
        (4, 32), (4, 32), (4, 32), (4, 8), (4, 8), (4, 8)]


# ---- blocks --------------------------------------------------------------------------------------

STACKS = {"bert": "encoder.layer", "gpt2": "h", "llama": "layers"}
PER_BLOCK = {"bert": (6, 1, 2), "gpt2": (4, 1, 2), "llama": (7, 1, 2)}  # linears, attentions, norms


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_find_blocks_finds_the_transformer_stack(graph_of, name):
    model, _, gm = graph_of(name)
    structure = find_blocks(gm)
    layers = model.config.num_hidden_layers
    container = STACKS[name]
    assert list(structure.containers) == [container]
    assert [(b.path, b.index) for b in structure.main] == [(f"{container}.{i}", i) for i in range(layers)]
    assert len({b.module_type for b in structure.main}) == 1


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_each_block_holds_exactly_its_nodes(graph_of, name):
    _, _, gm = graph_of(name)
    blocks = find_blocks(gm).main
    for block in blocks:
        inside = [n for n in gm.graph.nodes if n.op != "get_attr"  # blocks hold computation; weights are inputs
                  and (module_path(n) == block.path or module_path(n).startswith(block.path + "."))]
        assert block.nodes == inside
        counts = [sum(1 for n in block.nodes if view_type.match(n)) for view_type in
                  (LinearView, AttentionView, NormView)]
        assert tuple(counts) == PER_BLOCK[name]
    all_nodes = [n for b in blocks for n in b.nodes]
    assert len(all_nodes) == len(set(all_nodes))  # blocks are disjoint


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_blocks_chain_through_their_inputs_and_outputs(graph_of, name):
    _, _, gm = graph_of(name)
    structure = find_blocks(gm)
    blocks = structure.main
    for before, after in zip(blocks, blocks[1:], strict=False):
        assert set(before.outputs) & set(after.inputs)
    q = [v.node for v in find_all(gm, LinearView) if module_path(v.node).startswith(f"{STACKS[name]}.1.")][0]
    assert structure.block_of(q) is blocks[1]
    assert structure.block_of(next(n for n in gm.graph.nodes if n.op == "placeholder")) is None


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TwoStacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Encoder() for _ in range(3)])
        self.decoder = nn.ModuleList([Decoder() for _ in range(2)])
        self.single = nn.ModuleList([Decoder()])  # one block is not a stack
        self.mixed = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # numbered, but not one type

    def forward(self, x):
        for layer in [*self.encoder, *self.decoder, *self.single]:
            x = layer(x)
        return self.mixed(x)


def test_main_stack_is_the_container_covering_most_nodes():
    gm = capture(TwoStacks(), (torch.randn(2, 8),))
    structure = find_blocks(gm)
    assert sorted(structure.containers) == ["decoder", "encoder"]
    assert [b.path for b in structure.main] == ["decoder.0", "decoder.1"]  # 2 × 4 nodes beat 3 × 2
    encoder = structure.containers["encoder"]
    assert [[n.name for n in b.nodes] for b in encoder] == [["linear", "relu"], ["linear_1", "relu_1"],
                                                             ["linear_2", "relu_2"]]  # no _guards_fn


def test_a_model_without_repeated_blocks(mlp):
    model, args = mlp
    structure = find_blocks(capture(model, args))
    assert structure.containers == {} and structure.main == []


# ---- cost ----------------------------------------------------------------------------------------

def with_example_values(gm: fx.GraphModule, *args) -> fx.GraphModule:
    """Give a plain symbolic_trace graph fake inputs and propagate shapes from them."""
    mode = FakeTensorMode()
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args, strict=True):
        node.meta["val"] = mode.from_tensor(value)
    propagate_shapes(gm)
    return gm


def linear_graph(spelling: str, shape: tuple[int, ...], out_features: int, bias: bool) -> fx.GraphModule:
    root = nn.Module()
    root.lin = nn.Linear(shape[-1], out_features, bias=bias)
    graph = fx.Graph()
    x = graph.placeholder("x")
    if spelling == "call_module":
        y = graph.call_module("lin", (x,))
    else:
        target = {"aten": torch.ops.aten.linear.default, "dynamo": torch._C._nn.linear, "F": F.linear}[spelling]
        weight = graph.get_attr("lin.weight")
        y = graph.call_function(target, (x, weight, graph.get_attr("lin.bias") if bias else None))
    graph.output(y)
    return with_example_values(fx.GraphModule(root, graph), torch.empty(shape))


@settings(max_examples=30, deadline=None)
@given(spelling=st.sampled_from(["aten", "dynamo", "F", "call_module"]),
       shape=st.lists(st.integers(1, 9), min_size=2, max_size=4).map(tuple),
       out_features=st.integers(1, 9), bias=st.booleans())
def test_linear_flops_are_two_m_k_n(spelling, shape, out_features, bias):
    gm = linear_graph(spelling, shape, out_features, bias)
    node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_module"))
    rows, k = int(torch.tensor(shape[:-1]).prod()), shape[-1]
    cost = node_cost(node)
    assert cost.flops == 2 * rows * k * out_features
    if spelling != "call_module":  # a module's parameters are not graph inputs, so not counted
        assert cost.bytes == 4 * (rows * k + out_features * k + (out_features if bias else 0) + rows * out_features)


def test_gpt2_conv1d_addmm_flops(exported):
    model, _, gm = exported("gpt2")
    cost = graph_cost(gm)
    for view in find_all(gm, LinearView):
        assert view.node.target is torch.ops.aten.addmm.default
        assert cost.per_node[view.node].flops == 2 * 24 * view.in_features * view.out_features  # 2×12 tokens


CONV_FLOPS = {  # 2 × output elements × (in_channels / groups × kernel)
    "conv1": 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3),
    "conv2": 2 * (2 * 8 * 7 * 7) * (4 * 3 * 3),
    "seq": 2 * (2 * 4 * 49) * (8 * 5),
}


@pytest.mark.parametrize("spelling", ["export", "dynamo", "symbolic_trace"])
def test_conv_flops(cnn, spell, spelling):
    model, (x,) = cnn
    gm = spell(model, spelling, x)
    if spelling == "symbolic_trace":
        with_example_values(gm, x)
    cost = graph_cost(gm)
    assert {v.module_path: cost.per_node[v.node].flops for v in find_all(gm, ConvView)} == CONV_FLOPS


class Attend(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("spelling", ["export", "dynamo"])
def test_sdpa_flops(spell, spelling):
    batch, heads, queries, keys, head_dim, value_dim = 2, 3, 5, 7, 8, 4
    q, k = torch.randn(batch, heads, queries, head_dim), torch.randn(batch, heads, keys, head_dim)
    v = torch.randn(batch, heads, keys, value_dim)
    gm = spell(Attend(), spelling, q, k, v)
    view = find_all(gm, AttentionView)[0]
    scores = batch * heads * queries * keys
    assert graph_cost(gm).per_node[view.node].flops == 2 * scores * head_dim + 2 * scores * value_dim + 5 * scores


class ViewOps(nn.Module):
    """Nothing but views, then two real ops."""

    def forward(self, x):
        a = x.view(2, 3, 4, 5).transpose(1, 2)
        b = torch.transpose(a, 2, 3).permute(0, 2, 1, 3).unsqueeze(0).squeeze(0)
        first, second = b.reshape(2, 5, 12).split(6, dim=-1)
        left, _ = torch.chunk(first, 2, dim=1)
        d = left[:, 0].flatten().expand(3, -1).t()
        return torch.relu(d), torch.max(second, dim=-1).values


@pytest.mark.parametrize("spelling", ["export", "dynamo", "symbolic_trace"])
def test_views_and_output_selection_cost_nothing(spell, spelling):
    x = torch.randn(120)
    gm = spell(ViewOps(), spelling, x)
    if spelling == "symbolic_trace":
        with_example_values(gm, x)
    costs = graph_cost(gm).per_node
    real = {op_name(n).split(".")[1 if op_name(n).startswith("aten") else -1]: c
            for n, c in costs.items() if c.flops or c.bytes}
    assert sorted(real) == ["max", "relu"]
    assert (real["relu"].flops, real["relu"].bytes) == (36, 2 * 36 * 4)
    assert real["max"].bytes == 60 * 4 + 10 * 4 + 10 * 8  # reads 60 floats, writes values and indices


def test_static_costs_are_integers(mlp):
    model, args = mlp
    cost = graph_cost(capture(model, args))
    assert cost.flops.is_Integer and cost.bytes.is_Integer
    assert cost.evaluate() == (int(cost.flops), int(cost.bytes))
    assert cost.flops == 2 * 4 * 16 * 32 + 2 * 4 * 32 * 8 + 4 * 32 + 4 * 8 + 4 * 32 + 4 * 8  # + relu, dropout


@pytest.fixture(scope="module")
def dynamic_bert():
    model = models.bert()
    kwargs = {"input_ids": torch.randint(0, 128, (2, 12))}
    dims = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=128)}}
    return model, capture(model, (), kwargs, dynamic_shapes=dims)


def static_cost(model: nn.Module, batch: int, seq: int) -> tuple[int, int]:
    return graph_cost(capture(model, (), {"input_ids": torch.randint(0, 128, (batch, seq))})).evaluate()


def test_dynamic_cost_is_an_expression_in_the_named_dims(dynamic_bert):
    model, gm = dynamic_bert
    cost = graph_cost(gm)
    assert {str(s) for s in cost.flops.free_symbols} == {"batch", "seq"}
    assert {str(s) for s in cost.bytes.free_symbols} == {"batch", "seq"}
    batch, seq = sympy.symbols("batch seq", integer=True, positive=True)
    assert sympy.degree(sympy.Poly(cost.flops, seq)) == 2  # attention is quadratic in seq
    for sizes in [(2, 16), (3, 7)]:
        assert cost.evaluate(batch=sizes[0], seq=sizes[1]) == static_cost(model, *sizes)


def test_evaluate_names_unbound_symbols(dynamic_bert):
    _, gm = dynamic_bert
    with pytest.raises(ValueError, match=r"cost still depends on \['seq'\]; pass them as keyword arguments"):
        graph_cost(gm).evaluate(batch=2)


def test_dynamic_batch_given_as_a_tuple(mlp):
    model, args = mlp
    cost = graph_cost(capture(model, args, dynamic_shapes=({0: Dim("batch")},)))
    static = graph_cost(capture(model, args))
    assert cost.flops.free_symbols == {sympy.Symbol("batch", integer=True, positive=True)}
    assert cost.evaluate(batch=4) == static.evaluate()


# ---- dataflow ------------------------------------------------------------------------------------

def test_dataflow_graph_mirrors_fx_edges(exported):
    _, _, gm = exported("llama")
    graph = dataflow_graph(gm)
    nodes = list(gm.graph.nodes)
    assert isinstance(graph, nx.DiGraph)
    assert set(graph.nodes) == set(nodes)
    assert set(graph.edges) == {(source, n) for n in nodes for source in n.all_input_nodes}
    assert nx.is_directed_acyclic_graph(graph)
    order = {n: i for i, n in enumerate(nodes)}
    assert all(order[a] < order[b] for a, b in graph.edges)
    linear = find_all(gm, LinearView)[0].node
    assert graph.nodes[linear] == {"op": "call_function", "target": "aten.linear.default"}


# ---- AnalysisManager -----------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch):
    """Every registered analysis, wrapped to count how often it really runs."""
    calls = dict.fromkeys(ANALYSES, 0)
    for name, analysis in list(ANALYSES.items()):
        def compute(gm, name=name, inner=analysis.compute):
            calls[name] += 1
            return inner(gm)
        monkeypatch.setitem(ANALYSES, name, Analysis(name, compute, analysis.requires))
    return calls


@pytest.fixture
def manager(mlp):
    model, args = mlp
    return AnalysisManager(capture(model, args))


def test_results_are_computed_once(manager, counted):
    first = manager.get("blocks")
    assert manager.get("blocks") is first
    assert counted["blocks"] == 1 and manager.is_cached("blocks")


def test_graph_change_invalidates(manager, counted):
    first = manager.get("dataflow")
    manager.graph_changed()
    assert not manager.is_cached("dataflow")
    assert manager.get("dataflow") is not first
    assert counted["dataflow"] == 2


def test_preserved_results_survive_a_change(manager, counted):
    blocks, dataflow = manager.get("blocks"), manager.get("dataflow")
    manager.graph_changed(preserved=("blocks",))
    assert manager.get("blocks") is blocks
    assert manager.get("dataflow") is not dataflow
    assert counted == {**counted, "blocks": 1, "dataflow": 2}


def test_preserving_does_not_revive_a_stale_result(manager, counted):
    """A pass that preserves 'blocks' after one that did not must not bring back the old result."""
    stale = manager.get("blocks")
    manager.graph_changed()
    manager.graph_changed(preserved=("blocks",))
    assert not manager.is_cached("blocks")
    assert manager.get("blocks") is not stale
    assert counted["blocks"] == 2


def test_requirements_are_computed_first(manager, counted):
    manager.get("costs")
    assert manager.is_cached("shapes") and counted["shapes"] == 1
    manager.get("costs")
    assert counted == {**counted, "shapes": 1, "costs": 1}


def test_recompute_and_rebind(manager, counted, mlp):
    first = manager.get("dataflow")
    assert manager.recompute("dataflow") is not first and counted["dataflow"] == 2
    other = capture(mlp[0], mlp[1])
    manager.rebind(other)
    assert manager.gm is other and not manager.is_cached("dataflow")
    assert set(manager.get("dataflow").nodes) == set(other.graph.nodes)


def test_unknown_analysis_lists_the_known_ones(manager):
    with pytest.raises(KeyError, match="unknown analysis 'sizes'; known analyses: blocks, costs, dataflow, shapes"):
        manager.get("sizes")


def test_for_captured_adopts_the_recorded_shapes(mlp, counted):
    model, args = mlp
    gm = capture(model, args)
    manager = AnalysisManager.for_captured(gm)
    shapes = manager.get("shapes")
    assert counted["shapes"] == 0
    assert all(shapes[n] is n.meta["val"] for n in gm.graph.nodes if n.op == "call_function")


def test_for_captured_propagates_when_values_are_missing(mlp, counted):
    model, (x,) = mlp
    gm = with_example_values(fx.symbolic_trace(model), x)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            node.meta.pop("val", None)
    AnalysisManager.for_captured(gm).get("shapes")
    assert counted["shapes"] == 1


def test_blocks_of_a_root_level_sequential_are_found():
    """A model that *is* the stack (nn.Sequential of identical blocks) has its container at the root."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)]).eval()
    gm = capture(model, (torch.randn(2, 8),))
    blocks = find_blocks(gm).main
    assert [b.path for b in blocks] == ["0", "1", "2"]
    assert all(any(n.target is torch.ops.aten.linear.default for n in b.nodes) for b in blocks)
