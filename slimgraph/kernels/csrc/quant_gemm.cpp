// Weight-only quantized linear layers for CPU: y = x @ dequant(W).T + bias.
//
// Batch-1 inference on a CPU is memory bound: the time goes into reading the
// weight, so reading 1 (int8) or 0.5 (int4) bytes per weight instead of 4 is the
// whole speedup. The kernels therefore dequantize in registers, never in memory:
//
//   * OpenMP splits the output rows (one weight row each) across threads, in
//     dynamic chunks: on a busy machine a statically assigned thread that is
//     not scheduled stalls the whole call for a time slice (measured 8-12 ms).
//   * The inner loop over k widens 16 weights at a time to fp32 with AVX2 and
//     FMAs them into the activations (a scalar loop when built without AVX2,
//     and for the k tail that is not a multiple of 16).
//   * Up to ROWS_PER_PASS rows of x share one pass over the weights, so a
//     batch of M reads the weight ceil(M / 4) times.
//   * From LARGE_M rows on, the work is compute bound instead: each thread
//     dequantizes a tile of weight rows to fp32 and at::mm (a blocked GEMM)
//     multiplies it, so no caller ever needs a fallback for large batches.
//
// Summation order differs from the torch reference (x @ W.T); results agree
// to fp32 rounding, not bit for bit.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
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

// 16 int8 weights -> two vectors of 8 floats.
inline void widen_int8(const int8_t* w, __m256& lo, __m256& hi) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
}

// 8 packed bytes = 16 int4 codes (column 2j low nibble, 2j+1 high) -> two vectors of 8 floats.
inline void widen_int4(const uint8_t* packed, __m256& lo, __m256& hi) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m128i low = _mm_and_si128(bytes, mask);
  __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  __m128i codes = _mm_unpacklo_epi8(low, high);  // columns in order 0..15
  lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)));
}
#endif

inline float int4_code(const uint8_t* packed_row, int64_t k) {
  uint8_t byte = packed_row[k >> 1];
  return static_cast<float>((k & 1) ? (byte >> 4) : (byte & 0x0F));
}

// ---- int8 ----------------------------------------------------------------

// Independent FMA chains per x row: one chain would wait on FMA latency, not memory.
// Four rows x two chains plus the weights still fit the 16 ymm registers.
template <int R>
constexpr int chains() { return R <= 2 ? 4 : 2; }

// dots[r] = sum_k x[r, k] * w[k] for R rows of x (row stride K).
template <int R>
void int8_dots(const float* x, const int8_t* w, int64_t K, float* dots) {
  int64_t k = 0;
#ifdef __AVX2__
  constexpr int C = chains<R>();
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m256 v[4];
    widen_int8(w + k, v[0], v[1]);
    widen_int8(w + k + 16, v[2], v[3]);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i)
        acc[r][i % C] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + r * K + k + 8 * i), acc[r][i % C]);
  }
  for (; k + 16 <= K; k += 16) {
    __m256 lo, hi;
    widen_int8(w + k, lo, hi);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * K + k + 8), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 1; c < C; ++c) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][c]);
    dots[r] = horizontal_sum(acc[r][0]);
  }
#else
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
#endif
  for (; k < K; ++k) {
    float wk = static_cast<float>(w[k]);
    for (int r = 0; r < R; ++r) dots[r] += x[r * K + k] * wk;
  }
}

template <int R>
void int8_rows(const float* x, const int8_t* q, const float* scales, const float* bias,
               float* y, int64_t K, int64_t N) {
#pragma omp parallel for schedule(dynamic, 64) num_threads(num_threads())
  for (int64_t o = 0; o < N; ++o) {
    float dots[R];
    int8_dots<R>(x, q + o * K, K, dots);
    float b = bias ? bias[o] : 0.f;
    for (int r = 0; r < R; ++r) y[r * N + o] = scales[o] * dots[r] + b;
  }
}

void dequantize_int8_tile(const int8_t* q, const float* scales, int64_t K, int64_t rows,
                          float* w) {
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t k = 0; k < K; ++k) w[o * K + k] = scales[o] * static_cast<float>(q[o * K + k]);
}

// ---- int4 ----------------------------------------------------------------

// Per-group sums of each x row, so the zero point costs one multiply per group:
// sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k).
std::vector<float> group_sums(const float* x, int64_t rows, int64_t K, int64_t group) {
  int64_t groups = K / group;
  std::vector<float> sums(rows * groups, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[r * K + k];
      sums[r * groups + g] = s;
    }
  return sums;
}

