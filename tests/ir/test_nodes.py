"""nodes.py: one answer for module paths, source lines and op names, whatever the graph's origin."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimgraph.ir import LinearView, capture, find_all
from slimgraph.ir.nodes import (
    get_attr_value,
    module_path,
    module_stack,
    node_value,
    normalize_module_path,
    op_name,
    user_source_line,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ("L['self'].encoder.layer[0]", "encoder.layer.0"),
    ("L['self']._modules['encoder']._modules['layer']._modules['0']", "encoder.layer.0"),
    ("L['self'].encoder.layer[0]._modules['attention']", "encoder.layer.0.attention"),
    ('L["self"].h[11].attn', "h.11.attn"),
    ("L['mod'].layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj"),
    ("L['self']", ""),
    ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query"),  # torch.export
    ("", ""),
])
def test_normalize_module_path(raw, expected):
    assert normalize_module_path(raw) == expected


_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda n: n not in ("modules", "parameters", "buffers"))
_PARTS = st.lists(st.one_of(_NAMES, st.integers(0, 99).map(str)), min_size=1, max_size=6)


@st.composite
def spelled_paths(draw):
    """A dotted path and one random Dynamo/export spelling of it."""
    parts = draw(_PARTS)
    text = draw(st.sampled_from(["L['self']", 'L["self"]', "L['mod']", ""]))
    for index, part in enumerate(parts):
        choices = ["._modules['{}']"]
        if index or text:
            choices.append(".{}")
        else:
            choices.append("{}")
        if part.isdigit():
            choices.append("[{}]")
        text += draw(st.sampled_from(choices)).format(part)
    return ".".join(parts), text


@given(spelled_paths())
def test_every_spelling_normalizes_to_the_dotted_path(case):
    dotted, spelled = case
    assert normalize_module_path(spelled) == dotted


def _first_linear(gm: fx.GraphModule) -> fx.Node:
    return find_all(gm, LinearView)[0].node


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        return self.inner(x) * 2


def test_module_path_and_stack_from_export():
    gm = capture(Doubler(), (torch.randn(2, 4),))
    linear = _first_linear(gm)
    assert module_path(linear) == "inner.0"
    assert module_stack(linear) == [("inner", "torch.nn.modules.container.Sequential"),
                                    ("inner.0", "torch.nn.modules.linear.Linear")]
    mul = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    assert module_path(mul) == ""  # traced in the root module


def test_module_path_from_dynamo(spell):
    gm = spell(Doubler(), "dynamo", torch.randn(2, 4))
    linear = _first_linear(gm)
    raw = [path for path, _ in linear.meta["nn_module_stack"].values()]
    assert raw[-1].startswith("L['self']")  # Dynamo's spelling, not the dotted one
    assert module_path(linear) == "inner.0"
    assert [path for path, _ in module_stack(linear)] == ["inner", "inner.0"]


def test_module_path_of_call_module_nodes():
    gm = fx.symbolic_trace(Doubler())
    linear = _first_linear(gm)
    assert linear.op == "call_module" and module_path(linear) == "inner.0"


def test_guard_call_is_not_inside_the_module_that_follows_it():
    """torch.export's ``_guards_fn`` call carries the module stack of the node after it."""
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    guard = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert any(path == "0" for path, _ in guard.meta["nn_module_stack"].values())
    assert module_stack(guard) == [("_guards_fn", "")]


def test_user_source_line_picks_the_users_frame():
    gm = capture(Doubler(), (torch.randn(2, 4),))
    lines, first = inspect.getsourcelines(Doubler.forward)
    line = first + next(i for i, text in enumerate(lines) if "self.inner(x) * 2" in text)
    assert user_source_line(_first_linear(gm)) == f"test_nodes.py:{line} `return self.inner(x) * 2`"


def _node_with_trace(trace: str) -> fx.Node:
    node = fx.Graph().placeholder("x")
    node.meta["stack_trace"] = trace
    return node


TORCH_FRAMES = """\
  File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1775, in _call_impl
    return forward_call(*args, **kwargs)
  File "/venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 134, in forward
    return F.linear(input, self.weight, self.bias)
"""


@pytest.mark.parametrize(("trace", "expected"), [
    ('  File "/home/me/model.py", line 12, in forward\n    y = self.proj(x)\n' + TORCH_FRAMES,
     "model.py:12 `y = self.proj(x)`"),
    ('  File "/home/me/run.py", line 3, in <module>\n    model(x)\n'
     '  File "/home/me/model.py", line 12, in forward\n    y = self.proj(x)\n', "model.py:12 `y = self.proj(x)`"),
    (TORCH_FRAMES, "linear.py:134 `return F.linear(input, self.weight, self.bias)`"),  # torch only: last frame
    ('  File "/home/me/model.py", line 12, in forward\n    y = self.proj(x)\n'
     '  File "<string>", line 2, in helper\n' + TORCH_FRAMES, "<string>:2"),  # exec'd code has no source line
    ("", ""),
])
def test_user_source_line_from_stack_traces(trace, expected):
    assert user_source_line(_node_with_trace(trace)) == expected


def test_op_name_for_every_kind_of_node():
    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = [graph.call_function(torch.ops.aten.linear.default, (x, x)), graph.call_function(torch.relu, (x,)),
             graph.call_method("view", (x, -1)), graph.call_module("encoder.0", (x,)), graph.get_attr("w")]
    assert [op_name(n) for n in nodes] == ["aten.linear.default", "torch.relu", ".view", "module encoder.0",
                                           "get_attr w"]


def test_get_attr_value_and_node_value():
    root = nn.Module()
    root.encoder = nn.Sequential(nn.Linear(2, 3))
    assert get_attr_value(root, "encoder.0.weight") is root.encoder[0].weight
    node = fx.Graph().placeholder("x")
    assert node_value(node) is None
    node.meta["example_value"] = "dynamo"
    assert node_value(node) == "dynamo"
    node.meta["val"] = "export"
    assert node_value(node) == "export"


def test_a_weight_read_belongs_to_the_module_owning_the_weight():
    gm = capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(1, 4),))
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "0.weight")
    assert module_path(weight) == "0"
