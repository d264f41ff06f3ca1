"""fold_constants: what does not depend on the inputs is computed once, at compile time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_models import TransposedWeight

import slimgraph
from slimgraph import models
from slimgraph.errors import PipelineError
from slimgraph.ir.capture import capture

aten = torch.ops.aten
# A folded value is computed by the same kernels as at run time, but it is stored contiguous:
# a matmul then reads a differently laid-out operand, which may round differently.
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def folded_buffers(gm) -> dict[str, torch.Tensor]:
    """``{name of the node it replaces: value}`` for every buffer fold_constants created."""
    return {n.meta["slimgraph_replaces"]: gm.get_buffer(n.target) for n in gm.graph.nodes
            if n.op == "get_attr" and "slimgraph_replaces" in n.meta}


def input_dependent(gm) -> set[str]:
    """Names of the nodes whose value depends on an input."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a.name in names for a in node.all_input_nodes):
            names.add(node.name)
    return names - {"output"}


def fold(model, inputs, passes="fold_constants"):
    """Optimize with ``passes``; return the module and the record of the last pass."""
    gm = slimgraph.optimize(model, passes, inputs)
    return gm, gm.report.records[-1]


def test_folds_transposed_weight_and_frees_the_original():
    model, x = TransposedWeight(), torch.randn(4, 16)
    gm, record = fold(model, (x,))
    assert record.status == "applied"
    assert aten.t.default not in targets(gm)
    (value,) = folded_buffers(gm).values()
    assert torch.equal(value, model.w.t()) and value.is_contiguous()
    assert not hasattr(gm, "w")
    assert record.result.stats["freed_tensors"] == 1
    torch.testing.assert_close(gm(x), model(x), **CLOSE)


class SharedWeight(TransposedWeight):
    def forward(self, x):
        return x @ self.w.t() + torch.nn.functional.linear(x, self.w)


def test_a_view_of_a_weight_the_graph_still_reads_is_not_stored_twice():
    """Folding ``w.t()`` while ``linear(x, w)`` keeps ``w`` would hold the weight twice in memory."""
    model, x = SharedWeight(), torch.randn(4, 16)
    gm, record = fold(model, (x,))
    assert record.status == "no change"
    assert aten.t.default in targets(gm)
    assert gm.get_parameter("w") is not None and folded_buffers(gm) == {}
    torch.testing.assert_close(gm(x), model(x), **CLOSE)


class RepeatedTables(nn.Module):
    """Each layer recomputes the same table, as Llama's rotary embedding does per call."""

    def forward(self, x):
        first = torch.arange(16).float().sin()
        second = torch.arange(16).float().sin()
        return x * first + x * second.cos()


def test_equal_folded_values_share_one_buffer():
    model, x = RepeatedTables(), torch.randn(4, 16)
    gm, record = fold(model, (x,), "cleanup, fold_constants")  # cleanup drops the dtype asserts on arange
    assert record.result.stats["buffers"] == 2  # sin table (used twice) and its cos
    assert len(folded_buffers(gm)) == 2
    torch.testing.assert_close(gm(x), model(x), **CLOSE)


class Generated(nn.Module):
    def forward(self, x):
        return x + torch.arange(16).float() * 0.5 + torch.full((16,), 2.0).exp()


def test_folds_arange_and_full_derived_tensors():
    model, x = Generated(), torch.randn(4, 16)
    gm, record = fold(model, (x,), "cleanup, fold_constants")
    for op in (aten.arange.default, aten.full.default, aten.exp.default, aten.mul.Tensor):
        assert op not in targets(gm)
    assert targets(gm) == [aten.add.Tensor, aten.add.Tensor]
    torch.testing.assert_close(gm(x), model(x), **CLOSE)


class Unfoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        padded = torch.cat([x, torch.empty(4, 0)], dim=1)
        noisy = padded + torch.rand(16) * self.w.sum()
        return noisy, x @ (self.w * 2).unsqueeze(0).expand(3, 16, 16)


