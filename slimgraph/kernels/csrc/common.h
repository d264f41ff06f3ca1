// Shared by the native kernels of slimgraph.kernels.native: includes, the group
// scale readers, and the drivers that spread a linear's output rows over threads.
//
// Batch-1 inference on a CPU is memory bound: the time goes into reading the
// weight, so reading 1 (int8, fp8) or 0.5 (4-bit) bytes per weight instead of 4 is
// the whole speedup. The kernels therefore dequantize in registers, never in memory:
//
//   * OpenMP splits the output rows (one weight row each) across threads, in
//     dynamic chunks: on a busy machine a statically assigned thread that is
//     not scheduled stalls the whole call for a time slice (measured 8-12 ms).
//   * The batch-1 loops multiply integers, so no weight is ever converted to fp32:
//     int8 weights with x rounded to 16 bits per 32 columns (fixed_point_x), 4-bit
//     codes (int4 and the tables) as int8 table values with x rounded to 8 bits
//     (lut_linear.cpp). fp8 and HIGGS p=2 (lut8) widen weights to fp32 and FMA them
//     (scalar loops without AVX2 and for k tails everywhere).
//   * Up to ROWS_PER_PASS rows of x share one pass over the weights, so a
//     batch of M reads the weight ceil(M / 4) times, all passes in one parallel
//     region (see gemv).
//   * From LARGE_M rows on, the work is compute bound instead: each thread
//     dequantizes a tile of weight rows to fp32 and at::mm (a blocked GEMM)
//     multiplies it (run_linear), so no caller needs a fallback for large batches.
//
// Summation order differs from the torch reference (x @ W.T), and the batch-1 loops
// round x (and 4-bit tables not exact in int8) as described below: results agree with
// the reference to 2e-5 (int8) and about 3e-3 (4-bit) relative, not bit for bit. The tiled path
// dequantizes each weight with the reference's roundings (lut[code] * scale).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t ROWS_PER_PASS = 4;
constexpr int64_t LARGE_M = 16;
constexpr int64_t TILE_OUT = 64;  // weight rows dequantized per at::mm call

int num_threads() { return std::max(1, at::get_num_threads()); }

#ifdef __AVX2__
float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

int32_t horizontal_sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01001110));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10110001));
  return _mm_cvtsi128_si32(s);
}
#endif

// ---- group scales: decoded where they are used ------------------------------

// A group's scale is decoded next to the FMAs, so a call never writes an fp32 copy of
// the scales first: with group 16 that copy would add half the 4-bit weight traffic.
struct Float32Scales {
  const float* data;
  float operator[](int64_t i) const { return data[i]; }
  Float32Scales shifted(int64_t n) const { return {data + n}; }
};

struct Float16Scales {
  const at::Half* data;
  float operator[](int64_t i) const {
#ifdef __F16C__
    return _cvtsh_ss(data[i].x);  // one instruction; c10's conversion is bit arithmetic
#else
    return static_cast<float>(data[i]);
#endif
  }
  Float16Scales shifted(int64_t n) const { return {data + n}; }
};

// One byte per scale, decoded by a 256-entry table: e8m0 (MX) or float8_e4m3fn (NVFP4).
struct ByteScales {
  const uint8_t* data;
  const float* table;
  float operator[](int64_t i) const { return table[data[i]]; }
  ByteScales shifted(int64_t n) const { return {data + n, table}; }
};

// e8m0: the byte is a biased exponent, 2**(s - 127); 255 encodes NaN.
const float* e8m0_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int s = 0; s < 256; ++s)
      values[s] = s == 255 ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(1.0f, s - 127);
    return values;
  }();
  return table.data();
}

// float8_e4m3fn decoded by c10 itself, so the kernels agree with scales.float() bit for bit.
const float* e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int bits = 0; bits < 256; ++bits)
      values[bits] = static_cast<float>(
          c10::Float8_e4m3fn(static_cast<uint8_t>(bits), c10::Float8_e4m3fn::from_bits()));
    return values;
  }();
  return table.data();
}

void check_scales(const at::Tensor& scales, int64_t N, int64_t groups, const char* op) {
  auto type = scales.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kByte ||
                  type == at::kFloat8_e4m3fn,
              op, ": scales must be float32, float16, uint8 (e8m0) or float8_e4m3fn, got ", type,
              ".");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == groups, op,
              ": scales must be [out, in/group_size] = [", N, ", ", groups, "], got ",
              scales.sizes(), ".");
}

// Calls body(reader) with the reader type that matches the scales' dtype.
template <typename Body>
void with_scales(const at::Tensor& scales, Body&& body) {
  switch (scales.scalar_type()) {
    case at::kFloat: body(Float32Scales{scales.data_ptr<float>()}); break;
    case at::kHalf: body(Float16Scales{scales.data_ptr<at::Half>()}); break;
    case at::kByte: body(ByteScales{scales.data_ptr<uint8_t>(), e8m0_table()}); break;
    default:
      body(ByteScales{static_cast<const uint8_t*>(scales.data_ptr()), e4m3_table()});
      break;
  }
}