// dots[r] = sum_k x[r, k] * (q[k] - zero) * scale over one weight row, per group.
template <int R>
void int4_dots(const float* x, const uint8_t* packed, const float* scales, const float* zeros,
               const float* xsums, int64_t K, int64_t group, float* dots) {
  int64_t groups = K / group;
  float tail[R] = {};
#ifdef __AVX2__
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < groups; ++g) {
    int64_t k = g * group, end = k + group;
    float scale = scales[g];
    float group_tail[R] = {};
#ifdef __AVX2__
    constexpr int C = chains<R>();
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (; k + 32 <= end; k += 32) {
      __m256 v[4];
      widen_int4(packed + (k >> 1), v[0], v[1]);
      widen_int4(packed + (k >> 1) + 8, v[2], v[3]);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i)
          acc[r][i % C] =
              _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + r * K + k + 8 * i), acc[r][i % C]);
    }
    for (; k + 16 <= end; k += 16) {
      __m256 lo, hi;
      widen_int4(packed + (k >> 1), lo, hi);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * K + k + 8), acc[r][1]);
      }
    }
    __m256 scale_v = _mm256_set1_ps(scale);
    for (int r = 0; r < R; ++r) {
      for (int c = 1; c < C; ++c) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][c]);
      total[r] = _mm256_fmadd_ps(acc[r][0], scale_v, total[r]);
    }
#endif
    for (; k < end; ++k) {
      float code = int4_code(packed, k);
      for (int r = 0; r < R; ++r) group_tail[r] += x[r * K + k] * code;
    }
    for (int r = 0; r < R; ++r)
      tail[r] += scale * (group_tail[r] - zeros[g] * xsums[r * groups + g]);
  }
  for (int r = 0; r < R; ++r) {
#ifdef __AVX2__
    dots[r] = horizontal_sum(total[r]) + tail[r];
#else
    dots[r] = tail[r];
#endif
  }
}

template <int R>
void int4_rows(const float* x, const uint8_t* packed, const float* scales, const float* zeros,
               const float* bias, float* y, int64_t K, int64_t N, int64_t group) {
  std::vector<float> xsums = group_sums(x, R, K, group);
  int64_t groups = K / group;
#pragma omp parallel for schedule(dynamic, 64) num_threads(num_threads())
  for (int64_t o = 0; o < N; ++o) {
    float dots[R];
    int4_dots<R>(x, packed + o * (K / 2), scales + o * groups, zeros + o * groups,
                 xsums.data(), K, group, dots);
    float b = bias ? bias[o] : 0.f;
    for (int r = 0; r < R; ++r) y[r * N + o] = dots[r] + b;
  }
}

void dequantize_int4_tile(const uint8_t* packed, const float* scales, const float* zeros,
                          int64_t K, int64_t group, int64_t rows, float* w) {
  int64_t groups = K / group;
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      float scale = scales[o * groups + g], zero = zeros[o * groups + g];
      const uint8_t* bytes = packed + o * (K / 2) + g * group / 2;
      float* out = w + o * K + g * group;
      for (int64_t j = 0; j < group / 2; ++j) {  // group is even: whole bytes
        out[2 * j] = (static_cast<float>(bytes[j] & 0x0F) - zero) * scale;
        out[2 * j + 1] = (static_cast<float>(bytes[j] >> 4) - zero) * scale;
      }
    }
}

// ---- drivers ---------------------------------------------------------------

// Calls rows_kernel<R>(x_rows, y_rows) for blocks of up to ROWS_PER_PASS rows.
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

// Large M: each thread dequantizes TILE_OUT weight rows and multiplies them with at::mm.
template <typename Dequantize>
void tiled_gemm(const torch::Tensor& x, torch::Tensor& y, int64_t K, int64_t N,
                Dequantize&& dequantize) {
  int64_t tiles = (N + TILE_OUT - 1) / TILE_OUT;
  // at::mm runs single threaded inside the OpenMP region; the tiles carry the parallelism.
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads())
  for (int64_t t = 0; t < tiles; ++t) {
    int64_t start = t * TILE_OUT, rows = std::min(TILE_OUT, N - start);
    torch::Tensor w = torch::empty({rows, K}, x.options());
    dequantize(start, rows, w.data_ptr<float>());
    y.narrow(1, start, rows).addmm_(x, w.t(), 1.0, 1.0);
  }
}

torch::Tensor flatten_input(const torch::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, op, ": x must be float32, got ",
              x.scalar_type(), "; cast the activations with x.float().");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x has last dim ",
              x.dim() ? x.size(-1) : 0, " but the weight has in_features=", K, ".");
  // Inference only: detached, so the tiled path's in-place addmm_ from many threads
  // never touches autograd state.
  return x.detach().reshape({-1, K}).contiguous();
}

