"""The native int8/int4 kernels against a float64 torch reference, and their fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.kernels import native

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
BATCH_SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3)


@pytest.fixture(scope="session")
def kernels():
    """The compiled extension (the first build takes ~20-80 s; torch caches it on disk)."""
    module = native.load()
    if module is None:
        pytest.skip("native kernels could not be built on this machine (no C++ compiler?)")
    return module


# ---- references: the format definitions, written out in plain torch ----------


def reference_int8(x, qweight, scales, bias):
    weight = qweight.double() * scales.double()[:, None]
    y = x.double() @ weight.T + (0 if bias is None else bias.double())
    return y.float()


def reference_int4(x, codes, scales, zeros, bias, group_size):
    out_features, in_features = codes.shape
    offsets = 8.0 if zeros is None else zeros.double()[..., None]
    grouped = codes.double().reshape(out_features, -1, group_size)
    weight = ((grouped - offsets) * scales.double()[..., None]).reshape(out_features, in_features)
    y = x.double() @ weight.T + (0 if bias is None else bias.double())
    return y.float()


def random_int8(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=gen)
    scales = torch.rand(out_features, generator=gen) / (127 * in_features**0.5)
    return qweight, scales


def random_int4(out_features, in_features, group_size, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen)
    groups = in_features // group_size
    scales = (torch.rand(out_features, groups, generator=gen) / (8 * in_features**0.5)).half()
    zeros = None if symmetric else torch.randint(0, 16, (out_features, groups), dtype=torch.uint8,
                                                 generator=gen)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, packed, scales, zeros


# ---- int8 ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_matches_reference(kernels, rows, with_bias):
    qweight, scales = random_int8(72, 203, seed=rows)  # 203 = 6 x 32 + an 11-column tail
    x = torch.randn(rows, 203)
    bias = torch.randn(72) if with_bias else None
    got = kernels.int8_linear(x, qweight, scales, bias)
    torch.testing.assert_close(got, reference_int8(x, qweight, scales, bias), **TOLERANCE)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, in_features=st.integers(1, 300), out_features=st.integers(1, 40),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_random_shapes(kernels, batch_shape, in_features, out_features, with_bias, seed):
    qweight, scales = random_int8(out_features, in_features, seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out_features) if with_bias else None
    got = kernels.int8_linear(x, qweight, scales, bias)
    assert got.shape == (*batch_shape, out_features)
    torch.testing.assert_close(got, reference_int8(x, qweight, scales, bias), **TOLERANCE)


# ---- int4 ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int4_matches_reference(kernels, rows, symmetric, with_bias):
    group_size = 40  # not a multiple of 16 or 32: exercises the in-group tails
    codes, packed, scales, zeros = random_int4(56, 5 * group_size, group_size, symmetric, rows)
    x = torch.randn(rows, 5 * group_size)
    bias = torch.randn(56) if with_bias else None
    got = kernels.int4_linear(x, packed, scales, zeros, bias, group_size)
    expected = reference_int4(x, codes, scales, zeros, bias, group_size)
    torch.testing.assert_close(got, expected, **TOLERANCE)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, group_size=st.sampled_from([2, 8, 18, 32, 64, 128]),
       groups=st.integers(1, 4), out_features=st.integers(1, 40), symmetric=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_random_shapes(kernels, batch_shape, group_size, groups, out_features, symmetric,
                            with_bias, seed):
    in_features = group_size * groups
    codes, packed, scales, zeros = random_int4(out_features, in_features, group_size, symmetric,
                                               seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out_features) if with_bias else None
    got = kernels.int4_linear(x, packed, scales, zeros, bias, group_size)
    assert got.shape == (*batch_shape, out_features)
    expected = reference_int4(x, codes, scales, zeros, bias, group_size)
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_int4_wide_layer_with_a_large_batch(kernels):
    """The tiled dequantize-then-GEMM path (M >= 16) over several weight tiles."""
    codes, packed, scales, zeros = random_int4(200, 512, 128, False, seed=1)
    x = torch.randn(2, 20, 512)
    got = kernels.int4_linear(x, packed, scales, zeros, None, 128)
    torch.testing.assert_close(got, reference_int4(x, codes, scales, zeros, None, 128), **TOLERANCE)


def test_non_contiguous_input(kernels):
    qweight, scales = random_int8(16, 64, seed=0)
    x = torch.randn(64, 5).T  # [5, 64], column-major
    torch.testing.assert_close(kernels.int8_linear(x, qweight, scales, None),
                               reference_int8(x, qweight, scales, None), **TOLERANCE)


# ---- errors and the fallback --------------------------------------------------


def test_wrong_dtype_names_the_op_and_the_fix(kernels):
    qweight, scales = random_int8(8, 32, seed=0)
    with pytest.raises(RuntimeError, match=r"int8_linear: x must be float32.*x\.float\(\)"):
        kernels.int8_linear(torch.randn(2, 32, dtype=torch.float64), qweight, scales, None)


def test_group_size_that_does_not_divide_in_features_is_rejected(kernels):
    _, packed, scales, zeros = random_int4(8, 64, 32, False, seed=0)
    with pytest.raises(RuntimeError, match="group_size=24 must be even and divide in_features=64"):
        kernels.int4_linear(torch.randn(1, 64), packed, scales, zeros, None, 24)


def test_disabled_by_environment_returns_none_silently(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None
        assert native.load() is None
    with pytest.raises(RuntimeError, match="SLIMGRAPH_NO_NATIVE=1"):
        native.int8_linear(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8), torch.ones(2))


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler found ('c++' is not on PATH)")

    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="native quantized kernels unavailable") as record:
        assert native.load() is None
        assert native.load() is None
    assert len(record) == 1
    assert "Install g++" in str(record[0].message)
