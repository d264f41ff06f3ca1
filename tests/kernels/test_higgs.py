"""The higgs format: options, exact storage, quality targets, and the op against its dequantized weight."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from batch1_error import assert_within_four_bit_error
from weight_samples import sample_weights

from slimgraph.kernels import FORMATS, native
from slimgraph.kernels.higgs import HiggsOptions, pack_bits, unpack_bits
from slimgraph.kernels.int4 import pack_nibbles

CONFIGS = [(bits, p) for bits in (2, 3, 4) for p in (1, 2)]
DISTRIBUTIONS = ["gaussian", "laplace", "student_t3", "gaussian_outliers"]


def _has_native_lut_kernels() -> bool:
    return hasattr(native.load(), "lut4_linear")


@pytest.fixture(params=["reference", "native"])
def kernel_path(request, monkeypatch):
    """Run the op through the torch reference, then through the native kernels when they are built."""
    if request.param == "reference":
        monkeypatch.setenv(native.DISABLE_ENV, "1")
    elif not _has_native_lut_kernels():
        pytest.skip("native lookup-table / Hadamard kernels are not built on this machine")
    return request.param


# -- options ---------------------------------------------------------------------------------


def test_defaults():
    assert FORMATS["higgs"].make_options() == HiggsOptions(bits=4, p=1, group_size=128, seed=0)


@pytest.mark.parametrize(("given", "message"), [
    ({"group_size": 100}, "higgs group_size=100 is not one of (64, 128, 256, 512, 1024)"),
    ({"group_size": 32}, "higgs group_size=32 is not one of (64, 128, 256, 512, 1024)"),
    ({"bits": 5}, "higgs bits=5 is not one of (2, 3, 4)"),
    ({"p": 3}, "higgs p=3 is not one of (1, 2)"),
    ({"seed": -1}, "higgs seed=-1 must be an integer >= 0"),
])
def test_invalid_options_name_the_option_and_valid_values(given, message):
    with pytest.raises(ValueError) as error:
        FORMATS["higgs"].make_options(**given)
    assert str(error.value).startswith(message)


def test_rejects_rows_the_group_size_does_not_divide():
    with pytest.raises(ValueError, match="in_features=96 is not divisible by group_size=64"):
        FORMATS["higgs"].pack(torch.randn(8, 96), group_size=64)


# -- bit packing and storage -------------------------------------------------------------------


@pytest.mark.parametrize("width", range(1, 9))
def test_pack_bits_round_trips_and_fills_every_byte(width):
    codes = torch.randint(0, 2**width, (5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, width)
    assert packed.shape == (5, 64 * width // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, width), codes)


def test_4_bit_packing_is_the_int4_nibble_layout():
    codes = torch.randint(0, 16, (3, 32), dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, 4), pack_nibbles(codes))


@pytest.mark.parametrize(("bits", "p"), CONFIGS)
def test_reported_bits_per_weight_are_the_packed_bytes(bits, p):
    weight = torch.randn(256, 1024)
    packed = FORMATS["higgs"].pack(weight, bits=bits, p=p)
    codes, scales, signs = packed.buffers.values()
    assert codes.shape == (256, 1024 * bits // 8) and codes.dtype == torch.uint8
    assert scales.shape == (256, 1024 // 128) and scales.dtype == torch.float16
    assert signs.shape == (128,) and signs.dtype == torch.int8
    assert packed.bits_per_weight == bits + 16 / 128 + 8 * 128 / weight.numel()
    assert packed.nbytes * 8 / weight.numel() == pytest.approx(packed.bits_per_weight, rel=1e-12)


def test_seed_picks_the_stored_signs():
    weight = torch.randn(16, 256)
    a, b, c = (FORMATS["higgs"].pack(weight, seed=seed) for seed in (0, 0, 1))
    assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    assert not torch.equal(a.buffers["signs"], c.buffers["signs"])
    assert set(a.buffers["signs"].tolist()) == {-1, 1}


# -- quality (the targets; group_size 128, the default) --------------------------------




@functools.cache
def _relative_mse(name: str, kind: str, **options) -> float:
    w = sample_weights(kind)
    w_hat = FORMATS[name].dequantize(FORMATS[name].pack(w, **options))
    return ((w - w_hat).pow(2).sum() / w.pow(2).sum()).item()


# Measured: p=1 0.00932 / 0.00921 / 0.00886 / 0.00886, p=2 0.00779 / 0.00773 / 0.00751 / 0.00744,
# nf4 0.00846 / 0.01074 / 0.01508 / 0.01493 (Gaussian / Laplace / Student-t / outliers).
@pytest.mark.slow
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize(("p", "limit"), [(1, 0.0096), (2, 0.0082)])
def test_4_bit_relative_mse_meets_the_targets(kind, p, limit):
    assert _relative_mse("higgs", kind, p=p) <= limit


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["laplace", "student_t3", "gaussian_outliers"])
@pytest.mark.parametrize("p", [1, 2])
def test_beats_nf4_on_heavy_tails_and_outliers(kind, p):
    assert _relative_mse("higgs", kind, p=p) < 0.9 * _relative_mse("nf4", kind)


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "p", "limit"), [(2, 1, 0.125), (2, 2, 0.115), (3, 1, 0.037), (3, 2, 0.032)])
def test_fewer_bits_stay_near_the_gaussian_optimum(bits, p, limit):
    """Lloyd–Max 0.1175 / 0.0345 and the 2-D grids 0.1076 / 0.0297 (REFERENCES.md), plus a small margin."""
    assert _relative_mse("higgs", "student_t3", bits=bits, p=p) <= limit


# -- the op ------------------------------------------------------------------------------------


def _packed(bits: int, p: int, out_features: int = 48, in_features: int = 256, group_size: int = 64):
    weight = torch.randn(out_features, in_features) / in_features**0.5
    return FORMATS["higgs"].pack(weight, bits=bits, p=p, group_size=group_size)


@pytest.mark.parametrize(("bits", "p"), CONFIGS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_equals_linear_with_the_dequantized_weight(kernel_path, bits, p, with_bias):
    packed = _packed(bits, p)
    x, bias = torch.randn(2, 3, 256), (torch.randn(48) if with_bias else None)
    expected = F.linear(x.double(), FORMATS["higgs"].dequantize(packed).double(),
                        None if bias is None else bias.double())
    y = packed(x, bias)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    if bits == 4:  # the native 4-bit batch-1 paths round x and the grid to int8
        assert_within_four_bit_error(y, expected.float())
    else:
        torch.testing.assert_close(y, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(256,), (1, 256), (5, 256), (2, 2, 2, 256), (33, 256)])
def test_op_takes_any_leading_dims(kernel_path, shape):
    packed = _packed(4, 2)
    x = torch.randn(shape)
    expected = (x.reshape(-1, 256) @ FORMATS["higgs"].dequantize(packed).T).reshape(*shape[:-1], 48)
    if kernel_path == "native" and x.numel() // 256 < 16:  # the int8 batch-1 path
        assert_within_four_bit_error(packed(x), expected)
    else:
        torch.testing.assert_close(packed(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("bits", "p"), CONFIGS)
def test_native_matches_reference(monkeypatch, bits, p):
    if not _has_native_lut_kernels():
        pytest.skip("native lookup-table / Hadamard kernels are not built on this machine")
    packed = _packed(bits, p, out_features=96, in_features=512, group_size=128)
    x, bias = torch.randn(7, 512), torch.randn(96)
    fast = packed(x, bias)
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    if bits == 4:
        assert_within_four_bit_error(fast, packed(x, bias))
    else:
        torch.testing.assert_close(fast, packed(x, bias), rtol=1e-4, atol=1e-4)


def test_reference_keeps_half_precision_inputs(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    packed = _packed(4, 1)
    x = torch.randn(4, 256)
    y = packed(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), packed(x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize(("bits", "p"), CONFIGS)
def test_opcheck(kernel_path, bits, p):
    packed = _packed(bits, p)
    for x, bias in [(torch.randn(3, 256), torch.randn(48)), (torch.randn(2, 4, 256), None)]:
        torch.library.opcheck(packed.op, (x, *packed.buffers.values(), bias, *packed.params.values()))
