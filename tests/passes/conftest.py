"""Fixtures for pass tests: registering test-only passes without leaking them."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from slimgraph.passes.manager import PASS_REGISTRY, register_pass


@pytest.fixture
def register():
    """``register(cls)`` registers a test-only pass; it leaves the registry at teardown."""
    names = []

    def register_for_test(cls):
        register_pass(cls)
        names.append(cls.name)
        return cls

    yield register_for_test
    for name in names:
        PASS_REGISTRY.pop(name, None)


@pytest.fixture
def traced():
    """``traced(model, x)``: ``symbolic_trace`` keeping ``call_module`` nodes, with placeholder values set."""

    def trace(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
        gm = fx.symbolic_trace(model)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, inputs, strict=True):
            node.meta["val"] = value
        return gm

    return trace
