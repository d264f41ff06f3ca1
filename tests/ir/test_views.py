"""Op views: each op recognised in the torch.export, Dynamo and symbolic_trace spellings."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from slimgraph.ir import (
    AttentionView,
    ConvView,
    EmbeddingView,
    LinearView,
    NormView,
    capture,
    find_all,
    iter_views,
)

SPELLINGS = ["export", "dynamo", "symbolic_trace"]


def only(views: list) -> object:
    assert len(views) == 1, views
    return views[0]


def producer(node: fx.Node, view_type: type) -> object:
    """The nearest ``view_type`` op upstream of ``node`` along first arguments (through views, RoPE)."""
    while (view := view_type.match(node)) is None:
        node = node.args[0]
    return view


# ---- one model with every op, in every spelling ----------------------------------------------

class Attention(nn.Module):
    def __init__(self, form: str, dim: int = 16, heads: int = 2):
        super().__init__()
        self.form, self.heads = form, heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def split_heads(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, mask):
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.125
        probs = F.dropout(F.softmax(scores + mask, dim=-1), p=0.0, training=self.training)
        return torch.matmul(probs, v)


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, groups=2)
        self.layer_norm = nn.LayerNorm(16, eps=1e-6)
        self.rms_norm = nn.RMSNorm(16)  # eps=None: finfo(float32).eps
        self.llama_norm = LlamaRMSNorm(16, eps=1e-5)  # the decomposed form
        self.sdpa_attn = Attention("sdpa")
        self.eager_attn = Attention("matmul_softmax")
        self.out = nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            for norm in (self.layer_norm, self.rms_norm, self.llama_norm):
                norm.weight.uniform_(0.5, 1.5)

    def forward(self, ids, mask):
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.llama_norm(self.rms_norm(self.layer_norm(h)))
        a = self.sdpa_attn(h, mask) + self.eager_attn(h, mask)
        return self.out(a.transpose(1, 2).flatten(2))


@pytest.fixture(scope="module")
def zoo_model():
    torch.manual_seed(0)
    return Zoo().eval(), (torch.randint(0, 32, (2, 5)), torch.randn(2, 1, 5, 5))


@pytest.fixture(scope="module", params=SPELLINGS)
def zoo(request, zoo_model, spell):
    model, args = zoo_model
    return model, args, spell(model, request.param, *args)


def test_linear_views_in_every_spelling(zoo):
    model, _, gm = zoo
    views = find_all(gm, LinearView)
    assert [v.module_path for v in views] == [
        "sdpa_attn.q", "sdpa_attn.k", "sdpa_attn.v", "eager_attn.q", "eager_attn.k", "eager_attn.v", "out"]
    for view in views:
        module = model.get_submodule(view.module_path)
        assert torch.equal(view.weight, module.weight)
        assert (view.in_features, view.out_features) == (module.in_features, module.out_features)
        assert (view.bias is None) == (module.bias is None)
        if module.bias is not None:
            assert torch.equal(view.bias, module.bias)


def test_conv_view_in_every_spelling(zoo):
    model, _, gm = zoo
    view = only(find_all(gm, ConvView))
    assert view.module_path == "conv"
    assert (view.spatial_dims, view.stride, view.padding, view.dilation, view.groups) == (1, (1,), (1,), (1,), 2)
    assert torch.equal(view.weight, model.conv.weight) and torch.equal(view.bias, model.conv.bias)


def test_norm_views_in_every_spelling(zoo):
    model, _, gm = zoo
    layer_norm, rms_norm, llama_norm = find_all(gm, NormView)
    assert (layer_norm.kind, layer_norm.module_path, layer_norm.eps) == ("layer_norm", "layer_norm", 1e-6)
    assert torch.equal(layer_norm.weight, model.layer_norm.weight)
    assert torch.equal(layer_norm.bias, model.layer_norm.bias)
    assert (rms_norm.kind, rms_norm.module_path) == ("rms_norm", "rms_norm")
    assert rms_norm.eps == torch.finfo(torch.float32).eps and rms_norm.bias is None
    assert torch.equal(rms_norm.weight, model.rms_norm.weight)
    assert (llama_norm.kind, llama_norm.module_path, llama_norm.eps) == ("rms_norm", "llama_norm", 1e-5)
    assert torch.equal(llama_norm.weight, model.llama_norm.weight) and llama_norm.bias is None
    assert len(llama_norm.nodes) == 7 and llama_norm.nodes[-1] is llama_norm.node  # pow … weight-mul
    assert llama_norm.input.args[0] is rms_norm.node  # read through Llama's .to(float32)


def test_embedding_view_in_every_spelling(zoo):
    model, _, gm = zoo
    view = only(find_all(gm, EmbeddingView))
    assert (view.module_path, view.padding_idx, view.indices.op) == ("embed", 0, "placeholder")
    assert torch.equal(view.weight, model.embed.weight)


def test_attention_views_in_every_spelling(zoo):
    _, _, gm = zoo
    sdpa, eager = find_all(gm, AttentionView)
    mask = [n for n in gm.graph.nodes if n.op == "placeholder"][1]
    for view, kind, path in [(sdpa, "sdpa", "sdpa_attn"), (eager, "matmul_softmax", "eager_attn")]:
        assert (view.kind, view.module_path, view.scale, view.is_causal) == (kind, path, 0.125, False)
        assert view.attn_mask is mask
        assert [producer(n, LinearView).module_path for n in (view.query, view.key, view.value)] == [
            f"{path}.q", f"{path}.k", f"{path}.v"]
        assert view.nodes[-1] is view.node
    assert len(eager.nodes) == 7  # k.transpose, q@k^T, *scale, +mask, softmax, dropout, @v


def test_iter_views_visits_each_anchor_once(zoo):
    _, _, gm = zoo
    kinds = [type(v).__name__ for v in iter_views(gm)]
    assert sorted(kinds) == sorted(["EmbeddingView", "ConvView"] + ["NormView"] * 3 + ["LinearView"] * 7
                                   + ["AttentionView"] * 2)


def test_conv2d_views_agree_across_spellings(cnn, spell):
    model, (x,) = cnn
    fields = []
    for spelling in SPELLINGS:
        views = find_all(spell(model, spelling, x), ConvView)
        fields.append([(v.module_path, v.spatial_dims, v.stride, v.padding, v.dilation, v.groups) for v in views])
    assert fields[0] == [("conv1", 2, (1, 1), (1, 1), (1, 1), 1), ("conv2", 2, (2, 2), (0, 0), (1, 1), 2),
                         ("seq", 1, (1,), (2,), (1,), 1)]
    assert fields[0] == fields[1] == fields[2]


class ScoresThenSoftmax(nn.Module):
    def __init__(self, scaling: str):
        super().__init__()
        self.scaling = scaling

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1))
        if self.scaling == "mul":
            scores = scores * 0.125
        elif self.scaling == "div":
            scores = scores / 4.0
        return torch.matmul(torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(("scaling", "scale"), [("mul", 0.125), ("div", 0.25), ("none", 1.0)])
def test_subgraph_scale_is_what_sdpa_needs(spell, spelling, scaling, scale):
    """``scale=None`` would mean 1/sqrt(head_dim) to sdpa: an unscaled subgraph must say 1.0."""
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    model = ScoresThenSoftmax(scaling)
    view = only(find_all(spell(model, spelling, q, k, v), AttentionView))
    assert (view.kind, view.scale, view.attn_mask) == ("matmul_softmax", scale, None)
    assert [n.op for n in (view.query, view.key, view.value)] == ["placeholder"] * 3
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, scale=view.scale), model(q, k, v))


# ---- the Hugging Face models ---------------------------------------------------------------------

ATTENTION_PATH = {"bert": "encoder.layer.{}.attention.self", "gpt2": "h.{}.attn", "llama": "layers.{}.self_attn"}
PROJECTIONS = {"bert": ("query", "key", "value"), "gpt2": ("c_attn",) * 3,
               "llama": ("q_proj", "k_proj", "v_proj")}


@pytest.mark.parametrize(("name", "example"), [("bert", "encoder.layer.0.attention.self.query"),
                                               ("gpt2", "h.0.attn.c_attn"), ("llama", "layers.0.self_attn.q_proj")])
def test_hf_linear_weights_are_out_by_in(graph_of, name, example):
    model, _, gm = graph_of(name)
    expected = {path: m for path, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    views = find_all(gm, LinearView)
    assert sorted(v.module_path for v in views) == sorted(expected)
    assert example in expected
    for view in views:
        module = expected[view.module_path]
        conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores [in, out] and calls addmm
        assert view.weight_ref.transposed == conv1d
        assert torch.equal(view.weight, module.weight.t() if conv1d else module.weight)
        assert view.weight.shape == (view.out_features, view.in_features)
        assert (view.bias is None) == (module.bias is None)
        if module.bias is not None:
            assert torch.equal(view.bias, module.bias)


@pytest.mark.parametrize(("name", "attn"), [("bert", "sdpa"), ("bert", "eager"), ("gpt2", "sdpa"),
                                            ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
def test_hf_attention_views(graph_of, name, attn):
    model, _, gm = graph_of(name, attn=attn)
    views = find_all(gm, AttentionView)
    layers = model.config.num_hidden_layers
    assert [v.module_path for v in views] == [ATTENTION_PATH[name].format(i) for i in range(layers)]
    for i, view in enumerate(views):
        assert view.kind == ("sdpa" if attn == "sdpa" else "matmul_softmax")
        assert view.scale == 0.25  # head_dim 16
        block = ATTENTION_PATH[name].format(i)
        projections = [producer(n, LinearView).module_path for n in (view.query, view.key, view.value)]
        assert projections == [f"{block}.{p}" for p in PROJECTIONS[name]]
        assert view.num_heads == 4  # Llama's 2 KV heads are repeated to 4 before attention
        assert view.node.meta["nn_module_stack"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_exported_bert_mask_reaches_every_attention(exported, attn):
    """torch.export keeps BERT's (all-visible) padding mask; Dynamo's graph drops it entirely."""
    _, _, gm = exported("bert", attn=attn)
    masks = {v.attn_mask for v in find_all(gm, AttentionView)}
    assert len(masks) == 1 and None not in masks


def test_llama_decomposed_rms_norm(graph_of):
    model, _, gm = graph_of("llama")
    views = find_all(gm, NormView)
    paths = [f"layers.{i}.{n}" for i in range(model.config.num_hidden_layers)
             for n in ("input_layernorm", "post_attention_layernorm")]
    assert [v.module_path for v in views] == [*paths, "norm"]
    for view in views:
        assert (view.kind, view.eps, view.bias) == ("rms_norm", 1e-6, None)
        assert torch.equal(view.weight, model.get_submodule(view.module_path).weight)
        assert len(view.nodes) == 7


@pytest.mark.parametrize(("name", "paths"), [
    ("bert", ["embeddings.word_embeddings", "embeddings.token_type_embeddings",
              "embeddings.position_embeddings"]),
    ("gpt2", ["wte", "wpe"]),
    ("llama", ["embed_tokens"]),
])
def test_hf_embedding_views(graph_of, name, paths):
    model, _, gm = graph_of(name)
    views = find_all(gm, EmbeddingView)
    assert [v.module_path for v in views] == paths
    for view in views:
        module = model.get_submodule(view.module_path)
        assert torch.equal(view.weight, module.weight)
        assert view.padding_idx == module.padding_idx


# ---- replace_with --------------------------------------------------------------------------------

def linear_by_matmul(x, weight, bias):
    return torch.matmul(x, weight.t()) + bias


def linear_off_by_one(x, weight, bias):
    return F.linear(x, weight, bias) + 1


def _run(gm, *args):
    out = gm(*args)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(("spelling", "target"), [
    ("export", linear_by_matmul),
    ("dynamo", torch.ops.aten.linear.default),
])
def test_replace_with_keeps_outputs_provenance_and_records_the_anchor(mlp, spell, spelling, target):
    model, (x,) = mlp
    gm = spell(model, spelling, x)
    view = find_all(gm, LinearView)[0]
    old, meta = view.node, dict(view.node.meta)
    new = view.replace_with(target, (view.input, view.weight_ref.node, view.bias_ref.node))
    gm.recompile()
    torch.testing.assert_close(_run(gm, x), model(x), rtol=1e-6, atol=1e-6)
    assert new.target is target and view.node is new and old not in gm.graph.nodes
    assert new.meta["slimgraph_replaces"] == old.name
    assert new.meta["nn_module_stack"] == meta["nn_module_stack"]
    assert new.meta["stack_trace"] == meta["stack_trace"]
    assert view.module_path == "net.0"


def test_replace_with_is_live_after_recompile(mlp):
    """The check above could pass by running stale code; a wrong replacement must show."""
    model, (x,) = mlp
    gm = capture(model, (x,))
    view = find_all(gm, LinearView)[0]
    view.replace_with(linear_off_by_one, (view.input, view.weight_ref.node, view.bias_ref.node))
    gm.recompile()
    assert "linear_off_by_one" in gm.code
    assert not torch.allclose(gm(x), model(x))


def test_replace_with_on_a_call_module_linear(mlp):
    model, (x,) = mlp
    gm = fx.symbolic_trace(model)
    view = find_all(gm, LinearView)[-1]
    with gm.graph.inserting_before(view.node):
        weight, bias = gm.graph.get_attr(view.weight_ref.target), gm.graph.get_attr(view.bias_ref.target)
    view.replace_with(torch.ops.aten.linear.default, (view.input, weight, bias))
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["net.0", "net.1", "net.2", "net.4",
                                                                            "net.5"]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


# ---- what does not match -------------------------------------------------------------------------

class NearMisses(nn.Module):
    """Ops that look like the patterns but are not them: every view must answer None."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.bias = nn.Parameter(torch.zeros(10))
        self.weight = nn.Parameter(torch.randn(6, 10))
        self.deconv = nn.ConvTranspose1d(6, 6, 3)

    def forward(self, x, y, ids):
        activation_linear = F.linear(x, y[0])  # weight is an activation, not a constant
        channel_rms = self.scale * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6))  # not the last dim
        scores = torch.matmul(x, y.transpose(-2, -1))
        no_softmax = torch.matmul(scores.relu(), y)
        wrong_axis = torch.matmul(torch.softmax(scores, dim=1), y)  # softmax over the query axis
        tensor_scale = torch.matmul(torch.softmax(scores * x.sum(), dim=-1), y)
        looked_up = F.embedding(ids, y[0])  # table is an activation
        return (activation_linear, channel_rms, no_softmax, wrong_axis, tensor_scale, looked_up,
                self.deconv(x.transpose(1, 2)), torch.addmm(self.bias, x[0], self.weight, beta=0.5))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_near_misses_match_nothing(spell, spelling):
    model = NearMisses()
    args = (torch.randn(4, 6, 6), torch.randn(4, 6, 6), torch.randint(0, 6, (4, 3)))
    gm = spell(model, spelling, *args)
    assert list(iter_views(gm)) == []


