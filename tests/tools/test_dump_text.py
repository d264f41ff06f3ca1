"""The text view of a dump trace, pinned by a golden file.

The golden text is rendered with ``timings=False`` (no wall-clock times), so it is
deterministic. After an intended change to the text view, regenerate it with

    SLIMGRAPH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/tools/test_dump_text.py

and review the diff of tests/tools/golden/dump_text.txt.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

import slimgraph
from slimgraph.tools.cli import load_model_spec
from slimgraph.tools.dump import load_trace
from slimgraph.tools.dump.text import render_text

GOLDEN = Path(__file__).parent / "golden" / "dump_text.txt"
PIPELINE = "cleanup, fold_constants, cleanup"  # the second cleanup finds nothing left to do


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    model, args, _ = load_model_spec("tests.tools.factories:scaled_mlp")
    out = tmp_path_factory.mktemp("dump")
    slimgraph.optimize(model, PIPELINE, args, dump_dir=out)
    return load_trace(out / "trace.jsonl")


def test_text_view_matches_golden(trace):
    text = render_text(trace, timings=False)
    if os.environ.get("SLIMGRAPH_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "text view changed; see this module's docstring to regenerate"


def test_text_view_shows_each_change_with_provenance_and_code_diff(trace):
    text = render_text(trace, timings=False)
    assert "[0] cleanup: applied" in text and "[2] cleanup: no change" in text
    assert "nodes 15 → 14" in text and "removed 1 dropout" in text
    assert "replaced  add → _folded_0  get_attr _folded_0" in text
    assert "removed   mul              aten.mul.Tensor     [4]    torch.float32" in text
    assert "factories.py:" in text  # the user's source line
    assert "-    dropout = torch.ops.aten.dropout.default(linear, 0.2, False)" in text
    assert "+    _folded_0 = self._folded_0" in text


def test_only_changed_keeps_applied_passes(trace):
    text = render_text(trace, only_changed=True, timings=False)
    assert "[0] cleanup: applied" in text and "[1] fold_constants: applied" in text
    assert "[2]" not in text


def test_timings_are_shown_by_default(trace):
    text = render_text(trace)
    assert " ms (verify " in text and "captured with export in " in text
    assert " ms" not in render_text(trace, timings=False)


def test_rolled_back_pass_shows_its_reason_and_no_diff(trace):
    rolled_back = copy.deepcopy(trace)
    record = rolled_back.passes[1]
    record.update(status="rolled back", reason="output error 3.1e-02 exceeds tolerance 1e-04",
                  added=[], removed=[], replaced=[], graph=rolled_back.graph_before(1))
    text = render_text(rolled_back, timings=False)
    assert "[1] fold_constants: rolled back (output error 3.1e-02 exceeds tolerance 1e-04)" in text
    assert "--- before fold_constants" not in text
    assert "[1] fold_constants" not in render_text(rolled_back, only_changed=True)
