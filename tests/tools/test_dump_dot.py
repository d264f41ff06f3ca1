"""The Graphviz view of a dump trace: colours, module clusters, escaping, SVG and missing Graphviz."""

from __future__ import annotations

import copy
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest

import slimgraph
from slimgraph.tools.cli import load_model_spec
from slimgraph.tools.dump import load_trace
from slimgraph.tools.dump.dot import GraphvizMissingError, pass_to_dot, write_dot

needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    model, args, _ = load_model_spec("tests.tools.factories:scaled_mlp")
    out = tmp_path_factory.mktemp("dump")
    slimgraph.optimize(model, "cleanup, fold_constants", args, dump_dir=out)
    return load_trace(out / "trace.jsonl")


def test_replacement_is_blue_and_names_what_it_replaces(trace):
    dot = pass_to_dot(trace, 1)
    assert '"_folded_0" [label="_folded_0\\nget_attr _folded_0\\n[4] float32\\nreplaces add"' in dot
    assert 'fillcolor="lightblue"' in dot
    assert '"add" -> "_folded_0" [style="dotted", color="blue"' in dot


def test_removed_nodes_are_dashed_grey_with_their_edges(trace):
    dot = pass_to_dot(trace, 1)
    for name in ("scale", "mul", "add"):
        assert f'"{name}" [label=' in dot
    assert dot.count('style="rounded,dashed", color="gray60"') == 3
    assert '"mul" -> "add" [style="dashed", color="gray60"];' in dot
    assert '"dropout"' in pass_to_dot(trace, 0) and '"dropout"' not in dot


def test_added_nodes_are_green(trace):
    only_added = copy.deepcopy(trace)
    only_added.passes[1]["replaced"] = []
    dot = pass_to_dot(only_added, 1)
    assert 'fillcolor="palegreen"' in dot and "replaces add" not in dot


def test_nodes_are_clustered_by_nested_module_path(trace):
    dot = pass_to_dot(trace, 1)
    encoder = dot.index('subgraph "cluster_encoder" {')
    linear = dot.index('subgraph "cluster_encoder.0" {')
    assert encoder < linear < dot.index('"linear" [label=')
    assert 'label="encoder (Sequential)"' in dot and 'label="encoder.0 (Linear)"' in dot
    assert 'label="head (Linear)"' in dot


@needs_graphviz
def test_labels_with_quotes_and_backslashes_are_escaped(trace):
    odd = copy.deepcopy(trace)
    node = odd.passes[1]["graph"]["nodes"][-2]
    node["kernel"] = 'weird "op" \\ with\nnewline'
    node["source"] = 'm.py:1 `s = "a\\b"`'
    dot = pass_to_dot(odd, 1)
    assert 'weird \\"op\\" \\\\ with\\nnewline' in dot
    assert subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True).returncode == 0


@needs_graphviz
def test_svg_per_pass_is_valid_xml(trace, tmp_path):
    written = write_dot(trace, tmp_path)
    assert [p.name for p in written] == ["00_cleanup.dot", "00_cleanup.svg",
                                         "01_fold_constants.dot", "01_fold_constants.svg"]
    root = ElementTree.parse(tmp_path / "01_fold_constants.svg").getroot()
    assert root.tag.endswith("svg")
    assert "_folded_0" in (tmp_path / "01_fold_constants.svg").read_text()


def test_missing_graphviz_says_how_to_install_and_keeps_dot_files(trace, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GraphvizMissingError, match="install Graphviz: apt-get install graphviz") as error:
        write_dot(trace, tmp_path)
    assert [p.name for p in error.value.written] == ["00_cleanup.dot", "01_fold_constants.dot"]
    assert not list(tmp_path.glob("*.svg"))


def test_svg_false_needs_no_graphviz(trace, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert [p.suffix for p in write_dot(trace, tmp_path, svg=False)] == [".dot", ".dot"]
