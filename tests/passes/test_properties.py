"""Property tests: random small models keep their outputs through cleanup and fold_constants.

Each model is a random stack of MLP, attention or conv layers interleaved with what the
passes rewrite: dropout, identities, no-op views, and constant subexpressions
(``self.w.t()``, ``torch.ones(...) * 2``, a causal mask from ``torch.ones(...).tril()``),
and with what they must leave alone (a copy that an in-place ReLU then writes into).
Both entry points are checked: ``optimize()`` (torch.export graphs) and the
``torch.compile`` backend (Dynamo graphs).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import slimgraph

PASSES = ["cleanup", "fold_constants", "cleanup, fold_constants", "cleanup, fuse_activations"]
# Folded values are stored contiguous, so a matmul may read them in another layout and round
# differently in the last bits; nothing else changes the arithmetic.
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


class SequenceStack(nn.Module):
    """``(batch, tokens, width)`` → same; each entry of ``spec`` is one layer."""

    def __init__(self, width: int, spec: tuple):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(_sequence_layer(kind, width, arg) for kind, arg in spec)

    def forward(self, x):
        for (kind, arg), layer in zip(self.spec, self.layers, strict=True):
            x = _apply_sequence_layer(kind, arg, layer, x)
        return torch.tanh(x)  # at least one op, so that Dynamo has a graph to compile


def _sequence_layer(kind: str, width: int, arg) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, width)
    if kind == "transposed":
        holder = nn.Module()
        holder.w = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        return holder
    if kind == "attention":
        return nn.Linear(width, 3 * width)
    if kind == "dropout":
        return nn.Dropout(arg)
    if kind == "norm":
        return nn.LayerNorm(width)
    if kind == "inplace_residual":
        return nn.ReLU(inplace=True)
    return nn.Identity()


def _apply_sequence_layer(kind: str, arg, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, width = x.shape
    if kind in ("linear", "dropout", "identity", "norm"):
        return layer(x)
    if kind == "transposed":
        return torch.relu(x @ layer.w.t())
    if kind == "constant":
        return x * (torch.ones(width) * 2) + torch.arange(width).float() / width
    if kind == "noop_view":
        return _noop_view(arg, x)
    if kind == "inplace_residual":  # the clone looks like a no-op copy, but the ReLU writes into it
        return x + layer(x.clone())
    if kind == "attention":
        heads = arg
        q, k, v = layer(x).view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(tokens, tokens).tril().bool()
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // heads)
        attended = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return x + attended.transpose(1, 2).reshape(batch, tokens, width)
    raise AssertionError(kind)


def _noop_view(variant: int, x: torch.Tensor) -> torch.Tensor:
    if variant == 0:
        return x.view(x.shape)
    if variant == 1:
        return x.reshape(x.shape[0], x.shape[1], -1)
    if variant == 2:
        return x.expand(x.shape).contiguous()
    return x.to(torch.float32).clone()


class ConvStack(nn.Module):
    """``(batch, channels, height, width)`` images through convolutions, dropout and no-op views."""

    def __init__(self, channels: int, spec: tuple):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(
            nn.Conv2d(channels, channels, arg, padding=arg // 2) if kind == "conv"
            else nn.Dropout2d(arg) if kind == "dropout" else nn.Identity()
            for kind, arg in spec)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        for (kind, arg), layer in zip(self.spec, self.layers, strict=True):
            if kind == "conv":
                x = torch.relu(layer(x))
            elif kind == "noop_view":
                x = _noop_view(arg, x.flatten(2)).view(x.shape)
            elif kind == "constant":
                x = x + (self.bias * torch.ones(1) * 2).view(1, -1, 1, 1)
            else:
                x = layer(x)
        return torch.tanh(x)


_SEQUENCE_LAYERS = st.one_of(
    st.tuples(st.sampled_from(["linear", "transposed", "identity", "constant", "norm"]), st.none()),
    st.tuples(st.just("inplace_residual"), st.none()),
    st.tuples(st.just("dropout"), st.sampled_from([0.0, 0.1, 0.5])),
    st.tuples(st.just("noop_view"), st.integers(0, 3)),
    st.tuples(st.just("attention"), st.sampled_from([1, 2, 4])),
)
_CONV_LAYERS = st.one_of(
    st.tuples(st.just("conv"), st.sampled_from([1, 3, 5])),
    st.tuples(st.just("dropout"), st.sampled_from([0.1, 0.5])),
    st.tuples(st.sampled_from(["identity", "constant"]), st.none()),
    st.tuples(st.just("noop_view"), st.integers(0, 3)),
)


@st.composite
def models_and_inputs(draw):
    """``(model in eval mode, (input,))`` for a random small MLP/attention or conv stack."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        width = draw(st.sampled_from([4, 8, 12]))
        spec = tuple(draw(st.lists(_SEQUENCE_LAYERS, min_size=1, max_size=6)))
        model = SequenceStack(width, spec)
        x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 6)), width)
    else:
        channels = draw(st.integers(1, 4))
        spec = tuple(draw(st.lists(_CONV_LAYERS, min_size=1, max_size=5)))
        model = ConvStack(channels, spec)
        x = torch.randn(draw(st.integers(1, 2)), channels, draw(st.integers(3, 8)), draw(st.integers(3, 8)))
    return model.eval(), (x,)