std::vector<int64_t> output_shape(const torch::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, torch::Tensor& holder, int64_t N,
                      const char* op) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->numel() == N, op, ": bias has ", bias->numel(), " elements, expected ", N,
              ".");
  holder = bias->to(torch::kFloat32).contiguous();
  return holder.data_ptr<float>();
}

// Bias is added by the row kernels; the tiled path starts y at bias (or zero).
torch::Tensor initial_output(int64_t M, int64_t N, const float* bias, const torch::Tensor& x) {
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M >= LARGE_M) {
    if (bias)
      y.copy_(torch::from_blob(const_cast<float*>(bias), {1, N}, x.options()).expand({M, N}));
    else
      y.zero_();
  }
  return y;
}

}  // namespace

// x: float32 [..., K]; qweight: int8 [N, K]; scales: float32 [N]; bias: [N] or None.
torch::Tensor int8_linear(const torch::Tensor& x_in, const torch::Tensor& qweight,
                          const torch::Tensor& scales_in,
                          const c10::optional<torch::Tensor>& bias) {
  const char* op = "slimgraph int8_linear";
  TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.dim() == 2, op,
              ": qweight must be a 2-D int8 [out, in] tensor.");
  int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scales_in.numel() == N, op, ": scales has ", scales_in.numel(),
              " elements, expected one per output row (", N, ").");
  torch::Tensor x = flatten_input(x_in, K, op);
  torch::Tensor q = qweight.contiguous();
  torch::Tensor scales = scales_in.to(torch::kFloat32).contiguous();
  torch::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  torch::Tensor y = initial_output(M, N, b, x);
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M >= LARGE_M) {
    tiled_gemm(x, y, K, N, [&](int64_t start, int64_t rows, float* w) {
      dequantize_int8_tile(qp + start * K, sp + start, K, rows, w);
    });
  } else {
    for_row_blocks(M, [&](auto rows, int64_t m) {
      int8_rows<decltype(rows)::value>(xp + m * K, qp, sp, b, yp + m * N, K, N);
    });
  }
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; packed: uint8 [N, K/2]; scales: float16 [N, K/group];
// zeros: uint8 [N, K/group] or None (symmetric, zero point 8); bias: [N] or None.
torch::Tensor int4_linear(const torch::Tensor& x_in, const torch::Tensor& packed_in,
                          const torch::Tensor& scales_in,
                          const c10::optional<torch::Tensor>& zeros_in,
                          const c10::optional<torch::Tensor>& bias, int64_t group_size) {
  const char* op = "slimgraph int4_linear";
  TORCH_CHECK(packed_in.scalar_type() == torch::kUInt8 && packed_in.dim() == 2, op,
              ": packed must be a 2-D uint8 [out, in/2] tensor.");
  int64_t N = packed_in.size(0), K = packed_in.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, op,
              ": group_size=", group_size, " must be even and divide in_features=", K, ".");
  int64_t groups = K / group_size;
  TORCH_CHECK(scales_in.numel() == N * groups, op, ": scales must be [", N, ", ", groups,
              "], got ", scales_in.sizes(), ".");
  torch::Tensor x = flatten_input(x_in, K, op);
  torch::Tensor packed = packed_in.contiguous();
  torch::Tensor scales = scales_in.to(torch::kFloat32).contiguous();
  torch::Tensor zeros;
  if (zeros_in.has_value()) {
    TORCH_CHECK(zeros_in->numel() == N * groups, op, ": zeros must be [", N, ", ", groups,
                "], got ", zeros_in->sizes(), ".");
    zeros = zeros_in->to(torch::kFloat32).contiguous();
  } else {
    zeros = torch::full({N, groups}, 8.0f, scales.options());
  }
  torch::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  torch::Tensor y = initial_output(M, N, b, x);
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M >= LARGE_M) {
    tiled_gemm(x, y, K, N, [&](int64_t start, int64_t rows, float* w) {
      dequantize_int4_tile(pp + start * (K / 2), sp + start * groups, zp + start * groups, K,
                           group_size, rows, w);
    });
  } else {
    for_row_blocks(M, [&](auto rows, int64_t m) {
      int4_rows<decltype(rows)::value>(xp + m * K, pp, sp, zp, b, yp + m * N, K, N, group_size);
    });
  }
  return y.reshape(output_shape(x_in, N));
}

bool built_with_avx2() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ (qweight * scales[:, None]).T + bias",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("int4_linear", &int4_linear,
        "y = x @ ((q - zeros) * scales).T + bias, 4-bit codes packed two per byte",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros") = py::none(),
        py::arg("bias") = py::none(), py::arg("group_size") = 128);
  m.def("built_with_avx2", &built_with_avx2, "whether this build uses the AVX2/FMA inner loops");
}
