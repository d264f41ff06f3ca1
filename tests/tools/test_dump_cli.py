"""The `slimgraph dump` command: each format's files, .pt2 input, the compile path, and its errors."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.tools.cli import load_model_spec, main
from slimgraph.tools.dump import load_trace
from slimgraph.tools.dump.text import render_text

MODEL = "tests.tools.factories:scaled_mlp"
PASSES = "cleanup, fold_constants"


def dump(tmp_path, *extra):
    return main(["dump", MODEL, "--passes", PASSES, "--out", str(tmp_path / "out"), *extra])


def test_text_format_prints_and_writes_the_dump(tmp_path, capsys):
    assert dump(tmp_path) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "out" / "dump.txt").read_text()
    assert "[1] fold_constants: applied" in text and text in out
    assert (tmp_path / "out" / "trace.jsonl").is_file()


def test_only_changed(tmp_path, capsys):
    assert main(["dump", MODEL, "--passes", "cleanup, cleanup", "--out", str(tmp_path), "--only-changed"]) == 0
    text = (tmp_path / "dump.txt").read_text()
    assert "[0] cleanup: applied" in text and "[1]" not in text


def test_dot_format_writes_dot_and_svg_per_pass(tmp_path, monkeypatch, capsys):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed")
    assert dump(tmp_path, "--format", "dot") == 0
    names = sorted(p.name for p in (tmp_path / "out" / "dot").iterdir())
    assert names == ["00_cleanup.dot", "00_cleanup.svg", "01_fold_constants.dot", "01_fold_constants.svg"]
    assert not (tmp_path / "out" / "dump.txt").exists()


def test_dot_format_without_graphviz_warns_and_keeps_dot_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert dump(tmp_path, "--format", "dot") == 0
    assert "install Graphviz: apt-get install graphviz" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.suffix for p in (tmp_path / "out" / "dot").iterdir()) == [".dot", ".dot"]


def test_html_format_calls_write_html_with_the_trace(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("slimgraph.tools.dump.html")
    fake.write_html = lambda trace, path: calls.append((trace, path)) or path.write_text("<html></html>")
    monkeypatch.setitem(sys.modules, "slimgraph.tools.dump.html", fake)
    assert dump(tmp_path, "--format", "text,html") == 0
    ((trace, path),) = calls
    assert path == tmp_path / "out" / "dump.html" and [p["name"] for p in trace.passes] == ["cleanup", "fold_constants"]
    assert (tmp_path / "out" / "dump.txt").is_file()


def test_exported_program_round_trip(tmp_path, capsys):
    model, args, _ = load_model_spec(MODEL)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, args), path)
    assert main(["dump", str(path), "--passes", PASSES, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "dump.txt").read_text()
    assert "[0] cleanup: applied" in text and "[1] fold_constants: applied" in text
    assert "output error 0\n" in text


@pytest.mark.parametrize(("spec", "message"), [
    ("nonsense", "neither 'minilm' nor 'package.module:factory'"),
    ("tests.tools.factories:missing", "has no function 'missing'"),
    ("tests.tools.factories:not_a_pair", "must return (nn.Module, example_inputs)"),
    ("no/such/model.pt2", "'no/such/model.pt2': no such file"),
])
def test_bad_model_is_a_clear_error(tmp_path, capsys, spec, message):
    assert main(["dump", spec, "--out", str(tmp_path)]) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_file_that_is_not_an_exported_program_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "model.pt2"
    path.write_text("not a program")
    assert main(["dump", str(path), "--out", str(tmp_path / "out")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "is not a torch.export program" in out and "torch.export.save" in out


def test_unknown_format_lists_the_valid_ones(tmp_path, capsys):
    assert dump(tmp_path, "--format", "text,pdf") == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "unknown --format 'pdf'" in out and "choose from text, dot, html" in out


def test_unwritable_output_dir_fails_before_running(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["dump", "nonsense", "--out", str(tmp_path / "file" / "out")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "cannot write the dump to" in out and "pass --out with a directory you can write to" in out


class TwoHalves(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2))
        self.second = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.2))

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_compile_backend_dumps_one_trace_per_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGRAPH_DUMP", str(tmp_path))
    torch._dynamo.reset()
    try:
        model = TwoHalves().eval()
        torch.compile(model, backend=slimgraph.backend("cleanup", then="eager"))(torch.randn(3, 8))
    finally:
        torch._dynamo.reset()
    summary = json.loads((tmp_path / "compile.json").read_text())
    assert summary["graphs"] == 2 and summary["traces"] == ["graph_0.jsonl", "graph_1.jsonl"]
    assert any("graph_break" in reason for reason in summary["graph_breaks"])
    for index in range(2):
        trace = load_trace(tmp_path / f"graph_{index}.jsonl")
        text = render_text(trace, timings=False)
        assert f"(compile, graph {index})" in text and "[0] cleanup: applied" in text


def test_html_format_writes_the_page(tmp_path):
    assert dump(tmp_path, "--format", "html") == 0
    assert "<html" in (tmp_path / "out" / "dump.html").read_text().lower()
