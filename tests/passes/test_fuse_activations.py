"""fuse_activations: spelled-out GELU / SiLU / Mish become one ATen op; look-alikes stay."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.activations import FastGELUActivation, NewGELUActivation, QuickGELUActivation

import slimgraph
from slimgraph.ir.analyses import AnalysisManager
from slimgraph.passes.instruments import default_instruments
from slimgraph.passes.manager import PassContext, Pipeline
from slimgraph.passes.runner import run_pipeline

aten = torch.ops.aten
CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # one op instead of eight rounds differently in the last bits


class Between(nn.Module):
    """Linear → ``activation`` → Linear, so the activation's source is an intermediate node."""

    def __init__(self, activation):
        super().__init__()
        self.up, self.down, self.activation = nn.Linear(16, 32), nn.Linear(32, 16), activation

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


def erf_gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def cubed_tanh_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def silu(x):
    return x * torch.sigmoid(x)


def mish(x):
    return x * torch.tanh(F.softplus(x))


def method_silu(x):
    return x.sigmoid().mul(x)


SPELLINGS = [  # (activation, what it becomes)
    (NewGELUActivation(), "gelu_tanh"),  # GPT-2's gelu_new
    (FastGELUActivation(), "gelu_tanh"),  # x·0.7978845608·(1 + 0.044715·x²)
    (cubed_tanh_gelu, "gelu_tanh"),
    (erf_gelu, "gelu"),
    (silu, "silu"),
    (method_silu, "silu"),
    (mish, "mish"),
]
REPLACEMENT = {"gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}), "gelu": (aten.gelu.default, {}),
               "silu": (aten.silu.default, {}), "mish": (aten.mish.default, {})}


def fused_calls(gm) -> list[tuple]:
    return [(n.target, dict(n.kwargs)) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in {aten.gelu.default, aten.silu.default, aten.mish.default}]


def only_record(records):
    (record,) = records
    assert record.status == "applied", record.reason
    return record


@pytest.mark.parametrize(("activation", "name"), SPELLINGS, ids=lambda v: v if isinstance(v, str) else "")
def test_fuses_exported_spellings(activation, name):
    torch.manual_seed(0)
    model, x = Between(activation).eval(), torch.randn(3, 16)
    gm = slimgraph.optimize(model, "fuse_activations", (x,))
    record = only_record(gm.report.records)
    assert record.result.stats[name] == 1
    assert fused_calls(gm) == [REPLACEMENT[name]]
    assert not [n for n in gm.graph.nodes if n.target in {aten.tanh.default, aten.erf.default, aten.sigmoid.default}]
    torch.testing.assert_close(gm(x), model(x), **CLOSE)


@pytest.mark.parametrize(("activation", "name"), SPELLINGS, ids=lambda v: v if isinstance(v, str) else "")
def test_fuses_traced_spellings(traced, activation, name):
    """symbolic_trace graphs spell the same math with torch functions, ``operator`` and methods."""
    torch.manual_seed(0)
    model, x = Between(activation).eval(), torch.randn(3, 16)
    gm = traced(model, x)
    reference = model(x)
    ctx = PassContext(AnalysisManager(gm), (x,), reference_outputs=reference)
    record = only_record(run_pipeline(Pipeline.parse("fuse_activations"), gm, ctx, default_instruments()))
    assert record.result.stats[name] == 1
    torch.testing.assert_close(gm(x), reference, **CLOSE)


