"""The slimgraph:: linear ops' C++ CPU kernels (csrc/ops.cpp): registered with the
dispatcher once the extension loads, native for float32 x, the op's Python body otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batch1_error import assert_within_four_bit_error

from slimgraph.kernels import native
from slimgraph.kernels.formats import FORMATS

# One packing per op with a C++ kernel: (format, options) -> the native call it must equal.
CASES = {
    "linear_int8": ("int8", {}),
    "linear_int4": ("int4", {"group_size": 64}),
    "linear_nf4": ("nf4", {}),
    "linear_fp4": ("fp4", {"variant": "nv"}),
    "linear_fp8": ("fp8", {"variant": "e5m2"}),
    "linear_higgs": ("higgs", {"p": 2}),
}


def _packed(name: str, **overrides):
    fmt, options = CASES[name]
    torch.manual_seed(0)
    return FORMATS[fmt].pack(torch.randn(96, 256), **(options | overrides))


def _reference(packed, x, bias):
    """The op's torch reference: ``x @ dequantize(W).T + bias`` (HIGGS dequantizes un-rotated)."""
    return F.linear(x, FORMATS[packed.format].dequantize(packed).to(x.dtype), bias)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_cpu_and_autograd_cpu_kernels_are_the_extensions(kernels, name):
    """AutogradCPU too: custom_op's autograd kernel is Python, ~13 µs a call under no_grad."""
    registrations = torch._C._dispatch_dump(f"slimgraph::{name}")
    for key in ("CPU", "AutogradCPU"):
        assert f"\n{key}: registered at {native.CSRC / 'ops.cpp'}" in registrations


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_calls_match_the_python_body_run_natively(kernels, name, monkeypatch):
    """The C++ fast path computes what the body computes with the same kernels: bit for bit."""
    packed, x, bias = _packed(name), torch.randn(3, 256), torch.randn(96)
    op = getattr(torch.ops.slimgraph, name).default
    body = next(body for op_name, body, _ in native._cpu_ops if op_name == name)
    expected = body(x, *packed.buffers.values(), bias, *packed.params.values())
    assert torch.equal(op(x, *packed.buffers.values(), bias, *packed.params.values()), expected)
    got, reference = packed(x, bias), _reference(packed, x, bias)
    if name in ("linear_int8", "linear_fp8"):  # x in 16 bits (int8) or float (fp8)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    else:
        assert_within_four_bit_error(got, reference)


@pytest.mark.parametrize("name", sorted(CASES))
def test_other_dtypes_go_to_the_python_body(kernels, name):
    packed, x = _packed(name), torch.randn(2, 256, dtype=torch.bfloat16)
    y = packed(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _reference(packed, x.float(), None), rtol=0.03, atol=0.05)


@pytest.mark.parametrize(("name", "overrides"), [("linear_higgs", {"bits": 3}), ("linear_nf4", {"double_quant": True})])
def test_arguments_without_a_fast_path_go_to_the_python_body(kernels, name, overrides):
    packed, x = _packed(name, **overrides), torch.randn(2, 256)
    assert_within_four_bit_error(packed(x), _reference(packed, x, None))


def test_disabling_after_loading_runs_the_torch_reference(kernels, monkeypatch):
    packed, x, bias = _packed("linear_nf4"), torch.randn(1, 256), torch.randn(96)
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    assert torch.equal(packed(x, bias), _reference(packed, x, bias))


def test_errors_name_the_kernel_and_the_problem(kernels):
    packed = _packed("linear_nf4")
    with pytest.raises(RuntimeError, match="lut4_linear: x has last dim 255 but the weight has in_features=256"):
        packed(torch.randn(1, 255))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):  # the body's F.linear
        packed(torch.randn(1, 255, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", sorted(CASES))
def test_autograd_records_nothing_without_grad_and_refuses_backward_with_it(kernels, name):
    packed, x = _packed(name), torch.randn(2, 256, requires_grad=True)
    with torch.no_grad():
        assert not packed(x).requires_grad
    y = packed(x)
    assert y.requires_grad and torch.equal(y.detach(), packed(x.detach()))
    with pytest.raises(RuntimeError, match=f"derivative for slimgraph::{name} is not implemented"):
        y.sum().backward()


def test_registration_refuses_unknown_ops_and_replaces_the_fallback_of_known_ones(kernels):
    with pytest.raises(RuntimeError, match="no native CPU kernel for op slimgraph::linear_w8a8"):
        kernels.register_cpu_op("linear_w8a8", lambda *args: None, [])
    name = "linear_int8"
    _, body, tables = next(entry for entry in native._cpu_ops if entry[0] == name)
    packed, x = _packed(name), torch.randn(1, 256, dtype=torch.bfloat16)
    try:
        kernels.register_cpu_op(name, lambda x, *args: torch.zeros(len(x), 7), list(tables()))
        assert packed(x).shape == (1, 7)  # bfloat16 goes to the new fallback
    finally:
        kernels.register_cpu_op(name, body, list(tables()))
    assert packed(x).shape == (1, 96)
