"""quantize(convs=true): Conv1d/Conv2d weights as int8 per output channel (``slimgraph::conv_int8``)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import slimgraph
from slimgraph.errors import PipelineError
from slimgraph.ir.analyses import AnalysisManager
from slimgraph.ir.cost import node_cost
from slimgraph.ir.verify import relative_error
from slimgraph.kernels.conv import dequantize_conv_int8, explicit_padding, pack_conv_int8
from slimgraph.kernels.int8 import quantize_weight_int8
from slimgraph.passes.manager import PassContext
from slimgraph.passes.quantize import Quantize

CONV_INT8 = torch.ops.slimgraph.conv_int8.default
# Relative L2 output error of int8 per-output-channel convs against fp32; measured 0.002-0.005.
INT8_OUTPUT_REL_ERROR = 0.01


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The reference: int8 rows of the ``[out, in/groups·kernel]`` view, scaled back, in the conv shape."""
    qweight, scales = quantize_weight_int8(weight.flatten(1))
    return (qweight.float() * scales[:, None]).view(weight.shape)


def run_pass(module: nn.Module, x: torch.Tensor, **options) -> tuple[fx.GraphModule, object]:
    """``Quantize(convs=True, **options)`` on ``symbolic_trace`` of a copy (``call_module`` convs)."""
    # symbolic_trace shares the submodules, whose weights the pass frees: trace a copy.
    gm = fx.symbolic_trace(copy.deepcopy(module))
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"] = x
    result = Quantize(convs=True, **options).run(gm, PassContext(AnalysisManager(gm)))
    gm.recompile()
    return gm, result


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    in_channels, out_channels = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    size = tuple(
        d * (k - 1) + 1 + draw(st.integers(0, 5)) for d, k in zip(dilation, kernel, strict=True)
    )
    conv_type = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = conv_type(
        in_channels,
        out_channels,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        bias=draw(st.booleans()),
    ).eval()
    return conv, torch.randn(draw(st.integers(1, 2)), in_channels, *size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases())
