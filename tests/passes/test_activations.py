"""input_statistics: what a node's input looked like over the calibration batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph import models
from slimgraph.ir.nodes import module_path
from slimgraph.ir.views import LinearView
from slimgraph.passes.activations import gram, input_statistics, squared_column_norms


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def linear_nodes(gm):
    return [node.name for node in gm.graph.nodes if LinearView.match(node)]


def test_gram_and_norms_equal_the_direct_computation_over_all_batches():
    model, batches = TwoLinears().eval(), [torch.randn(3, 5, 8) for _ in range(3)]
    gm = slimgraph.optimize(model, "cleanup", (batches[0],))
    first, second = linear_nodes(gm)
    calibration = [((x,), {}) for x in batches]
    grams = input_statistics(gm, [first, second], calibration, gram)
    rows = torch.cat([x.reshape(-1, 8) for x in batches]).double()
    torch.testing.assert_close(grams[first], rows.T @ rows)
    hidden = torch.cat([torch.relu(model.first(x)).reshape(-1, 16) for x in batches]).detach().double()
    torch.testing.assert_close(grams[second], hidden.T @ hidden)
    norms = input_statistics(gm, [second], calibration, squared_column_norms)
    torch.testing.assert_close(norms[second], hidden.pow(2).sum(0))


def test_keyword_inputs_of_exported_hugging_face_graphs():
    model = models.bert(layers=1, hidden=64)
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gm = slimgraph.optimize(model, "cleanup", example_kwargs=batch)
    names = linear_nodes(gm)
    reordered = {"attention_mask": batch["attention_mask"], "input_ids": batch["input_ids"]}
    grams = input_statistics(gm, names, [((), reordered)], gram)
    assert set(grams) == set(names)
    assert all(value.shape[0] == value.shape[1] and value.dtype == torch.float64 for value in grams.values())


def test_unknown_node_is_named():
    gm = slimgraph.optimize(TwoLinears().eval(), "cleanup", (torch.randn(2, 8),))
    with pytest.raises(KeyError, match="no node named nope"):
        input_statistics(gm, ["nope"], [((torch.randn(2, 8),), {})], gram)



def test_gpt2_conv1d_addmm_records_its_input_not_its_bias():
    """GPT-2's Conv1D is ``addmm(bias, x, W)``: the statistic is over ``x`` (regression: was the bias)."""
    model = models.gpt2(layers=1, hidden=64)
    ids = torch.randint(0, 100, (2, 8))
    gm = slimgraph.optimize(model, "cleanup", (ids,))
    c_fc = next(node.name for node in gm.graph.nodes if LinearView.match(node) and module_path(node).endswith("mlp.c_fc"))
    inputs = []
    hook = model.h[0].mlp.c_fc.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    try:
        model(ids)
    finally:
        hook.remove()
    grams = input_statistics(gm, [c_fc], [((ids,), {})], gram)
    rows = inputs[0].reshape(-1, 64).detach().double()
    torch.testing.assert_close(grams[c_fc], rows.T @ rows)
