// The randomised Hadamard rotation HIGGS applies to activations at run time.

#include "common.h"

namespace {

// Below this many floats (~0.2 ms on one core) one thread beats waking the others, which
// on a busy machine can cost a whole time slice.
constexpr int64_t HADAMARD_PARALLEL_MIN = 1 << 18;

#ifdef __AVX2__
// One radix-2 stage inside a vector: lane i pairs with lane i ^ half. With the partner
// p and flip = +1 where lane i is the lower of the pair, -1 where it is the upper,
// fma(v, flip, p) gives p + v (lower, = a + b) or p - v (upper, = a - b), rounded once
// like the reference's add and subtract.
template <int Half>
inline __m256 butterfly_in_vector(__m256 v) {
  __m256 partner, flip;
  if constexpr (Half == 1) {
    partner = _mm256_permute_ps(v, 0b10110001);
    flip = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  } else if constexpr (Half == 2) {
    partner = _mm256_permute_ps(v, 0b01001110);
    flip = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  } else {
    partner = _mm256_permute2f128_ps(v, v, 1);
    flip = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  }
  return _mm256_fmadd_ps(v, flip, partner);
}

// The stages with half < min(g, 8) for 8 consecutive entries (whole groups when g < 8).
inline __m256 butterflies_in_vector(__m256 v, int64_t g) {
  if (g >= 2) v = butterfly_in_vector<1>(v);
  if (g >= 4) v = butterfly_in_vector<2>(v);
  if (g >= 8) v = butterfly_in_vector<4>(v);
  return v;
}
#endif

// Stages with half < g in natural (Sylvester) order over count consecutive groups of g,
// y = x * signs on the way in; scaling by 1/sqrt(g) is left to the caller.
void hadamard_unscaled(const float* x, const float* signs, int64_t g, int64_t count, float* y) {
  int64_t n = g * count, i = 0;
#ifdef __AVX2__
  // For g < 8 a vector holds whole groups, so the signs repeat every g lanes.
  float pattern[8];
  for (int lane = 0; lane < 8; ++lane) pattern[lane] = signs[lane % g];
  __m256 repeated = _mm256_loadu_ps(pattern);
  for (; i + 8 <= n; i += 8) {
    __m256 s = g >= 8 ? _mm256_loadu_ps(signs + i % g) : repeated;
    _mm256_storeu_ps(y + i, butterflies_in_vector(_mm256_mul_ps(_mm256_loadu_ps(x + i), s), g));
  }
  for (int64_t half = 8; half < g; half *= 2)
    for (int64_t block = 0; block < n; block += 2 * half)
      for (int64_t j = block; j < block + half; j += 8) {
        __m256 a = _mm256_loadu_ps(y + j), b = _mm256_loadu_ps(y + j + half);
        _mm256_storeu_ps(y + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(y + j + half, _mm256_sub_ps(a, b));
      }
#endif
  if (i == n) return;
  // Scalar: the whole range without AVX2, the groups past the last full vector with it.
  for (int64_t j = i; j < n; ++j) y[j] = x[j] * signs[j % g];
  for (int64_t half = 1; half < g; half *= 2)
    for (int64_t block = i; block < n; block += 2 * half)
      for (int64_t j = block; j < block + half; ++j) {
        float a = y[j], b = y[j + half];
        y[j] = a + b;
        y[j + half] = a - b;
      }
}

void scale_in_place(float* y, int64_t n, float factor) {
  int64_t i = 0;
#ifdef __AVX2__
  __m256 f = _mm256_set1_ps(factor);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), f));
#endif
  for (; i < n; ++i) y[i] *= factor;
}

}  // namespace

// x: float32 [..., K]; signs: float32 or int8 [g] (HIGGS stores int8; widened here, where
// signs.float() cost an op dispatch, ~5 µs a call), g a power of two in [2, 4096]
// dividing K. Each group of g entries becomes H_g (signs * x_group) / sqrt(g), H_g
// Sylvester-ordered.
at::Tensor hadamard_rotate(const at::Tensor& x_in, const at::Tensor& signs_in) {
  const char* op = "slimgraph hadamard_rotate";
  TORCH_CHECK((signs_in.scalar_type() == at::kFloat || signs_in.scalar_type() == at::kChar) &&
                  signs_in.dim() == 1,
              op, ": signs must be a 1-D float32 or int8 [g] tensor of +-1, got ",
              signs_in.scalar_type(), " ", signs_in.sizes(), ".");
  int64_t g = signs_in.size(0);
  TORCH_CHECK(g >= 2 && g <= 4096 && (g & (g - 1)) == 0, op, ": the group size g=", g,
              " (signs.numel()) must be a power of two from 2 to 4096.");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, op, ": x must be float32, got ",
              x_in.scalar_type(), "; cast the activations with x.float().");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % g == 0, op, ": x has last dim ",
              x_in.dim() ? x_in.size(-1) : 0, ", which is not a multiple of the group size g=",
              g, ".");
  at::Tensor x = x_in.detach().contiguous(), signs = signs_in.contiguous();
  std::vector<float> widened;
  if (signs.scalar_type() == at::kChar) {
    const int8_t* narrow = signs.data_ptr<int8_t>();
    widened.assign(narrow, narrow + g);
  }
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* sp = widened.empty() ? signs.data_ptr<float>() : widened.data();
  float* yp = y.data_ptr<float>();
  int64_t n = x.numel();
  int64_t per_chunk = std::max<int64_t>(1, 4096 / g);  // groups per task: ~16 KB, in L1
  int64_t chunks = (n / g + per_chunk - 1) / per_chunk;
  float factor = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads()) \
    if (n >= HADAMARD_PARALLEL_MIN)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t first = c * per_chunk * g, count = std::min(per_chunk, n / g - c * per_chunk);
    hadamard_unscaled(xp + first, sp, g, count, yp + first);
    scale_in_place(yp + first, count * g, factor);
  }
  return y;
}
