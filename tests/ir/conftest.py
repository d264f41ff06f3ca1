"""Graphs in the spellings the IR must read, for the tests of ``slimgraph.ir``.

``exported(name)`` is ``capture()`` (torch.export) of a small Hugging Face model; ``dynamo(name)``
is the graph Dynamo hands a backend, parameters frozen to ``get_attr`` exactly as the slimgraph
backend does. Both are built once per session and shared: a test that mutates a graph builds
its own with ``spell``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn

from slimgraph import models
from slimgraph.backend import freeze_parameters
from slimgraph.ir import capture

LAYERS = 3  # not the factories' default of 2, so a block count cannot pass by accident


def dynamo_graph(model: nn.Module, *args: Any, **kwargs: Any) -> fx.GraphModule:
    """The single graph ``torch.compile`` captures, parameters frozen to ``get_attr`` constants."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(*args, **kwargs)
    gm, example_inputs = graphs[0]
    return freeze_parameters(gm, example_inputs)[0]


def spell_graph(model: nn.Module, spelling: str, *args: Any) -> fx.GraphModule:
    """``model`` as an ATen graph (export), a torch-level graph (Dynamo) or a call_module graph (fx)."""
    if spelling == "export":
        return capture(model, args)
    if spelling == "dynamo":
        return dynamo_graph(model, *args)
    if spelling == "symbolic_trace":
        return fx.symbolic_trace(model)
    raise ValueError(f"unknown spelling {spelling!r}")


def hf_model(name: str, attn: str = "sdpa") -> nn.Module:
    if name == "gpt2":  # the factory has no attn_implementation; GPT-2 reads it at call time
        model = models.gpt2(layers=LAYERS)
        model.config._attn_implementation = attn
        return model
    return getattr(models, name)(layers=LAYERS, attn_implementation=attn)


def _session_cache(build: Callable[[nn.Module, dict], fx.GraphModule]) -> Callable:
    cache: dict = {}

    def get(name: str, attn: str = "sdpa"):
        if (name, attn) not in cache:
            model = hf_model(name, attn)
            inputs = {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))}
            cache[name, attn] = model, inputs, build(model, inputs)
        return cache[name, attn]

    return get


@pytest.fixture(scope="session")
def spell():
    return spell_graph


@pytest.fixture(scope="session")
def exported():
    """``exported("bert", attn="eager") -> (model, kwargs, gm)`` via ``capture()``; read-only."""
    return _session_cache(lambda model, inputs: capture(model, (), inputs))


@pytest.fixture(scope="session")
def dynamo():
    """``dynamo("gpt2") -> (model, kwargs, gm)``: the Dynamo graph, parameters frozen; read-only."""
    return _session_cache(lambda model, inputs: dynamo_graph(model, **inputs))


@pytest.fixture(params=["export", "dynamo"])
def graph_of(request, exported, dynamo):
    """``exported`` or ``dynamo``: a test using it runs on both spellings."""
    return exported if request.param == "export" else dynamo