int64_t check_group_size(int64_t group_size, int64_t K, const char* op) {
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0 && K % group_size == 0, op,
              ": group_size=", group_size, " must be a multiple of 16 that divides in_features=",
              K, ".");
  return K / group_size;
}

// ---- drivers ---------------------------------------------------------------

// Calls kernel(std::integral_constant<int, R>, m) for blocks of up to ROWS_PER_PASS rows.
template <typename Kernel>
void for_row_blocks(int64_t M, Kernel&& kernel) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) kernel(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: kernel(std::integral_constant<int, 3>{}, m); break;
    case 2: kernel(std::integral_constant<int, 2>{}, m); break;
    case 1: kernel(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Small M: kernel(rows, m, o) computes y[m .. m + R, o] for an R-row block of x. Blocks
// run one after another over all weight rows (the block's x stays in L1 while the weight
// streams past), inside a single parallel region whose loops do not wait for each other:
// on a loaded machine every barrier can wait a time slice for a descheduled thread, and
// a barrier per block made the benchmark's batch-64 int8_dynamic_linear take 2 s, not 66 ms.
// (Running every block over a few weight rows held in L1 instead was 1.4x slower at M = 64.)
template <typename Kernel>
void gemv(int64_t M, int64_t N, Kernel&& kernel) {
#pragma omp parallel num_threads(num_threads())
  for_row_blocks(M, [&](auto rows, int64_t m) {
#pragma omp for schedule(dynamic, 64) nowait
    for (int64_t o = 0; o < N; ++o) kernel(rows, m, o);
  });
}

// y[m + r, o] = dots[r] + bias[o] for an R-row block.
template <int R>
void store_outputs(const float* dots, const float* bias, int64_t o, float* y_block, int64_t N) {
  float b = bias ? bias[o] : 0.f;
  for (int r = 0; r < R; ++r) y_block[r * N + o] = dots[r] + b;
}

// Large M: each thread dequantizes TILE_OUT weight rows and multiplies them with at::mm.
template <typename Dequantize>
void tiled_gemm(const at::Tensor& x, at::Tensor& y, int64_t K, int64_t N,
                Dequantize&& dequantize) {
  int64_t tiles = (N + TILE_OUT - 1) / TILE_OUT;
  // ATen calls on OpenMP threads need the caller's thread-local state: without it, under
  // torch.inference_mode() the worker's addmm_ into y (an inference tensor) throws, and an
  // exception leaving an OpenMP region ends the process.
  const at::ThreadLocalState caller_state;
  // at::mm runs single threaded inside the OpenMP region; the tiles carry the parallelism.
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads())
  for (int64_t t = 0; t < tiles; ++t) {
    at::ThreadLocalStateGuard state(caller_state);
    int64_t start = t * TILE_OUT, rows = std::min(TILE_OUT, N - start);
    at::Tensor w = at::empty({rows, K}, x.options());
    dequantize(start, rows, w.data_ptr<float>());
    y.narrow(1, start, rows).addmm_(x, w.t(), 1.0, 1.0);
  }
}

at::Tensor flatten_input(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ",
              x.scalar_type(), "; cast the activations with x.float().");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x has last dim ",
              x.dim() ? x.size(-1) : 0, " but the weight has in_features=", K, ".");
  // Inference only: detached, so the tiled path's in-place addmm_ from many threads
  // never touches autograd state.
  return x.detach().reshape({-1, K}).contiguous();
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, at::Tensor& holder, int64_t N,
                      const char* op) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->numel() == N, op, ": bias has ", bias->numel(), " elements, expected ", N,
              ".");
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

// Bias is added by the row kernels; the tiled path starts y at bias (or zero).
at::Tensor initial_output(int64_t M, int64_t N, const float* bias, const at::Tensor& x) {
  at::Tensor y = at::empty({M, N}, x.options());
  if (M >= LARGE_M) {
    if (bias)
      y.copy_(at::from_blob(const_cast<float*>(bias), {1, N}, x.options()).expand({M, N}));
    else
      y.zero_();
  }
  return y;
}

// Small M through gemv and dots(rows, m, o, float* dots) -> R dot products, y = dots + bias;
// large M through tiled_gemm and dequantize(start, rows, float* w).
template <typename Dots, typename Dequantize>
void run_linear(const at::Tensor& x, at::Tensor& y, const float* bias, Dots&& dots,
                Dequantize&& dequantize) {
  int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  if (M >= LARGE_M) {
    tiled_gemm(x, y, K, N, dequantize);
    return;
  }
  float* yp = y.data_ptr<float>();
  gemv(M, N, [&](auto rows, int64_t m, int64_t o) {
    constexpr int R = decltype(rows)::value;
    float out[R];
    dots(rows, m, o, out);
    store_outputs<R>(out, bias, o, yp + m * N, N);
  });
}