def _known_hard_case():
    """Linear, then a copy an in-place ReLU writes into: removing the copy would corrupt the residual."""
    torch.manual_seed(0)
    model = SequenceStack(8, (("linear", None), ("inplace_residual", None), ("dropout", 0.1)))
    return model.eval(), (torch.randn(2, 3, 8),)


def assert_no_rollback(report):
    # A rolled-back pass leaves outputs equal too: it would hide a broken rewrite.
    assert not report.rolled_back, [(r.pass_text, r.reason) for r in report.rolled_back]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=models_and_inputs(), passes=st.sampled_from(PASSES))
@example(case=_known_hard_case(), passes="cleanup")
def test_optimize_keeps_outputs(case, passes):
    model, inputs = case
    reference = model(*inputs)
    optimized = slimgraph.optimize(model, passes, inputs)
    assert_no_rollback(optimized.report)
    torch.testing.assert_close(optimized(*inputs), reference, **CLOSE)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=models_and_inputs(), passes=st.sampled_from(PASSES))
@example(case=_known_hard_case(), passes="cleanup")
def test_compile_backend_keeps_outputs(fresh_dynamo, case, passes):
    torch._dynamo.reset()  # every example is a new model; stay clear of Dynamo's recompile limit
    model, inputs = case
    reference = model(*inputs)
    be = slimgraph.backend(passes, then="eager")
    with torch.no_grad():
        outputs = torch.compile(model, backend=be)(*inputs)
    assert len(be.reports) == 1
    assert_no_rollback(be.reports[0])
    torch.testing.assert_close(outputs, reference, **CLOSE)


def test_generated_models_exercise_every_rewrite():
    """The generators are worth running only if the passes find something to do in them."""
    torch.manual_seed(0)
    spec = (("dropout", 0.1), ("identity", None), ("noop_view", 0), ("transposed", None),
            ("constant", None), ("attention", 2), ("noop_view", 1))
    model, x = SequenceStack(8, spec).eval(), torch.randn(2, 5, 8)
    cleanup, fold = slimgraph.optimize(model, "cleanup, fold_constants", (x,)).report.records
    assert cleanup.result.stats["dropout"] == 1
    assert cleanup.result.stats["no-op view"] >= 2
    assert fold.result.stats["buffers"] >= 3  # w.t(), ones * 2 (+ arange / width), the causal mask
    conv = ConvStack(3, (("conv", 3), ("dropout", 0.1), ("noop_view", 2), ("constant", None))).eval()
    cleanup, fold = slimgraph.optimize(conv, "cleanup, fold_constants", (torch.randn(1, 3, 6, 6),)).report.records
    assert cleanup.result.stats["dropout"] == 1 and fold.result.stats["buffers"] >= 1
