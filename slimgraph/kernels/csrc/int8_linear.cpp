// int8 weights: weight-only (int8_linear) and with int8 activations quantized per row
// on the fly (int8_dynamic_linear, exact int32 sums).

#include "common.h"

namespace {

// ---- int8 weights, float activations -----------------------------------------

#ifdef __AVX2__
// acc[r] += (x row r) . w over chunk c: the int8 weights widened to int16, two vpmaddwd,
// one float FMA with the chunk's x scale (see fixed_point_x).
template <int R>
inline void int8_chunk(const FixedPointRows& x, const int8_t* w, int64_t c, __m256* acc) {
  __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * CHUNK)));
  __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * CHUNK + 16)));
  for (int r = 0; r < R; ++r) {
    const int16_t* xq = x.chunk(r, c);
    __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(w0, load16(xq)), _mm256_madd_epi16(w1, load16(xq + 16)));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(x.scale(r, c)), acc[r]);
  }
}
#endif

// dots[r] = sum_k x[m + r, k] * w[k]: whole chunks from the fixed-point rows (one x row
// alternates two accumulators, so FMA latency does not bound it), the rest in float.
template <int R>
void int8_dots(const float* xf, const FixedPointRows& fixed, int64_t m, const int8_t* w, int64_t K,
               float* dots) {
  int64_t k = 0;
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
#ifdef __AVX2__
  const FixedPointRows x = fixed.from(m);
  int64_t chunks = K / CHUNK, c = 0;
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  if constexpr (R == 1)
    for (; c + 2 <= chunks; c += 2) {
      int8_chunk<R>(x, w, c, even);
      int8_chunk<R>(x, w, c + 1, odd);
    }
  for (; c < chunks; ++c) int8_chunk<R>(x, w, c, even);
  for (int r = 0; r < R; ++r) dots[r] = horizontal_sum(_mm256_add_ps(even[r], odd[r]));
  k = chunks * CHUNK;
#endif
  for (; k < K; ++k) {
    float wk = static_cast<float>(w[k]);
    for (int r = 0; r < R; ++r) dots[r] += xf[(m + r) * K + k] * wk;
  }
}

void dequantize_int8_tile(const int8_t* q, const float* scales, int64_t K, int64_t rows,
                          float* w) {
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t k = 0; k < K; ++k) w[o * K + k] = scales[o] * static_cast<float>(q[o * K + k]);
}

// ---- int8 x int8 (dynamic activation quantization) ---------------------------

float absolute_max(const float* row, int64_t K) {
  float result = 0.f;
  int64_t k = 0;
#ifdef __AVX2__
  __m256 sign_bit = _mm256_set1_ps(-0.f), best = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8)
    best = _mm256_max_ps(best, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(row + k)));
  float lanes[8];
  _mm256_storeu_ps(lanes, best);
  for (float lane : lanes) result = std::max(result, lane);
#endif
  for (; k < K; ++k) result = std::max(result, std::fabs(row[k]));
  return result;
}

// Per-row symmetric quantization exactly as the torch reference computes it:
// s = max|x| / 127 (1 for an all-zero row), q = round_half_even(x / s) in [-127, 127].
// q is stored as int16, the operand width of vpmaddwd.
void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* q, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float scale = absolute_max(row, K) / 127.f;
    if (scale == 0.f) scale = 1.f;
    scales[m] = scale;
    int64_t k = 0;
#ifdef __AVX2__
    __m256 s = _mm256_set1_ps(scale), low = _mm256_set1_ps(-127.f), high = _mm256_set1_ps(127.f);
    for (; k + 16 <= K; k += 16) {
      __m256i halves[2];
      for (int h = 0; h < 2; ++h) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(row + k + 8 * h), s);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        halves[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, low), high));
      }
      // packs works per 128-bit lane; the permute restores column order.
      __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(halves[0], halves[1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + k), packed);
    }
#endif
    for (; k < K; ++k) {
      float rounded = std::nearbyint(row[k] / scale);  // the default mode rounds half to even
      q[m * K + k] = static_cast<int16_t>(std::min(127.f, std::max(-127.f, rounded)));
    }
  }
}