def test_quantized_conv_equals_the_conv_with_the_dequantized_weight(case):
    conv, x = case
    with torch.no_grad():
        expected = conv._conv_forward(x, dequantized(conv.weight), conv.bias)
        gm, result = run_pass(conv, x, min_features=1)
        assert result.stats["quantized"] == 1
        torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is CONV_INT8
    holder = gm.get_submodule(node.args[1].target.rpartition(".")[0])
    assert holder.qweight.dtype == torch.int8 and holder.qweight.shape == conv.weight.shape
    assert (holder.scales.dtype, holder.scales.shape) == (torch.float32, (conv.out_channels,))
    assert node.args[4:] == (
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        conv.groups,
    )


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(32, 64, 5, padding=2),
        nn.Conv2d(32, 64, 3, stride=2, groups=4),
        nn.Conv2d(3, 16, 7, padding=3, dilation=2),
    ],
)
def test_int8_conv_output_error_is_small_and_its_bits_match_the_bytes(conv):
    x = torch.randn(2, conv.in_channels, *[20] * (conv.weight.dim() - 2))
    packed = pack_conv_int8(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        assert relative_error(packed(x, conv.bias), conv(x)) < INT8_OUTPUT_REL_ERROR
    assert torch.equal(dequantize_conv_int8(packed), dequantized(conv.weight))
    per_output_channel = conv.weight[0].numel()
    assert packed.bits_per_weight == 8 + 32 / per_output_channel
    assert packed.nbytes * 8 / conv.weight.numel() == pytest.approx(
        packed.bits_per_weight, rel=1e-9
    )


def test_explicit_padding():
    assert explicit_padding((2, 1), (3, 3), (1, 1)) == (2, 1)
    assert explicit_padding("valid", (4,), (2,)) == (0,)
    assert explicit_padding("same", (3, 5), (1, 2)) == (1, 4)
    assert explicit_padding("same", (4,), (1,)) is None  # torch pads 1 left, 2 right


# ---- a small CNN end to end through slimgraph.optimize ---------------------------------------------


def block(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = block(nn.Conv2d(3, 16, 3, padding=1))  # 27 weights per output channel
        self.down = block(nn.Conv2d(16, 32, 3, stride=2, padding=1))
        self.depthwise = block(nn.Conv2d(32, 32, 3, padding=1, groups=32))  # 9 per channel: tiny
        self.pointwise = block(nn.Conv2d(32, 64, 1))
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pointwise(self.depthwise(self.down(self.stem(x))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


QUANTIZED_CONVS = ("stem.0", "down.0", "pointwise.0")


def small_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN()
    # Running statistics other than 0 and 1, as a trained network has.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(2, 3, 16, 16)


def test_small_cnn_end_to_end(tmp_path):
    model, x = small_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = slimgraph.optimize(
        model, "quantize(format=int8, convs=true)", example_inputs=(x,), strict=True
    )
    record = optimized.report.records[0]
    result = record.result
    assert record.status == "applied"
    assert result.notes[0] == "1 linears + 3 convs → int8 (8.504 bits/weight)"
    assert set(result.stats["layers"]) == {"fc", *QUANTIZED_CONVS}
    assert result.stats["skipped"] == {
        "head": "output head (pass quantize_head=true to include it)",
        "depthwise.0": "tiny layer (32, 1, 3, 3) (min_features=16)",
    }
    stem = result.stats["layers"]["stem.0"]
    assert (stem["format"], stem["bits_per_weight"]) == ("int8", 8 + 32 / 27)
    assert stem["rel_mse"] < 1e-4
    assert sum(n.target is CONV_INT8 for n in optimized.graph.nodes) == 3
    with torch.no_grad():
        assert relative_error(optimized(x), model(x)) < INT8_OUTPUT_REL_ERROR

    conv_weight_bytes = sum(model.get_submodule(path).weight.nbytes for path in QUANTIZED_CONVS)
    fc_saved = model.fc.weight.nbytes - (model.fc.weight.numel() + 4 * 64)
    # 3/4 of the conv weights, less one float32 scale per output channel (2.1% of it here).
    conv_saved = record.param_bytes_before - record.param_bytes_after - fc_saved
    assert conv_saved == pytest.approx(0.75 * conv_weight_bytes, rel=0.025)
    packed_bytes = sum(
        b.nbytes
        for name, b in optimized.named_buffers()
        if "_int8_" in name and not name.endswith(".bias")
    )
    quantized_weights = sum(
        model.get_submodule(path).weight.numel() for path in (*QUANTIZED_CONVS, "fc")
    )
    assert packed_bytes * 8 / quantized_weights == pytest.approx(
        result.stats["bits_per_weight"], rel=1e-9
    )
    # The cost model counts conv_int8 as the conv it replaces.
    assert record.flops_after == record.flops_before

    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # input untouched
    path = slimgraph.save(optimized, tmp_path / "cnn.safetensors")
    loaded = slimgraph.load(path)
    assert set(loaded.meta["slimgraph_saved"]["formats"].values()) == {"int8"}  # not "conv_int8"
    with torch.no_grad():
        assert torch.equal(loaded(x), optimized(x))
    assert loaded.state_dict().keys() == optimized.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in optimized.state_dict().items())


def test_convs_stay_float_by_default():
    model, x = small_cnn()
    optimized = slimgraph.optimize(model, "quantize(format=int8)", (x,), strict=True)
    result = optimized.report.records[0].result
    assert set(result.stats["layers"]) == {"fc"} and "stem.0" not in result.stats["skipped"]
    assert not any(n.target is CONV_INT8 for n in optimized.graph.nodes)


def test_overrides_include_and_specs_convs_cannot_take():
    model, x = small_cnn()
    spec = (
        "quantize(format=nf4, convs=true, exclude=down, overrides=['^stem:skip', 'pointwise:int8', "
        "'depthwise:int8'])"
    )
    result = slimgraph.optimize(model, spec, (x,), strict=True).report.records[0].result
    formats = {path: info["format"] for path, info in result.stats["layers"].items()}
    # An override wins over min_features: the depthwise conv is quantized.
    assert formats == {"fc": "nf4", "pointwise.0": "int8", "depthwise.0": "int8"}
    assert result.stats["layers"]["pointwise.0"]["override"] == "pointwise:int8"
    assert result.stats["skipped"] == {
        "head": "output head (pass quantize_head=true to include it)",
        "stem.0": "override '^stem:skip'",
        "down.0": "excluded: path matches exclude='down'",
    }
    assert result.notes[0] == "1 linears + 2 convs → nf4 ×1, int8 ×2 (6.249 bits/weight)"

    spec = "quantize(format=int4, group_size=32, convs=true, overrides=['down:nf4'])"
    result = slimgraph.optimize(model, spec, (x,), strict=True).report.records[0].result
    assert result.stats["skipped"]["stem.0"] == "conv layers support int8 only (int4 requested)"
    assert result.stats["skipped"]["down.0"] == "conv layers support int8 only (nf4 requested)"
    assert set(result.stats["layers"]) == {"fc"}


def test_convs_with_a_bit_budget_are_refused():
    message = "convs=true with budget_bits is not supported (the mixed-precision planner handles linears only)"
    with pytest.raises(PipelineError, match=re.escape(message)):
        slimgraph.Pipeline.parse("quantize(budget_bits=5, convs=true)")


def test_gptq_leaves_convs_rounded_to_nearest_and_says_so():
    model, x = small_cnn()
    optimized = slimgraph.optimize(
        model,
        "quantize(format=int8, method=gptq, convs=true)",
        (x,),
        calibration=[((torch.randn(2, 3, 16, 16),), {})],
        strict=True,
    )
    result = optimized.report.records[0].result
    assert "conv layers rounded to nearest (method=gptq applies to linears)" in result.notes
    assert set(result.stats["layers"]) == {"fc", *QUANTIZED_CONVS}


def test_conv1d_stack_exports_and_compiles():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(8, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 3, dilation=2, groups=2)
    ).eval()
    x = torch.randn(2, 8, 24)
    dynamic = ({0: torch.export.Dim("batch"), 2: torch.export.Dim("length", min=8)},)
    optimized = slimgraph.optimize(
        model, "quantize(convs=true, min_features=8)", (x,), dynamic_shapes=dynamic, strict=True
    )
    assert optimized.report.records[0].result.stats["quantized"] == 2
    other = torch.randn(3, 8, 31)  # the fake implementation gives symbolic output sizes
    with torch.no_grad():
        assert relative_error(optimized(other), model(other)) < INT8_OUTPUT_REL_ERROR
        exported = torch.export.export(optimized, (x,), dynamic_shapes=dynamic).module()
        torch.testing.assert_close(exported(other), optimized(other))
        torch.testing.assert_close(
            torch.compile(optimized, backend="eager")(other), optimized(other)
        )


def test_the_compile_backend_quantizes_convs_and_linears():
    """Dynamo records ``example_value``, not ``val``: the rewritten nodes must carry it (it was rolled back)."""
    model, x = small_cnn()
    torch._dynamo.reset()
    backend = slimgraph.backend("quantize(format=int8, convs=true)", then="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        assert relative_error(out, model(x)) < INT8_OUTPUT_REL_ERROR
    torch._dynamo.reset()
    (record,) = [r for report in backend.reports for r in report.records]
    assert record.status == "applied", record.reason
    assert record.result.notes[0] == "1 linears + 3 convs → int8 (8.504 bits/weight)"


def test_symmetric_same_padding_is_kept_and_asymmetric_is_a_reported_skip():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(16, 32, 3, padding="same"), nn.Conv1d(32, 32, 4, padding="same")
    ).eval()
    x = torch.randn(2, 16, 20)
    with torch.no_grad():
        expected = F.conv1d(x, dequantized(model[0].weight), model[0].bias, padding=1)
        gm, result = run_pass(model, x)
        assert result.stats["skipped"] == {
            "1": "padding='same' pads one side more with this kernel; "
            "conv_int8 takes symmetric padding"
        }
        # The skipped conv runs in float.
        torch.testing.assert_close(gm(x), model[1](expected), atol=1e-5, rtol=1e-5)


def test_cost_of_conv_int8_is_the_conv_flops():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, groups=2)).eval()
    x = torch.randn(2, 8, 9, 9)
    gm, _ = run_pass(model, x)
    AnalysisManager(gm).get("shapes")
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    out_elements, per_output = 2 * 16 * 4 * 4, (8 // 2) * 3 * 3  # in/groups · kernel
    assert node_cost(node).flops == 2 * out_elements * per_output


def test_exported_string_padding_convs_are_quantized():
    """``torch.export`` spells ``padding="same"`` as ``aten.conv1d.padding``: still a conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(16, 32, 3, padding="same"), nn.Conv1d(32, 32, 3, padding="valid")).eval()
    x = torch.randn(2, 16, 20)
    optimized = slimgraph.optimize(model, "quantize(format=int8, convs=true)", (x,), strict=True)
    assert sum(n.target is CONV_INT8 for n in optimized.graph.nodes) == 2
    with torch.no_grad():
        expected = F.conv1d(F.conv1d(x, dequantized(model[0].weight), model[0].bias, padding=1),
                            dequantized(model[1].weight), model[1].bias)
        torch.testing.assert_close(optimized(x), expected, atol=1e-5, rtol=1e-5)