@pytest.mark.parametrize("view_type", [LinearView, ConvView, NormView, EmbeddingView, AttentionView])
def test_placeholders_constants_and_outputs_are_not_views(mlp, view_type):
    model, args = mlp
    gm = capture(model, args)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            assert view_type.match(node) is None


def test_linear_matches_keyword_input(spell):
    class KeywordLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            return F.linear(input=x, weight=self.w)

    for spelling in ("dynamo", "symbolic_trace"):
        gm = spell(KeywordLinear(), spelling, torch.randn(2, 5))
        (view,) = find_all(gm, LinearView)
        assert view.input.op == "placeholder" and view.weight.shape == (3, 5)


class LeftScaledAttention(nn.Module):
    def forward(self, q, k, v):
        scores = 0.125 * torch.matmul(q, k.transpose(-1, -2))
        return torch.matmul(scores.softmax(-1), v)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_attention_scale_written_on_the_left(spell, spelling):
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    view = only(find_all(spell(LeftScaledAttention(), spelling, q, k, v), AttentionView))
    assert (view.kind, view.scale) == ("matmul_softmax", 0.125)
    if spelling != "symbolic_trace":  # plain symbolic_trace records no shapes
        assert view.num_heads == 4


def test_sdpa_reports_dropout_and_grouped_query_flags():
    class GroupedQuery(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, enable_gqa=True)

    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    view = only(find_all(capture(GroupedQuery(), (q, k, k)), AttentionView))
    assert (view.kind, view.dropout_p, view.enable_gqa, view.num_heads) == ("sdpa", 0.0, True, 4)


def test_a_view_built_from_a_node_matches_it_or_says_why():
    gm = capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval(), (torch.randn(2, 4),))
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    view = LinearView(linear)
    assert view.weight.shape == (3, 4) and view.input.op == "placeholder" and view.module_path == "0"
    relu = next(iter(linear.users))
    with pytest.raises(ValueError, match=r"node 'relu' \(aten.relu.default\) in module '1' .* is not a LinearView"):
        LinearView(relu)
