"""verify(): lint, shape re-propagation and the numeric check; relative_error semantics."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimgraph.errors import VerificationError
from slimgraph.ir import LinearView, VerifyResult, capture, find_all, relative_error, verify


@pytest.fixture
def captured(mlp):
    model, (x,) = mlp
    return model, x, capture(model, (x,))


def perturb_first_linear(gm: torch.fx.GraphModule, scale: float) -> None:
    """Replace (not modify in place: the weights are shared with the model) the first weight."""
    view = find_all(gm, LinearView)[0]
    owner, _, name = view.weight_ref.target.rpartition(".")
    module = gm.get_submodule(owner)
    setattr(module, name, nn.Parameter(getattr(module, name).detach() * (1 + scale)))


def test_a_good_graph_passes(captured):
    model, x, gm = captured
    result = verify(gm, example_inputs=(x,), reference=model(x), tolerance=1e-6)
    assert result == VerifyResult(output_error=0.0)


def test_without_a_reference_only_structure_is_checked(captured):
    _, _, gm = captured
    assert verify(gm) == VerifyResult(None)


def test_lint_failure(captured):
    _, _, gm = captured
    linear = find_all(gm, LinearView)[0].node
    next(n for n in gm.graph.nodes if n.op == "placeholder").prepend(linear)  # used before its input exists
    with pytest.raises(VerificationError, match=r"graph lint failed: .*'linear'"):
        verify(gm)


def test_shape_failure(captured):
    _, x, gm = captured
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    placeholder.meta["val"] = torch.empty(4, 5)  # a width the first linear cannot take
    with pytest.raises(VerificationError, match=r"shape propagation failed at node '_guards_fn'.*"
                                                r"Guard failed: x.size\(\)\[1\] == 16"):
        verify(gm, example_inputs=(x,))
    verify(gm, example_inputs=(x,), check_shapes=False)


def test_perturbed_weight_fails_the_numeric_check_with_the_error_in_the_message(captured):
    model, x, gm = captured
    reference = model(x)
    perturb_first_linear(gm, 0.05)
    expected = relative_error(gm(x), reference)
    assert 1e-3 < expected < 0.2
    with pytest.raises(VerificationError, match="outputs differ from the reference") as caught:
        verify(gm, example_inputs=(x,), reference=reference, tolerance=1e-3)
    reported = re.search(r"relative error (\S+) > tolerance 0.001", str(caught.value))
    assert reported and math.isclose(float(reported.group(1)), expected, rel_tol=1e-2)
    assert verify(gm, example_inputs=(x,), reference=reference, tolerance=0.2).output_error == expected
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # the model kept its weights


def test_no_tolerance_reports_without_raising(captured):
    model, x, gm = captured
    reference = model(x)
    perturb_first_linear(gm, 0.5)
    assert verify(gm, example_inputs=(x,), reference=reference).output_error > 0.01


def test_nan_outputs_never_pass(captured):
    _, x, gm = captured
    perturb_first_linear(gm, math.nan)
    with pytest.raises(VerificationError, match="relative error nan"):
        verify(gm, example_inputs=(x,), reference=torch.zeros(4, 8), tolerance=1.0)


def test_kwargs_models(hf_model):
    _, model, kwargs = hf_model
    gm = capture(model, (), kwargs)
    with torch.no_grad():
        reference = model(**kwargs)
    assert verify(gm, example_kwargs=kwargs, reference=reference, tolerance=1e-5).output_error < 1e-5


# ---- relative_error ------------------------------------------------------------------------------

def test_relative_error_is_the_l2_ratio():
    reference = torch.tensor([3.0, 4.0])  # norm 5
    assert relative_error(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)
    assert relative_error(reference, reference) == 0.0


def test_relative_error_is_the_worst_over_all_outputs():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
    outputs = {"first": a * 1.1, "pair": (b * 1.3, "ignored")}
    reference = {"first": a, "pair": (b, "ignored")}
    assert relative_error(outputs, reference) == pytest.approx(0.3)


def test_integer_outputs_must_match_exactly():
    ids = torch.tensor([1, 2, 3])
    assert relative_error(ids.clone(), ids) == 0.0
    assert relative_error(ids + 1, ids) == math.inf


def test_nan_is_never_dropped():
    reference = torch.ones(3)
    nan = torch.tensor([1.0, math.nan, 1.0])
    assert math.isnan(relative_error(nan, reference))
    assert math.isnan(relative_error((nan, reference * 2), (reference, reference)))
    assert math.isnan(relative_error((reference * 2, nan), (reference, reference)))


def test_zero_reference_is_not_nan():
    zeros = torch.zeros(3)
    assert relative_error(zeros, zeros) == 0.0
    assert relative_error(torch.full((3,), 1e-3), zeros) > 1e20


def test_structure_and_shape_changes_are_errors():
    with pytest.raises(VerificationError, match="output structure changed"):
        relative_error((torch.ones(2),), (torch.ones(2), torch.ones(2)))
    with pytest.raises(VerificationError, match=r"output shape changed: torch.Size\(\[3\]\) vs reference \(2,\)"):
        relative_error(torch.ones(3), torch.ones(2))


def test_relative_error_reads_model_outputs(hf_model):
    _, model, kwargs = hf_model
    with torch.no_grad():
        output = model(**kwargs)
    assert relative_error(output, output) == 0.0


@settings(max_examples=50, deadline=None)
@given(factor=st.floats(-3, 3, allow_nan=False), seed=st.integers(0, 2**16))
def test_scaling_the_output_gives_that_relative_error(factor, seed):
    reference = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert relative_error(reference * factor, reference) == pytest.approx(abs(factor - 1), abs=1e-12)
