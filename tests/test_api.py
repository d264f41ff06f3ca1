"""slimgraph.optimize(): copy semantics, the report, calibration data, Hugging Face models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.passes.manager import PASS_REGISTRY, Pass, PassResult, register_pass

CLOSE = {"rtol": 1e-5, "atol": 1e-5}


class WithConstants(nn.Module):
    """Something for every default pass to rewrite: dropout, a transposed weight, an unused layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(8, 32))
        self.unused = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        self.unused(x)
        return self.drop(torch.relu(self.fc(x))) @ self.w.t()


@dataclass(frozen=True)
class SeeCalibration(Pass):
    """Keeps what it was given as calibration data, for the test to look at."""

    name: ClassVar[str] = "test_api_see_calibration"
    seen: ClassVar[list] = []

    def run(self, gm, ctx):
        SeeCalibration.seen.append(ctx.calibration)
        return PassResult()


@pytest.fixture
def see_calibration():
    register_pass(SeeCalibration)
    SeeCalibration.seen.clear()
    yield SeeCalibration.seen
    PASS_REGISTRY.pop(SeeCalibration.name)


def snapshot(model: nn.Module):
    return {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict(keep_vars=True).items()}


def test_input_model_is_never_mutated():
    model, x = WithConstants(), torch.randn(4, 16)
    model.train()
    model.fc.eval()  # a mixed state, to see every flag kept as it was
    flags = {name: m.training for name, m in model.named_modules()}
    state = snapshot(model)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train(), model.fc.eval()

    optimized = slimgraph.optimize(model, "cleanup, fold_constants", (x,))

    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for name, (pointer, value) in state.items():
        assert after[name].data_ptr() == pointer and torch.equal(after[name], value), name
    assert all(r.status == "applied" for r in optimized.report.records)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
    assert not {t.data_ptr() for t in optimized.state_dict().values()} & {p for p, _ in state.values()}


def test_result_of_a_training_mode_model_is_for_inference():
    model, x = WithConstants(), torch.randn(4, 16)
    assert model.training
    optimized = slimgraph.optimize(model, "cleanup, fold_constants", (x,), tolerance=1e-5)
    assert not optimized.report.rolled_back  # the reference was computed with dropout off
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model.eval()(x), **CLOSE)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("built_in_inference_mode", [False, True])
def test_optimize_and_run_inside_inference_mode(inplace, built_in_inference_mode):
    """Deployment code often wraps everything in torch.inference_mode(): capture, passes and
    the quantized ops (a batch of 32 rows takes the native tiled path) must all work there."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval(), torch.randn(32, 64)

    with torch.inference_mode():
        model, x = build() if built_in_inference_mode else (None, None)
    if not built_in_inference_mode:
        model, x = build()
    with torch.inference_mode():
        expected = model(x)
        optimized = slimgraph.optimize(model, "quantize(format=int8, min_features=0)", (x,), inplace=inplace)
        got = optimized(x)
    assert [r.status for r in optimized.report.records] == ["applied"]
    assert ((got - expected).norm() / expected.norm()).item() < 0.02  # int8 weights: 0.57% measured


def test_inplace_shares_weight_storage_with_the_model(mlp):
    model, inputs = mlp
    optimized = slimgraph.optimize(model, "cleanup", inputs, inplace=True)
    model_storage = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in optimized.parameters()} == model_storage
    assert optimized.get_parameter("net.0.weight") is model.net[0].weight


def test_without_inplace_the_result_owns_its_weights(mlp):
    model, inputs = mlp
    optimized = slimgraph.optimize(model, "cleanup", inputs)
    assert not {p.data_ptr() for p in optimized.parameters()} & {p.data_ptr() for p in model.parameters()}
    torch.testing.assert_close(optimized.get_parameter("net.0.weight"), model.net[0].weight, rtol=0, atol=0)


def test_report_has_one_record_per_pass(mlp):
    model, inputs = mlp
    optimized = slimgraph.optimize(model, ["cleanup", slimgraph.passes.Pipeline.parse("fold_constants"),
                                           "cleanup"], inputs)
    report = optimized.report
    assert report.pipeline == "cleanup, fold_constants, cleanup"
    assert [(r.pass_text, r.status) for r in report.records] == [
        ("cleanup", "applied"), ("fold_constants", "no change"), ("cleanup", "no change")]
    assert report.capture_strategy == "export"
    assert "cleanup" in str(report) and "removed 2 dropout" in str(report)


def test_report_prints_brackets_in_pass_text_literally(mlp):
    """Regression: rich read `[0-9]` in a pass option as markup and dropped it."""
    model, inputs = mlp
    optimized = slimgraph.optimize(model, "quantize(exclude='fc[0-9]')", inputs)
    assert "exclude='fc[0-9]'" in str(optimized.report)


def test_calibration_accepts_tuples_dicts_and_tensors(see_calibration, mlp):
    model, (x,) = mlp
    y = torch.randn(2, 16)
    slimgraph.optimize(model, "test_api_see_calibration", (x,),
                       calibration=[(x,), {"x": y}, y, [x, y]])
    (calibration,) = see_calibration
    assert [(len(args), sorted(kwargs)) for args, kwargs in calibration] == [(1, []), (0, ["x"]), (1, []), (2, [])]
    assert calibration[0][0][0] is x and calibration[1][1]["x"] is y and calibration[2][0][0] is y
    assert calibration[3][0] == (x, y)


def test_calibration_may_be_a_generator(see_calibration, mlp):
    model, inputs = mlp
    slimgraph.optimize(model, "test_api_see_calibration", inputs,
                       calibration=(torch.randn(1, 16) for _ in range(3)))
    assert len(see_calibration[0]) == 3


def test_no_calibration_is_an_empty_list(see_calibration, mlp):
    slimgraph.optimize(*mlp[:1], "test_api_see_calibration", mlp[1])
    assert see_calibration == [[]]


@pytest.mark.parametrize("bad", [3, "text", None])
def test_bad_calibration_item_is_a_type_error(mlp, bad):
    model, (x,) = mlp
    with pytest.raises(TypeError, match=f"calibration item 1 is a {type(bad).__name__}; give an args tuple, "
                                        "a kwargs dict or a tensor"):
        slimgraph.optimize(model, "cleanup", (x,), calibration=[x, bad])


def test_optimize_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="optimize\\(\\) expects an nn.Module, got function"):
        slimgraph.optimize(lambda x: x, "cleanup", (torch.randn(2),))


def test_hugging_face_models_with_example_kwargs(hf_model):
    name, model, kwargs = hf_model
    optimized = slimgraph.optimize(model, example_kwargs=kwargs)
    assert [r.status for r in optimized.report.records] == ["applied", "applied"], name
    with torch.no_grad():
        expected, got = model(**kwargs), optimized(**kwargs)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **CLOSE)
    if name == "bert":
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, **CLOSE)


def test_minilm_sentence_embeddings(minilm):
    model, batch = minilm
    optimized = slimgraph.optimize(model, example_kwargs=batch)
    assert not optimized.report.rolled_back
    with torch.no_grad():
        expected, got = model(**batch), optimized(**batch)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **CLOSE)