// Longest row whose int32 sum cannot overflow: |xq * w| <= 127 * 128.
constexpr int64_t MAX_EXACT_K = ((int64_t{1} << 31) - 1) / (127 * 128);

// dots[r] = sum_k xq[r, k] * w[k], exact in int32 for K <= MAX_EXACT_K.
template <int R>
void int8_int8_dots(const int16_t* xq, const int8_t* w, int64_t K, int32_t* dots) {
  int64_t k = 0;
#ifdef __AVX2__
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (; k + 16 <= K; k += 16) {
    __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    for (int r = 0; r < R; ++r) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + k));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, xv));
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = horizontal_sum_epi32(acc[r]);
#else
  for (int r = 0; r < R; ++r) dots[r] = 0;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) dots[r] += static_cast<int32_t>(xq[r * K + k]) * w[k];
}

}  // namespace

// x: float32 [..., K]; qweight: int8 [N, K]; scales: float32 [N]; bias: [N] or None.
at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight,
                       const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& bias) {
  const char* op = "slimgraph int8_linear";
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, op,
              ": qweight must be a 2-D int8 [out, in] tensor.");
  int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scales_in.numel() == N, op, ": scales has ", scales_in.numel(),
              " elements, expected one per output row (", N, ").");
  at::Tensor x = flatten_input(x_in, K, op);
  at::Tensor q = qweight.contiguous();
  at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  at::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  at::Tensor y = initial_output(M, N, b, x);
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  FixedPointX fixed;
  if (M < LARGE_M) fixed = fixed_point_x(x);
  run_linear(
      x, y, b,
      [&](auto rows, int64_t m, int64_t o, float* dots) {
        constexpr int R = decltype(rows)::value;
        int8_dots<R>(xp, fixed.rows, m, qp + o * K, K, dots);
        for (int r = 0; r < R; ++r) dots[r] *= sp[o];
      },
      [&](int64_t start, int64_t rows, float* w) {
        dequantize_int8_tile(qp + start * K, sp + start, K, rows, w);
      });
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; qweight: int8 [N, K]; weight_scales: float32 [N]; bias: [N] or None.
// Each row of x is quantized to int8 with its own scale max|x| / 127, the products are
// summed exactly in int32, and y = sum * x_scale * weight_scale + bias.
at::Tensor int8_dynamic_linear(const at::Tensor& x_in, const at::Tensor& qweight,
                               const at::Tensor& weight_scales_in,
                               const c10::optional<at::Tensor>& bias) {
  const char* op = "slimgraph int8_dynamic_linear";
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, op,
              ": qweight must be a 2-D int8 [out, in] tensor, got ", qweight.scalar_type(), " ",
              qweight.sizes(), ".");
  int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(K <= MAX_EXACT_K, op, ": in_features=", K, " exceeds ", MAX_EXACT_K,
              ", beyond which an int32 sum of 127 * 128 products can overflow.");
  TORCH_CHECK(weight_scales_in.numel() == N, op, ": weight_scales has ",
              weight_scales_in.numel(), " elements, expected one per output row (", N, ").");
  at::Tensor x = flatten_input(x_in, K, op);
  at::Tensor q = qweight.contiguous();
  at::Tensor weight_scales = weight_scales_in.to(at::kFloat).contiguous();
  at::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor x_scales = at::empty({M}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), x_scales.data_ptr<float>());
  at::Tensor y = at::empty({M, N}, x.options());
  const int16_t* xqp = xq.data_ptr<int16_t>();
  const float* xsp = x_scales.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* wsp = weight_scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Every batch size takes the GEMV loop: vpmaddwd does 16 multiply-adds per
  // instruction, so even batch 64 outruns the fp32 GEMM the tiled path would use.
  gemv(M, N, [&](auto rows, int64_t m, int64_t o) {
    constexpr int R = decltype(rows)::value;
    int32_t sums[R];
    float dots[R];
    int8_int8_dots<R>(xqp + m * K, qp + o * K, K, sums);
    for (int r = 0; r < R; ++r) dots[r] = static_cast<float>(sums[r]) * xsp[m + r] * wsp[o];
    store_outputs<R>(dots, b, o, yp + m * N, N);
  });
  return y.reshape(output_shape(x_in, N));
}
