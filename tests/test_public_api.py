"""Public API is code: these signatures and the README's pass example are pinned."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

import slimgraph
from slimgraph import models
from slimgraph.ir import LinearView, find_all
from slimgraph.passes import PASS_REGISTRY, Pass, PassResult, register_pass


def _parameters(function) -> list[tuple[str, str]]:
    return [(p.name, p.kind.name) for p in inspect.signature(function).parameters.values()]


def test_optimize_signature():
    assert _parameters(slimgraph.optimize) == [
        ("model", "POSITIONAL_OR_KEYWORD"), ("passes", "POSITIONAL_OR_KEYWORD"),
        ("example_inputs", "POSITIONAL_OR_KEYWORD"), ("example_kwargs", "KEYWORD_ONLY"),
        ("calibration", "KEYWORD_ONLY"), ("tolerance", "KEYWORD_ONLY"), ("inplace", "KEYWORD_ONLY"),
        ("dynamic_shapes", "KEYWORD_ONLY"), ("instruments", "KEYWORD_ONLY"), ("strict", "KEYWORD_ONLY"),
        ("dump_dir", "KEYWORD_ONLY"),
    ]


def test_backend_and_capture_signatures():
    assert _parameters(slimgraph.backend) == [
        ("passes", "POSITIONAL_OR_KEYWORD"), ("then", "KEYWORD_ONLY"), ("tolerance", "KEYWORD_ONLY"),
        ("instruments", "KEYWORD_ONLY"), ("inductor_config", "KEYWORD_ONLY"),
    ]
    assert _parameters(slimgraph.capture) == [
        ("model", "POSITIONAL_OR_KEYWORD"), ("example_inputs", "POSITIONAL_OR_KEYWORD"),
        ("example_kwargs", "POSITIONAL_OR_KEYWORD"), ("dynamic_shapes", "POSITIONAL_OR_KEYWORD"),
        ("leaf_modules", "KEYWORD_ONLY"),
    ]


def test_save_and_load_signatures():
    assert _parameters(slimgraph.save) == [("model", "POSITIONAL_OR_KEYWORD"), ("path", "POSITIONAL_OR_KEYWORD")]
    assert _parameters(slimgraph.load) == [("path", "POSITIONAL_OR_KEYWORD")]
    assert {"save", "load"} <= set(slimgraph.__all__)


def test_readme_pass_example_runs():
    """The custom pass shown in the README, verbatim in substance."""

    @register_pass
    @dataclass(frozen=True)
    class CountLinears(Pass):
        name: ClassVar[str] = "count_linears"
        preserves: ClassVar[tuple[str, ...]] = ("shapes", "blocks", "costs", "dataflow")

        def run(self, gm, ctx):
            views = find_all(gm, LinearView)
            return PassResult(matched=len(views), notes=[f"{len(views)} linears in "
                              f"{len(ctx.analysis('blocks').main)} blocks"])

    try:
        model, inputs = models.bert(layers=2), {"input_ids": torch.randint(0, 128, (2, 8))}
        optimized = slimgraph.optimize(model, "cleanup, count_linears", example_kwargs=inputs, strict=True)
        record = optimized.report.records[1]
        assert (record.status, record.result.matched) == ("no change", 13)  # 6 per layer + pooler
        assert record.result.notes == ["13 linears in 2 blocks"]
        want = model(**inputs).last_hidden_state
        torch.testing.assert_close(optimized(**inputs).last_hidden_state, want, rtol=0, atol=0)
    finally:
        PASS_REGISTRY.pop("count_linears", None)