def test_fuses_in_dynamo_graphs():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Between(NewGELUActivation()).eval(), torch.randn(3, 16)
    be = slimgraph.backend("fuse_activations", then="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), **CLOSE)
    assert only_record(be.reports[0].records).result.stats["gelu_tanh"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("activation", [
    QuickGELUActivation(),  # x·σ(1.702x): close to GELU, not equal
    lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.04 * x ** 3))),  # another constant
    lambda x: x * torch.tanh(x),
    lambda x: torch.sigmoid(x) * 2.0,
], ids=["quick_gelu", "wrong_constant", "x_tanh", "scaled_sigmoid"])
def test_leaves_look_alikes(activation):
    torch.manual_seed(0)
    model, x = Between(activation).eval(), torch.randn(3, 16)
    gm = slimgraph.optimize(model, "fuse_activations", (x,))
    (record,) = gm.report.records
    assert (record.status, record.result.matched, fused_calls(gm)) == ("no change", 0, [])
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class SharedHalf(nn.Module):
    """GELU whose ``0.5 * x`` is also read outside it: that node must stay."""

    def forward(self, x):
        half = 0.5 * x
        return half * (1.0 + torch.erf(x * (1 / math.sqrt(2.0)))) + half


def test_keeps_intermediates_read_elsewhere():
    x = torch.randn(4, 8)
    gm = slimgraph.optimize(SharedHalf(), "fuse_activations", (x,))
    assert fused_calls(gm) == [REPLACEMENT["gelu"]]
    assert aten.mul.Tensor in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(gm(x), F.gelu(x) + 0.5 * x, **CLOSE)


def test_keeps_dtype_and_fuses_bf16():
    model, x = Between(NewGELUActivation()).eval().bfloat16(), torch.randn(3, 16, dtype=torch.bfloat16)
    gm = slimgraph.optimize(model, "fuse_activations", (x,), tolerance=1e-2)
    assert fused_calls(gm) == [REPLACEMENT["gelu_tanh"]]
    out = gm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x).float(), rtol=2e-2, atol=2e-2)


def test_gpt2_mlp_then_quantize_runs_one_gelu():
    """The benchmark's block: eight GELU ops and the dropout go, the two linears become nf4."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    model, x = GPT2MLP(128, GPT2Config(n_embd=64, resid_pdrop=0.0)).eval(), torch.randn(1, 64)
    gm = slimgraph.optimize(model, "cleanup, fuse_activations, quantize(format=nf4)", (x,))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.slimgraph.linear_nf4.default, aten.gelu.default,
                     torch.ops.slimgraph.linear_nf4.default]
    assert gm.report.records[1].output_error < 1e-6


# Spellings of one activation: operand order, constant forms and powers vary; the value does not.
_TANH_GELU = [
    lambda x, c, k: 0.5 * x * (1.0 + torch.tanh(c * (x + k * torch.pow(x, 3.0)))),
    lambda x, c, k: x * (torch.tanh((k * x ** 3 + x) * c) + 1) * 0.5,
    lambda x, c, k: (1 + torch.tanh(x * c * (1 + k * x * x))) * x / 2,
]
_ERF_GELU = [
    lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    lambda x: x * (torch.erf(x * 0.7071067811865476) + 1) / 2,
]
_SILU = [lambda x: x * torch.sigmoid(x), lambda x: torch.sigmoid(x) * x, lambda x: x / (1 + torch.exp(-x))]


class Spelled(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["gelu_tanh", "gelu", "silu"]), spelling=st.integers(0, 2),
       constant=st.sampled_from([math.sqrt(2 / math.pi), 0.7978845608, 0.79788456]),
       rows=st.integers(1, 4), scale=st.floats(0.1, 8.0))
def test_every_spelling_fuses_and_keeps_outputs(kind, spelling, constant, rows, scale):
    if kind == "gelu_tanh":
        function = _TANH_GELU[spelling]
        model = Spelled(lambda x: function(x, constant, 0.044715))
    else:
        functions = _ERF_GELU if kind == "gelu" else _SILU
        model = Spelled(functions[spelling % len(functions)])
    x = torch.randn(rows, 24) * scale
    gm = slimgraph.optimize(model, "fuse_activations", (x,))
    assert fused_calls(gm) == [REPLACEMENT[kind]]
    torch.testing.assert_close(gm(x), model(x), **CLOSE)
