"""The `slimgraph optimize` command: the demo path and its error messages."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from slimgraph.tools.cli import main


def test_optimize_factory_spec_prints_table_and_latency(capsys):
    assert main(["optimize", "tests.tools.factories:mlp", "--passes", "cleanup"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "applied" in out and "removed 1 dropout" in out
    assert re.search(r"eager latency [\d.]+ ms → optimized [\d.]+ ms", out)


@pytest.mark.parametrize(("spec", "message"), [
    ("nonsense", "neither 'minilm' nor 'package.module:factory'"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("tests.tools.factories:missing", "has no function 'missing'"),
    ("tests.tools.factories:not_a_pair", "must return (nn.Module, example_inputs)"),
])
def test_bad_model_spec_is_a_clear_error(capsys, spec, message):
    assert main(["optimize", spec]) == 2
    assert message in capsys.readouterr().out.replace("\n", " ")


def test_bad_pipeline_fails_before_loading_the_model(capsys):
    assert main(["optimize", "nonsense", "--passes", "cleanp"]) == 2
    out = capsys.readouterr().out
    assert "unknown pass 'cleanp'" in out and "Did you mean 'cleanup'?" in out


@pytest.mark.slow
def test_demo_on_minilm_runs_as_console_script():
    """What `make demo` runs: the installed console script on the bundled pretrained model."""
    result = subprocess.run([sys.executable, "-m", "slimgraph.tools.cli", "optimize", "minilm", "--sentences", "4"],
                            capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "fold_constants" in result.stdout and "cleanup" in result.stdout
    cosine = float(re.search(r"cosine similarity to the original min ([\d.]+)", result.stdout)[1])
    assert cosine > 0.99999
