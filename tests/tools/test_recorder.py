"""The dump recorder: the JSON Lines trace every view is rendered from."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.export import Dim

import slimgraph
from slimgraph import models
from slimgraph.tools.dump import load_trace


class DropoutAndTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(x @ self.w.t())


def dump(model, args, tmp_path, passes="cleanup, fold_constants", **kwargs):
    optimized = slimgraph.optimize(model, passes, args, dump_dir=tmp_path, **kwargs)
    return optimized, load_trace(tmp_path / "trace.jsonl")


def test_trace_has_a_run_line_and_one_line_per_pass(tmp_path):
    _, trace = dump(DropoutAndTranspose().eval(), (torch.randn(4, 16),), tmp_path)
    assert trace.header["pipeline"] == "cleanup, fold_constants"
    assert trace.header["capture"]["strategy"] == "export"
    assert [p["name"] for p in trace] == ["cleanup", "fold_constants"]
    assert [p["status"] for p in trace] == ["applied", "applied"]
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["run", "pass", "pass"]


def test_pass_lines_say_what_changed_with_provenance(tmp_path):
    _, trace = dump(DropoutAndTranspose().eval(), (torch.randn(4, 16),), tmp_path)
    cleanup, fold = trace.passes
    assert cleanup["removed"] == ["dropout"] and cleanup["added"] == []
    assert cleanup["stats"]["dropout"] == 1
    assert fold["replaced"] == [{"old": "t", "new": "_folded_0"}]
    assert set(fold["removed"]) == {"w", "t"}
    folded = next(n for n in fold["graph"]["nodes"] if n["name"] == "_folded_0")
    assert (folded["op"], folded["shape"], folded["dtype"], folded["provenance"]) == \
        ("get_attr", [16, 8], "torch.float32", "t")
    assert fold["totals_before"]["nodes"] - fold["totals_after"]["nodes"] == 1
    assert trace.graph_before(1) == cleanup["graph"] and trace.graph_after(1) == fold["graph"]


def test_nodes_carry_module_path_source_line_and_cost(tmp_path):
    model = models.bert(layers=2)
    _, trace = dump(model, (), tmp_path, example_kwargs={"input_ids": torch.randint(0, 128, (2, 8))})
    query = next(n for n in trace.header["graph"]["nodes"]
                 if n["module_path"] == "encoder.layer.0.attention.self.query" and n["op"] == "call_function")
    assert query["kernel"] == "aten.linear.default"
    assert query["flops"] == 2 * 2 * 8 * 64 * 64
    assert query["bytes"] == 4 * (2 * 8 * 64 + 64 * 64 + 64 + 2 * 8 * 64)
    assert "modeling_bert.py" in query["source"]
    assert ["encoder.layer.0", "transformers.models.bert.modeling_bert.BertLayer"] in query["module_stack"]


def test_symbolic_costs_are_written_as_text(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    _, trace = dump(model, (torch.randn(4, 16),), tmp_path, passes="cleanup",
                    dynamic_shapes=({0: Dim("batch")},))
    linear = next(n for n in trace.header["graph"]["nodes"] if n["kernel"] == "aten.linear.default")
    assert linear["flops"] == "256*batch" and linear["shape"] == ["batch", 8]


def test_a_rolled_back_pass_records_an_unchanged_graph(tmp_path):
    optimized, trace = dump(DropoutAndTranspose().eval(), (torch.randn(4, 16),), tmp_path,
                            passes="cleanup, fold_constants(max_bytes=1)")
    cleanup, fold = trace.passes
    assert fold["status"] == "no change" and fold["graph"] == cleanup["graph"]
    assert fold["added"] == fold["removed"] == [] and fold["options"] == {"max_bytes": 1}


@pytest.mark.parametrize(("text", "message"), [
    ("", "is not a slimgraph trace"),
    ('{"kind": "pass"}\n', "is not a slimgraph trace"),
    ('{"kind": "run", "version": 99}\n', "has trace format version 99; this slimgraph reads version 1"),
])
def test_load_trace_rejects_other_files(tmp_path, text, message):
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_trace(path)
