"""The native kernels against float64 torch references written from the format
definitions, the scalar (no-AVX2) build against the same references, and the fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.kernels import hadamard, native
from slimgraph.kernels.grids import mirror_quadrant

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
BATCH_SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3)
# (1, in) and (3, in) take the GEMV loops, with a 4-row block and a 3-row tail for 3 ...
# ... (2, 5, in) a 4-row block and a 1-row tail; (64, in) the tiled dequantize-then-GEMM path.
FIXED_BATCH_SHAPES = [(1,), (3,), (2, 5), (64,)]
SCALE_DTYPES = [torch.float32, torch.float16, torch.uint8, torch.float8_e4m3fn]
E4M3_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


@pytest.fixture(scope="session")
def scalar_kernels():
    """The build without AVX2, which CPUs lacking it get (another ~60 s build, also cached)."""
    try:
        return native._build(avx2=False)
    except Exception as error:  # no compiler: the AVX2 build was skipped too
        pytest.skip(f"scalar kernels could not be built: {error}")


# ---- references: the format definitions, written out in plain torch ----------


def linear(x, weight, bias):
    """``x @ weight.T + bias`` in float64, returned as float32."""
    y = x.double() @ weight.T + (0 if bias is None else bias.double())
    return y.float()


def weight_int8(qweight, scales):
    return qweight.double() * scales.double()[:, None]


def weight_int4(codes, scales, zeros, group_size):
    out_features, in_features = codes.shape
    offsets = 8.0 if zeros is None else zeros.double()[..., None]
    grouped = codes.double().reshape(out_features, -1, group_size)
    return ((grouped - offsets) * scales.double()[..., None]).reshape(out_features, in_features)


def reference_int8(x, qweight, scales, bias):
    return linear(x, weight_int8(qweight, scales), bias)


def reference_int4(x, codes, scales, zeros, bias, group_size):
    return linear(x, weight_int4(codes, scales, zeros, group_size), bias)


def decode_scales(scales):
    """Group scales in float64: e8m0 bytes are 2**(s - 127) with 255 NaN, the rest as torch."""
    if scales.dtype == torch.uint8:
        return torch.where(scales == 255, float("nan"), torch.exp2(scales.double() - 127))
    return scales.double()


def weight_lut(weight_codes, lut, scales, group_size):
    """``w[o, i] = lut[code] * scale[o, i // group_size]``; a lut row of d values per code."""
    out_features = weight_codes.shape[0]
    values = lut.double()[weight_codes.long()].reshape(out_features, -1)
    return values * decode_scales(scales).repeat_interleave(group_size, dim=1)


def reference_lut(x, weight_codes, lut, scales, bias, group_size):
    return linear(x, weight_lut(weight_codes, lut, scales, group_size), bias)


X16_LEVELS, X8_LEVELS = 32767, 127  # csrc/common.h: int8 weights meet x in 16 bits, 4-bit codes in 8


def assert_within_fixed_point_error(got, x, weight, bias, weight_error=None, x_levels=X16_LEVELS):
    """``got`` equals ``x @ weight.T + bias`` within the batch-1 kernels' documented error.

    Those paths (csrc/common.h) round x per chunk of 32 columns to ``x_levels`` levels each
    side (``X16_LEVELS`` for int8 weights, ``X8_LEVELS`` for 4-bit codes), so each entry is
    off by at most max|x over its chunk| / (2 x_levels), and a weight by at most
    ``weight_error`` (lut4's int8 table: max|lut| / 254 times its scale). On top comes fp32
    summation, 1e-5 of sum |x| |w|. Batches of 16 rows and more and the columns the
    integer loops leave to float run in float, which this bound also covers.
    """
    x2 = x.double().reshape(-1, x.shape[-1])
    rows, in_features = x2.shape
    whole = in_features // 32 * 32
    chunk_max = x2[:, :whole].reshape(rows, -1, 32).abs().amax(-1)
    weight_chunk_sums = weight[:, :whole].abs().reshape(len(weight), -1, 32).sum(-1)
    bound = (chunk_max / (2 * x_levels)) @ weight_chunk_sums.T + 1e-5 * (x2.abs() @ weight.abs().T) + 1e-6
    if weight_error is not None:
        bound += x2.abs() @ weight_error.T
    expected = linear(x2, weight, bias).double()
    error = (got.double().reshape(rows, -1) - expected).abs()
    assert got.shape == (*x.shape[:-1], len(weight))
    assert (error <= bound).all(), f"largest error {error.max():.3g}, bound there {bound[error == error.max()].min():.3g}"


def lut4_table_error(lut, scales, group_size):
    return lut.abs().max().double() / (2 * X8_LEVELS) * decode_scales(scales).abs().repeat_interleave(group_size, dim=1)


def reference_int8_dynamic(x, qweight, weight_scales, bias):
    """The brief's torch reference, with an int64 matmul standing in for torch._int_mm."""
    x_scales = x.abs().amax(-1, keepdim=True) / 127
    x_scales[x_scales == 0] = 1
    xq = torch.round(x / x_scales).clamp(-127, 127).to(torch.int64)
    sums = (xq.reshape(-1, x.shape[-1]) @ qweight.to(torch.int64).T).reshape(*x.shape[:-1], -1)
    y = sums.float() * x_scales * weight_scales
    return y if bias is None else y + bias


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


def random_scales(dtype, out_features, groups, in_features, gen):
    """Scales that keep outputs near 1 for unit-normal x and table values, in ``dtype``."""
    if dtype == torch.uint8:  # e8m0 exponents around 2**-4 .. 2**0
        return torch.randint(123, 128, (out_features, groups), dtype=torch.uint8, generator=gen)
    scales = (0.5 + torch.rand(out_features, groups, generator=gen)) / in_features**0.5
    return scales.to(dtype)


def random_lut4(out_features, in_features, group_size, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen)
    lut = torch.randn(16, generator=gen)
    scales = random_scales(scale_dtype, out_features, in_features // group_size, in_features, gen)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, packed, lut, scales


def random_lut8(out_features, in_features, width, group_size, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (out_features, in_features // width), dtype=torch.uint8,
                          generator=gen)
    lut = torch.randn(256, width, generator=gen)
    scales = random_scales(scale_dtype, out_features, in_features // group_size, in_features, gen)
    return codes, lut, scales


def reference_rotate(x, signs):
    group_size = signs.numel()
    return hadamard.rotate(x.reshape(-1, group_size), signs).reshape(x.shape)


# ---- int8 ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_matches_reference(kernels, rows, with_bias):
    qweight, scales = random_int8(72, 203, seed=rows)  # 203 = 6 x 32 + an 11-column tail
    x = torch.randn(rows, 203)
    bias = torch.randn(72) if with_bias else None
    got = kernels.int8_linear(x, qweight, scales, bias)
    assert_within_fixed_point_error(got, x, weight_int8(qweight, scales), bias)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, in_features=st.integers(1, 300), out_features=st.integers(1, 40),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_random_shapes(kernels, batch_shape, in_features, out_features, with_bias, seed):
    qweight, scales = random_int8(out_features, in_features, seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out_features) if with_bias else None
    got = kernels.int8_linear(x, qweight, scales, bias)
    assert_within_fixed_point_error(got, x, weight_int8(qweight, scales), bias)


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
    assert_within_fixed_point_error(got, x, weight_int4(codes, scales, zeros, group_size), bias,
                                    x_levels=X8_LEVELS)


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
    assert_within_fixed_point_error(got, x, weight_int4(codes, scales, zeros, group_size), bias,
                                    x_levels=X8_LEVELS)


def test_int4_wide_layer_with_a_large_batch(kernels):
    """The tiled dequantize-then-GEMM path (M >= 16) over several weight tiles."""
    codes, packed, scales, zeros = random_int4(200, 512, 128, False, seed=1)
    x = torch.randn(2, 20, 512)
    got = kernels.int4_linear(x, packed, scales, zeros, None, 128)
    torch.testing.assert_close(got, reference_int4(x, codes, scales, zeros, None, 128), **TOLERANCE)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_large_batches_run_under_inference_mode(kernels, mode):
    """The tiled path calls ATen on OpenMP threads: they must see the caller's inference mode
    (else its in-place GEMM into the output throws there, and the process aborts)."""
    codes, packed, scales, zeros = random_int4(200, 256, 128, False, seed=2)
    x = torch.randn(40, 256)
    with mode():
        got = kernels.int4_linear(x, packed, scales, zeros, None, 128)
    torch.testing.assert_close(got, reference_int4(x, codes, scales, zeros, None, 128), **TOLERANCE)


def test_non_contiguous_input(kernels):
    qweight, scales = random_int8(16, 64, seed=0)
    x = torch.randn(64, 5).T  # [5, 64], column-major
    assert_within_fixed_point_error(kernels.int8_linear(x, qweight, scales, None), x,
                                    weight_int8(qweight, scales), None)


# ---- lut4 ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", FIXED_BATCH_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_lut4_matches_reference(kernels, batch_shape, with_bias, scale_dtype, group_size):
    in_features = 4 * group_size
    codes, packed, lut, scales = random_lut4(37, in_features, group_size, scale_dtype, seed=7)
    x = torch.randn(*batch_shape, in_features)
    bias = torch.randn(37) if with_bias else None
    got = kernels.lut4_linear(x, packed, lut, scales, bias, group_size)
    assert_within_fixed_point_error(got, x, weight_lut(codes, lut, scales, group_size), bias,
                                    lut4_table_error(lut, scales, group_size), X8_LEVELS)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, group_size=st.sampled_from([16, 32, 48, 64, 128, 256]),
       groups=st.integers(1, 4), out_features=st.integers(1, 40),
       scale_dtype=st.sampled_from(SCALE_DTYPES), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lut4_random_shapes(kernels, batch_shape, group_size, groups, out_features, scale_dtype,
                            with_bias, seed):
    in_features = group_size * groups
    codes, packed, lut, scales = random_lut4(out_features, in_features, group_size, scale_dtype,
                                             seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out_features) if with_bias else None
    got = kernels.lut4_linear(x, packed, lut, scales, bias, group_size)
    assert_within_fixed_point_error(got, x, weight_lut(codes, lut, scales, group_size), bias,
                                    lut4_table_error(lut, scales, group_size), X8_LEVELS)


@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("rows", [1, 16])
def test_every_byte_scale_decodes_exactly(kernels, scale_dtype, rows):
    """All 256 e8m0 / float8_e4m3fn scales, NaN encodings included, read back through one-hot x."""
    scales = torch.arange(256, dtype=torch.uint8).view(scale_dtype)[:, None]
    packed = torch.full((256, 8), 0x11, dtype=torch.uint8)  # every code 1
    lut = torch.zeros(16)
    lut[1] = 1.5
    x = torch.eye(16)[:rows]  # y[m, o] = w[o, m] = 1.5 * scale[o], exact in float32
    got = kernels.lut4_linear(x, packed, lut, scales, None, 16)
    expected = (1.5 * decode_scales(scales)).float().T.expand(rows, 256)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fixed_point_paths_keep_non_finite_inputs_non_finite(kernels, bad):
    """A 32-column chunk holding inf or NaN must not round to finite integers: its row's outputs
    are NaN (the reference gives inf or NaN there), the other rows are untouched."""
    codes, packed, lut, scales = random_lut4(8, 64, 32, torch.float32, seed=0)
    qweight, int8_scales = random_int8(8, 64, seed=0)
    x = torch.randn(3, 64)
    x[1, 40] = bad
    kept = torch.tensor([0, 2])
    for got, weight, weight_error, levels in [
        (kernels.lut4_linear(x, packed, lut, scales, None, 32), weight_lut(codes, lut, scales, 32),
         lut4_table_error(lut, scales, 32), X8_LEVELS),
        (kernels.int8_linear(x, qweight, int8_scales, None), weight_int8(qweight, int8_scales), None, X16_LEVELS),
    ]:
        assert got[1].isnan().all()
        assert_within_fixed_point_error(got[kept], x[kept], weight, None, weight_error, levels)


# ---- lut8 ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", FIXED_BATCH_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("table", ["pairs", "floats", "e4m3"])
@pytest.mark.parametrize("group_size", [16, "row"])
def test_lut8_matches_reference(kernels, batch_shape, with_bias, scale_dtype, table, group_size):
    in_features = 96
    group_size = in_features if group_size == "row" else group_size
    width = 2 if table == "pairs" else 1
    codes, lut, scales = random_lut8(37, in_features, width, group_size, scale_dtype, seed=3)
    if table == "e4m3":  # fp8 weights, the arithmetic decode: codes of values in [-4, 4]
        small = torch.nonzero(E4M3_TABLE.abs() <= 4).flatten().to(torch.uint8)
        lut, codes = E4M3_TABLE[:, None], small[codes.long() % small.numel()]
    x = torch.randn(*batch_shape, in_features)
    bias = torch.randn(37) if with_bias else None
    got = kernels.lut8_linear(x, codes, lut, scales, bias, group_size)
    assert got.shape == (*batch_shape, 37)
    expected = reference_lut(x, codes, lut, scales, bias, group_size)
    torch.testing.assert_close(got, expected, **TOLERANCE)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, width=st.sampled_from([1, 2]),
       group_size=st.sampled_from([16, 32, 64, 128]), groups=st.integers(1, 4),
       out_features=st.integers(1, 40), scale_dtype=st.sampled_from(SCALE_DTYPES),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lut8_random_shapes(kernels, batch_shape, width, group_size, groups, out_features,
                            scale_dtype, with_bias, seed):
    in_features = group_size * groups
    codes, lut, scales = random_lut8(out_features, in_features, width, group_size, scale_dtype,
                                     seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out_features) if with_bias else None
    got = kernels.lut8_linear(x, codes, lut, scales, bias, group_size)
    expected = reference_lut(x, codes, lut, scales, bias, group_size)
    torch.testing.assert_close(got, expected, **TOLERANCE)


def random_quadrant_lut(seed, shared_first=False):
    """A sign-symmetric ``[256, 2]`` pair grid in HIGGS p=2's layout (``grids.mirror_quadrant``);
    ``shared_first``: magnitudes ``j`` and ``j + 32`` share their first coordinate, as shipped."""
    quadrant = torch.rand(64, 2, generator=torch.Generator().manual_seed(seed)) * 3 + 0.05
    if shared_first:
        quadrant[32:, 0] = quadrant[:32, 0]
    return mirror_quadrant(quadrant)


def assert_quadrant_pairs_within_bound(kernels, batch_shape, out_features, group_size, groups,
                                       scale_dtype, with_bias, seed, shared_first):
    """Pairs on a sign-symmetric grid run in int8 below 16 rows (x per 32 columns, magnitudes
    to max / 127), as 4-bit codes do; the tiled path and float tails stay within it too."""
    in_features = group_size * groups
    codes, _, scales = random_lut8(out_features, in_features, 2, group_size, scale_dtype, seed)
    lut = random_quadrant_lut(seed, shared_first)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    got = kernels.lut8_linear(x, codes, lut, scales, bias, group_size)
    assert_within_fixed_point_error(got, x, weight_lut(codes, lut, scales, group_size), bias,
                                    lut4_table_error(lut, scales, group_size), X8_LEVELS)


@pytest.mark.parametrize("batch_shape", FIXED_BATCH_SHAPES)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize(("group_size", "groups"), [(16, 5), (32, 5), (128, 3)])  # 80, 160: float tails
@pytest.mark.parametrize("shared_first", [False, True])
def test_lut8_sign_symmetric_pairs_match_reference(kernels, batch_shape, scale_dtype, group_size, groups,
                                                   shared_first):
    assert_quadrant_pairs_within_bound(kernels, batch_shape, 37, group_size, groups, scale_dtype, True, 5,
                                       shared_first)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, group_size=st.sampled_from([16, 32, 48, 64, 128]), groups=st.integers(1, 4),
       out_features=st.integers(1, 40), scale_dtype=st.sampled_from(SCALE_DTYPES), with_bias=st.booleans(),
       seed=st.integers(0, 2**16), shared_first=st.booleans())
def test_lut8_sign_symmetric_pairs_random_shapes(kernels, batch_shape, group_size, groups, out_features,
                                                 scale_dtype, with_bias, seed, shared_first):
    assert_quadrant_pairs_within_bound(kernels, batch_shape, out_features, group_size, groups, scale_dtype,
                                       with_bias, seed, shared_first)


def test_lut8_pairs_off_the_symmetric_layout_stay_exact(kernels):
    """One entry off the layout sends the grid down the float path: tight tolerance again."""
    codes, _, scales = random_lut8(24, 256, 2, 64, torch.float32, seed=1)
    lut = random_quadrant_lut(1)
    lut[200, 0] += 0.25
    x = torch.randn(1, 256)
    got = kernels.lut8_linear(x, codes, lut, scales, None, 64)
    torch.testing.assert_close(got, reference_lut(x, codes, lut, scales, None, 64), **TOLERANCE)


@pytest.mark.parametrize("rows", [1, 16])
def test_lut8_e4m3_decodes_every_code_exactly(kernels, rows):
    """Row o of the weight is all code o: one-hot x reads back E4M3_TABLE[o], NaN included."""
    codes = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).contiguous()
    x = torch.eye(16)[:rows]
    got = kernels.lut8_linear(x, codes, E4M3_TABLE[:, None], torch.ones(256, 1), None, 16)
    expected = E4M3_TABLE.expand(rows, 256)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


# ---- hadamard_rotate ---------------------------------------------------------------


@pytest.mark.parametrize("group_size", [2, 4, 8, 16, 64, 1024, 4096])
@pytest.mark.parametrize("batch_shape", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("signs_dtype", [torch.float32, torch.int8])  # HIGGS stores int8
def test_hadamard_rotate_matches_reference_bit_for_bit(kernels, group_size, batch_shape, signs_dtype):
    """Three groups a row: for g = 2 and 4 the rows are not whole vectors (the scalar tail)."""
    x = torch.randn(*batch_shape, 3 * group_size)
    signs = hadamard.random_signs(group_size, seed=group_size)
    got = kernels.hadamard_rotate(x, signs.to(signs_dtype))
    torch.testing.assert_close(got, reference_rotate(x, signs), rtol=0, atol=0)


def test_hadamard_rotate_large_input_runs_in_parallel_chunks(kernels):
    x = torch.randn(64, 4096)  # 2**18 floats: HADAMARD_PARALLEL_MIN, so OpenMP splits it
    signs = hadamard.random_signs(128, seed=0)
    torch.testing.assert_close(kernels.hadamard_rotate(x, signs), reference_rotate(x, signs),
                               rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, log_group=st.integers(1, 9), groups=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_hadamard_rotate_random_shapes(kernels, batch_shape, log_group, groups, seed):
    group_size = 2**log_group
    x = torch.randn(*batch_shape, groups * group_size,
                    generator=torch.Generator().manual_seed(seed))
    signs = hadamard.random_signs(group_size, seed=seed)
    got = kernels.hadamard_rotate(x, signs)
    torch.testing.assert_close(got, reference_rotate(x, signs), rtol=1e-5, atol=1e-6)


# ---- int8_dynamic_linear -------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", FIXED_BATCH_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("in_features", [203, 256])  # 203: a 11-column tail after 12 x 16
def test_int8_dynamic_matches_reference(kernels, batch_shape, with_bias, in_features):
    qweight, weight_scales = random_int8(37, in_features, seed=in_features)
    qweight[0, :5] = -128  # the one int8 value outside the symmetric range still multiplies
    x = torch.randn(*batch_shape, in_features)
    x.view(-1, in_features)[0] = 0  # an all-zero row: its scale is 1, its output the bias
    bias = torch.randn(37) if with_bias else None
    got = kernels.int8_dynamic_linear(x, qweight, weight_scales, bias)
    assert got.shape == (*batch_shape, 37)
    expected = reference_int8_dynamic(x, qweight, weight_scales, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(batch_shape=BATCH_SHAPES, in_features=st.integers(1, 300), out_features=st.integers(1, 40),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_dynamic_random_shapes(kernels, batch_shape, in_features, out_features, with_bias,
                                    seed):
    qweight, weight_scales = random_int8(out_features, in_features, seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(out_features) if with_bias else None
    got = kernels.int8_dynamic_linear(x, qweight, weight_scales, bias)
    expected = reference_int8_dynamic(x, qweight, weight_scales, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 20])
def test_int8_dynamic_rounds_half_to_even(kernels, rows):
    """max|x| = 127 makes the scale 1, and an identity weight reads the int8 codes back."""
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 126.5, -126.5, 0.49, 2.51])
    x = torch.cat([torch.tensor([127.0]), halves, torch.zeros(9)]).expand(rows, 20)
    identity = torch.eye(20).to(torch.int8)
    got = kernels.int8_dynamic_linear(x, identity, torch.ones(20), None)
    expected = torch.cat([torch.tensor([127.0, 0, 2, 2, 0, -2, 4, 126, -126, 0, 3]),
                          torch.zeros(9)])
    torch.testing.assert_close(got, expected.expand(rows, 20), rtol=0, atol=0)


def test_int8_dynamic_sums_exactly_in_int32(kernels):
    """127 * 127 * 4095 = 66048255 is past 2**24: an fp32 sum gives 66048252, int32 is exact."""
    qweight = torch.full((1, 4099), 127, dtype=torch.int8)
    qweight[0, :4] = 0  # 4095 odd terms; 4099 leaves a 3-column scalar tail
    x = torch.full((1, 4099), 127.0)
    got = kernels.int8_dynamic_linear(x, qweight, torch.ones(1), None)
    assert got.item() == float(torch.tensor(127 * 127 * 4095).float())


# ---- the scalar build: what CPUs without AVX2 run -------------------------------------


def scalar_cases():
    """(name, call(module, x), x, expected) for each kernel through its scalar loops."""
    cases = []
    for rows in (3, 20):
        x = torch.randn(rows, 64)
        codes, packed, lut, scales = random_lut4(11, 64, 32, torch.float16, seed=rows)
        cases.append((f"lut4-{rows}", lambda m, x, a=(packed, lut, scales): m.lut4_linear(
            x, *a, None, 32), x, reference_lut(x, codes, lut, scales, None, 32)))
        for width in (1, 2):
            codes8, lut8, scales8 = random_lut8(11, 64, width, 16, torch.uint8, seed=rows)
            cases.append((f"lut8-d{width}-{rows}", lambda m, x, a=(codes8, lut8, scales8): (
                m.lut8_linear(x, *a, None, 16)), x, reference_lut(x, codes8, lut8, scales8,
                                                                   None, 16)))
        qweight, weight_scales = random_int8(11, 64, seed=rows)
        cases.append((f"int8_dynamic-{rows}", lambda m, x, a=(qweight, weight_scales): (
            m.int8_dynamic_linear(x, *a, None)), x, reference_int8_dynamic(x, qweight,
                                                                           weight_scales, None)))
    for group_size in (4, 64):
        x, signs = torch.randn(3, 128), hadamard.random_signs(group_size, seed=1)
        cases.append((f"hadamard-{group_size}", lambda m, x, s=signs: m.hadamard_rotate(x, s), x,
                      reference_rotate(x, signs)))
    return cases


@pytest.mark.parametrize("case", scalar_cases(), ids=lambda case: case[0])
def test_scalar_build_matches_reference(scalar_kernels, case):
    _, call, x, expected = case
    assert not scalar_kernels.built_with_avx2()
    torch.testing.assert_close(call(scalar_kernels, x), expected, rtol=1e-5, atol=1e-5)


def test_module_functions_forward_to_the_extension(kernels):
    codes, packed, lut, scales = random_lut4(8, 32, 16, torch.float32, seed=0)
    codes8, lut8, scales8 = random_lut8(8, 32, 2, 16, torch.float16, seed=0)
    qweight, weight_scales = random_int8(8, 32, seed=0)
    x, signs = torch.randn(2, 32), hadamard.random_signs(32, seed=0)
    assert_within_fixed_point_error(native.lut4_linear(x, packed, lut, scales, None, 16), x,
                                    weight_lut(codes, lut, scales, 16), None,
                                    lut4_table_error(lut, scales, 16), X8_LEVELS)
    torch.testing.assert_close(native.lut8_linear(x, codes8, lut8, scales8, None, 16),
                               reference_lut(x, codes8, lut8, scales8, None, 16), **TOLERANCE)
    torch.testing.assert_close(native.hadamard_rotate(x, signs), reference_rotate(x, signs))
    torch.testing.assert_close(native.int8_dynamic_linear(x, qweight, weight_scales, None),
                               reference_int8_dynamic(x, qweight, weight_scales, None))


# ---- errors and the fallback --------------------------------------------------


def test_wrong_dtype_names_the_op_and_the_fix(kernels):
    qweight, scales = random_int8(8, 32, seed=0)
    with pytest.raises(RuntimeError, match=r"int8_linear: x must be float32.*x\.float\(\)"):
        kernels.int8_linear(torch.randn(2, 32, dtype=torch.float64), qweight, scales, None)


def test_group_size_that_does_not_divide_in_features_is_rejected(kernels):
    _, packed, scales, zeros = random_int4(8, 64, 32, False, seed=0)
    with pytest.raises(RuntimeError, match="group_size=24 must be even and divide in_features=64"):
        kernels.int4_linear(torch.randn(1, 64), packed, scales, zeros, None, 24)


def bad_inputs():
    """(id, call(module), message pattern): each names the argument and what it must be."""
    x = torch.randn(2, 64)
    _, packed, lut, scales = random_lut4(8, 64, 32, torch.float16, seed=0)
    codes, lut8, scales8 = random_lut8(8, 64, 1, 32, torch.float32, seed=0)
    qweight, weight_scales = random_int8(8, 64, seed=0)
    signs = torch.ones(16)
    return [
        ("lut4-group", lambda m: m.lut4_linear(x, packed, lut, scales, None, 24),
         r"lut4_linear: group_size=24 must be a multiple of 16 that divides in_features=64"),
        ("lut4-packed", lambda m: m.lut4_linear(x, packed.int(), lut, scales, None, 32),
         r"lut4_linear: packed must be a 2-D uint8 \[out, in/2\] tensor, got Int"),
        ("lut4-lut", lambda m: m.lut4_linear(x, packed, lut[:8], scales, None, 32),
         r"lut4_linear: lut must be a float32 \[16\] tensor \(code -> value\), got Float \[8\]"),
        ("lut4-scales-dtype", lambda m: m.lut4_linear(x, packed, lut, scales.int(), None, 32),
         r"scales must be float32, float16, uint8 \(e8m0\) or float8_e4m3fn, got Int"),
        ("lut4-scales-shape", lambda m: m.lut4_linear(x, packed, lut, scales.T, None, 32),
         r"scales must be \[out, in/group_size\] = \[8, 2\], got \[2, 8\]"),
        ("lut4-x", lambda m: m.lut4_linear(x[:, :32], packed, lut, scales, None, 32),
         r"lut4_linear: x has last dim 32 but the weight has in_features=64"),
        ("lut4-bias", lambda m: m.lut4_linear(x, packed, lut, scales, torch.ones(3), 32),
         r"lut4_linear: bias has 3 elements, expected 8"),
        ("lut8-lut", lambda m: m.lut8_linear(x, codes, torch.ones(256, 3), scales8, None, 32),
         r"lut8_linear: lut must be a float32 \[256, d\] tensor with d = 1 or 2, got Float "
         r"\[256, 3\]"),
        ("lut8-codes", lambda m: m.lut8_linear(x, codes.char(), lut8, scales8, None, 32),
         r"lut8_linear: codes must be a 2-D uint8 \[out, in/1\] tensor, got Char"),
        ("lut8-scales", lambda m: m.lut8_linear(x, codes, lut8, scales8[:, :1], None, 32),
         r"lut8_linear: scales must be \[out, in/group_size\] = \[8, 2\], got \[8, 1\]"),
        ("hadamard-g", lambda m: m.hadamard_rotate(x, torch.ones(12)),
         r"hadamard_rotate: the group size g=12 \(signs.numel\(\)\) must be a power of two"),
        ("hadamard-big-g", lambda m: m.hadamard_rotate(torch.randn(8192), torch.ones(8192)),
         r"g=8192 \(signs.numel\(\)\) must be a power of two from 2 to 4096"),
        ("hadamard-x", lambda m: m.hadamard_rotate(torch.randn(2, 24), signs),
         r"hadamard_rotate: x has last dim 24, which is not a multiple of the group size g=16"),
        ("hadamard-signs", lambda m: m.hadamard_rotate(x, signs.double()),
         r"hadamard_rotate: signs must be a 1-D float32 or int8 \[g\] tensor of \+-1, got Double"),
        ("hadamard-x-dtype", lambda m: m.hadamard_rotate(x.half(), signs),
         r"hadamard_rotate: x must be float32, got Half"),
        ("w8a8-qweight", lambda m: m.int8_dynamic_linear(x, qweight.float(), weight_scales, None),
         r"int8_dynamic_linear: qweight must be a 2-D int8 \[out, in\] tensor, got Float"),
        ("w8a8-scales", lambda m: m.int8_dynamic_linear(x, qweight, weight_scales[:3], None),
         r"int8_dynamic_linear: weight_scales has 3 elements, expected one per output row \(8\)"),
        ("w8a8-too-wide", lambda m: m.int8_dynamic_linear(
            torch.randn(1, 132105), torch.zeros(1, 132105, dtype=torch.int8), torch.ones(1), None),
         r"in_features=132105 exceeds 132104, beyond which an int32 sum"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda case: case[0])
def test_bad_inputs_name_the_argument(kernels, case):
    _, call, pattern = case
    with pytest.raises(RuntimeError, match=pattern):
        call(kernels)


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