def test_does_not_fold_random_empty_input_dependent_or_expanded_values():
    model, x = Unfoldable(), torch.randn(4, 16)
    with torch.no_grad():
        before = capture(model, (x,))
    gm, record = fold(model, (x,))
    assert record.status == "applied"
    kept = targets(gm)
    assert aten.rand.default in kept
    assert aten.empty.memory_format in kept
    assert kept.count(aten.expand.default) == 1
    assert input_dependent(before) <= {n.name for n in gm.graph.nodes}
    buffers = folded_buffers(gm)
    assert set(buffers) == {"sum_1", "unsqueeze"}  # w.sum() and (w * 2).unsqueeze(0), not the expand
    assert buffers["unsqueeze"].shape == (1, 16, 16)
    torch.manual_seed(1)
    reference = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(gm(x), reference, **CLOSE)


class RandomInForward(nn.Module):
    def forward(self, x):
        return x + torch.rand(x.shape[-1]) + torch.randn(3).sum()


def test_random_values_are_drawn_at_every_call():
    model, x = RandomInForward(), torch.randn(2, 5)
    gm, record = fold(model, (x,))
    assert record.status == "no change"
    assert not torch.equal(gm(x), gm(x))


@pytest.mark.parametrize(("max_bytes", "folded"), [(8 * 16 * 4, True), (8 * 16 * 4 - 1, False)])
def test_values_larger_than_max_bytes_are_not_folded(max_bytes, folded):
    model, x = TransposedWeight(), torch.randn(4, 16)
    gm, record = fold(model, (x,), f"fold_constants(max_bytes={max_bytes})")
    assert (aten.t.default not in targets(gm)) == folded
    assert record.status == ("applied" if folded else "no change")
    assert hasattr(gm, "w") != folded


def test_max_bytes_must_be_positive():
    with pytest.raises(PipelineError, match="max_bytes must be positive"):
        slimgraph.optimize(TransposedWeight(), "fold_constants(max_bytes=-1)", (torch.randn(4, 16),))


def test_folds_llama_rotary_cos_and_sin():
    model = models.llama()
    input_ids = torch.randint(0, 128, (2, 12))
    gm = slimgraph.optimize(model, "cleanup, fold_constants", example_kwargs={"input_ids": input_ids})
    assert [r.status for r in gm.report.records] == ["applied", "applied"]
    assert not {aten.cos.default, aten.sin.default} & set(targets(gm))
    assert "rotary_emb.inv_freq" not in dict(gm.named_buffers())
    position_ids = torch.arange(12)[None]
    cos, sin = model.rotary_emb(torch.zeros(1), position_ids)
    folded = list(folded_buffers(gm).values())
    for table in (cos, sin):
        assert any(v.shape == (1, 1, 12, 16) and torch.equal(v, table.unsqueeze(1)) for v in folded)
    torch.testing.assert_close(gm(input_ids=input_ids).last_hidden_state,
                               model(input_ids=input_ids).last_hidden_state, **CLOSE)


def test_folds_gpt2_position_embeddings():
    model = models.gpt2()
    input_ids = torch.randint(0, 128, (2, 12))
    gm = slimgraph.optimize(model, "cleanup, fold_constants", example_kwargs={"input_ids": input_ids})
    assert gm.report.records[1].status == "applied"
    assert "wpe.weight" not in gm.state_dict()  # only the folded position lookup read it
    folded = list(folded_buffers(gm).values())
    assert any(v.shape == (1, 12, 64) and torch.equal(v, model.wpe.weight[:12][None]) for v in folded)
    torch.testing.assert_close(gm(input_ids=input_ids).last_hidden_state,
                               model(input_ids=input_ids).last_hidden_state, **CLOSE)


def test_folding_in_dynamo_graphs_reads_frozen_parameters():
    torch._dynamo.reset()
    model, x = TransposedWeight(), torch.randn(4, 16)
    be = slimgraph.backend("fold_constants", then="eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x), **CLOSE)
    (record,) = be.reports[0].records
    assert record.status == "applied"
    assert record.result.stats == {"constant_nodes": 1, "buffers": 1, "freed_tensors": 1}
    torch._dynamo.reset()


def test_normalize_is_folded_but_normal_sampling_is_not():
    """`F.normalize` is deterministic; only names that *are* random ops (normal, rand…) stay."""

    class Cosine(nn.Module):
        def __init__(self):
            super().__init__()
            self.prototypes = nn.Parameter(torch.randn(5, 8))

        def forward(self, x):
            return F.normalize(x, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()

    model = Cosine().eval()
    x = torch.randn(3, 8)
    optimized = slimgraph.optimize(model, "fold_constants", (x,), strict=True)
    assert optimized.report.records[0].status == "applied"
    torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-6)