// ---- activations in fixed point (the batch-1 paths) -----------------------------
//
// Widening every weight to fp32 costs more than reading it, so the batch-1 loops multiply
// integers: x is rounded per chunk of 32 columns to round(x * levels / max|x|), the scale
// kept per chunk. int8 weights meet x in 16 bits (fixed_point_x, vpmaddwd: 16 multiply-adds
// an instruction; each entry off by at most max|x| / 65534, about 2e-5 of the output);
// 4-bit codes meet it in 8 bits (lut_linear.cpp int8_x, vpmaddubsw). A chunk holding inf
// or NaN gets a NaN scale, so its outputs are NaN, never a silently finite value.
constexpr int64_t CHUNK = 32;
constexpr float X_LEVELS = 32767.f;
constexpr float X8_LEVELS = 127.f;

// The scale of one chunk of x with `levels` levels: max|x| / levels, NaN when the chunk
// holds inf or NaN. `inverse` becomes levels / max|x|, or 0 for a chunk of zeros or a
// non-finite one, whose codes (fixed_point_code) are then all 0.
inline float chunk_scale(const float* chunk, float levels, float& inverse) {
  float largest = 0.f, sum = 0.f;
  for (int64_t i = 0; i < CHUNK; ++i) {
    largest = std::max(largest, std::fabs(chunk[i]));
    sum += chunk[i];  // inf or NaN anywhere makes it non-finite
  }
  bool finite = std::isfinite(sum);
  inverse = finite && largest > 0.f ? levels / largest : 0.f;
  return finite ? largest / levels : std::numeric_limits<float>::quiet_NaN();
}

// rint, not lrint: GCC inlines rint (vroundss), while lrint stayed a call into libm per
// value. Same result: codes are far inside long's range, and both round to nearest even.
inline long fixed_point_code(float value, float inverse) {
  return inverse == 0.f ? 0 : static_cast<long>(std::rint(value * inverse));
}

// Rows of x in 16-bit fixed point, from some row on: plain values an inner loop keeps in registers.
struct FixedPointRows {
  const int16_t* q = nullptr;  // [rows, chunks * CHUNK]
  const float* s = nullptr;    // [rows, chunks]: x ≈ q * s
  int64_t chunks = 0;          // per row

  const int16_t* chunk(int64_t row, int64_t c) const { return q + (row * chunks + c) * CHUNK; }
  float scale(int64_t row, int64_t c) const { return s[row * chunks + c]; }
  FixedPointRows from(int64_t row) const { return {chunk(row, 0), s + row * chunks, chunks}; }
};

struct FixedPointX {  // the tensors that own a call's fixed-point rows
  at::Tensor values, scales;
  FixedPointRows rows;
};

// x [M, K] (float32, contiguous) in 16-bit fixed point, chunk by chunk in column order.
// Tail columns past the last whole chunk are left to the caller.
inline FixedPointX fixed_point_x(const at::Tensor& x) {
  int64_t M = x.size(0), K = x.size(1), chunks = K / CHUNK;
  at::Tensor values = at::empty({M, chunks * CHUNK}, x.options().dtype(at::kShort));
  at::Tensor scale_tensor = at::empty({M, chunks}, x.options());
  const float* xp = x.data_ptr<float>();
  int16_t* q = values.data_ptr<int16_t>();
  float* scales = scale_tensor.data_ptr<float>();
  for (int64_t c = 0; c < M * chunks; ++c) {
    const float* chunk = xp + (c / chunks) * K + (c % chunks) * CHUNK;
    float inverse;
    scales[c] = chunk_scale(chunk, X_LEVELS, inverse);
    for (int64_t i = 0; i < CHUNK; ++i)
      q[c * CHUNK + i] = static_cast<int16_t>(fixed_point_code(chunk[i], inverse));
  }
  return {values, scale_tensor, {q, scales, chunks}};
}

#ifdef __AVX2__
inline __m256i load16(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
#endif

}  // namespace

// The functions module.cpp exposes to Python; each validates its arguments.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight,
                       const at::Tensor& scales, const c10::optional<at::Tensor>& bias);
at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& weight_scales,
                               const c10::optional<at::Tensor>& bias);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed,
                       const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                       const c10::optional<at::Tensor>& bias, int64_t group_size);
at::Tensor lut4_linear(const at::Tensor& x, const at::Tensor& packed,
                       const at::Tensor& lut, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, int64_t group_size);
at::Tensor lut8_linear(const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& lut, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, int64_t group_size);
at::Tensor hadamard_rotate(const at::Tensor& x, const at::Tensor& signs);
