// Quantized linear layers for CPU, y = x @ dequant(W).T + bias, and the Hadamard
// rotation HIGGS applies to activations.
//
// Batch-1 inference on a CPU is memory bound: the time goes into reading the
// weight, so reading 1 (int8, fp8) or 0.5 (int4, 4-bit tables) bytes per weight
// instead of 4 is the whole speedup. The kernels therefore dequantize in registers,
// never in memory:
//
//   * OpenMP splits the output rows (one weight row each) across threads, in
//     dynamic chunks: on a busy machine a statically assigned thread that is
//     not scheduled stalls the whole call for a time slice (measured 8-12 ms).
//   * The inner loop over k widens 16 weights at a time to fp32 with AVX2 and
//     FMAs them into the activations (a scalar loop when built without AVX2,
//     and for the k tail that is not a multiple of 16). Table formats look codes
//     up in registers (lut4) or with scalar loads from L1 (lut8).
//   * Up to ROWS_PER_PASS rows of x share one pass over the weights, so a
//     batch of M reads the weight ceil(M / 4) times, all passes in one parallel
//     region (see gemv).
//   * From LARGE_M rows on, the work is compute bound instead: each thread
//     dequantizes a tile of weight rows to fp32 and at::mm (a blocked GEMM)
//     multiplies it, so no caller ever needs a fallback for large batches.
//     int8_dynamic_linear is the exception: its int16 multiply-adds outrun an
//     fp32 GEMM, so it keeps the row-block loop for every batch size.
//
// Summation order differs from the torch reference (x @ W.T); results agree
// to fp32 rounding, not bit for bit. Each weight itself is dequantized with the
// reference's roundings (lut[code] * scale), and int8_dynamic_linear's sums are
// exact integers.

#include <torch/extension.h>

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
  float operator[](int64_t i) const { return static_cast<float>(data[i]); }
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

void check_scales(const torch::Tensor& scales, int64_t N, int64_t groups, const char* op) {
  auto type = scales.scalar_type();
  TORCH_CHECK(type == torch::kFloat32 || type == torch::kFloat16 || type == torch::kUInt8 ||
                  type == torch::kFloat8_e4m3fn,
              op, ": scales must be float32, float16, uint8 (e8m0) or float8_e4m3fn, got ", type,
              ".");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == groups, op,
              ": scales must be [out, in/group_size] = [", N, ", ", groups, "], got ",
              scales.sizes(), ".");
}

// Calls body(reader) with the reader type that matches the scales' dtype.
template <typename Body>
void with_scales(const torch::Tensor& scales, Body&& body) {
  switch (scales.scalar_type()) {
    case torch::kFloat32: body(Float32Scales{scales.data_ptr<float>()}); break;
    case torch::kFloat16: body(Float16Scales{scales.data_ptr<at::Half>()}); break;
    case torch::kUInt8: body(ByteScales{scales.data_ptr<uint8_t>(), e8m0_table()}); break;
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

// ---- lut4: 4-bit codes into a 16-entry table ---------------------------------

#ifdef __AVX2__
// 8 codes (one 32-bit word: column i in bits 4i..4i+3) through a 16-entry table held in
// two registers. vpermps reads the low 3 bits of each lane's index, bit 3 moved to the
// sign bit picks the half: no memory gather, and the shifts run off the shuffle port.
inline __m256 lut4_lookup8(uint32_t word, __m256 table_lo, __m256 table_hi) {
  const __m256i down = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i up = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  __m256i words = _mm256_set1_epi32(static_cast<int>(word));
  __m256i codes = _mm256_srlv_epi32(words, down);
  __m256 high_half = _mm256_castsi256_ps(_mm256_sllv_epi32(words, up));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_lo, codes),
                          _mm256_permutevar8x32_ps(table_hi, codes), high_half);
}
#endif

inline uint32_t load_word(const uint8_t* bytes) {
  uint32_t word;
  std::memcpy(&word, bytes, sizeof(word));
  return word;
}

// dots[r] = sum_k x[r, k] * lut[code_k] * scale_group(k) over one weight row. The table is
// scaled once per group, so each weight is lut[code] * scale rounded as the reference does.
template <int R, typename Scales>
void lut4_dots(const float* x, const uint8_t* packed, const float* lut, Scales scales, int64_t K,
               int64_t group, float* dots) {
  int64_t groups = K / group;
#ifdef __AVX2__
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale = _mm256_set1_ps(scales[g]);
    __m256 lo = _mm256_mul_ps(lut_lo, scale), hi = _mm256_mul_ps(lut_hi, scale);
    const uint8_t* bytes = packed + g * group / 2;
    for (int64_t k = g * group; k < (g + 1) * group; k += 16, bytes += 8) {
      __m256 w0 = lut4_lookup8(load_word(bytes), lo, hi);
      __m256 w1 = lut4_lookup8(load_word(bytes + 4), lo, hi);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float table[16];
    for (int v = 0; v < 16; ++v) table[v] = lut[v] * scales[g];
    for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
      float w0 = table[packed[k / 2] & 0x0F], w1 = table[packed[k / 2] >> 4];
      for (int r = 0; r < R; ++r) dots[r] += x[r * K + k] * w0 + x[r * K + k + 1] * w1;
    }
  }
#endif
}

template <typename Scales>
void dequantize_lut4_tile(const uint8_t* packed, const float* lut, Scales scales, int64_t K,
                          int64_t group, int64_t rows, float* w) {
  int64_t groups = K / group;
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      float scale = scales[o * groups + g];
      const uint8_t* bytes = packed + o * (K / 2) + g * group / 2;
      float* out = w + o * K + g * group;
#ifdef __AVX2__
      __m256 s = _mm256_set1_ps(scale);
      __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(lut), s);
      __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(lut + 8), s);
      for (int64_t j = 0; j < group; j += 8)
        _mm256_storeu_ps(out + j, lut4_lookup8(load_word(bytes + j / 2), lo, hi));
#else
      for (int64_t j = 0; j < group / 2; ++j) {
        out[2 * j] = lut[bytes[j] & 0x0F] * scale;
        out[2 * j + 1] = lut[bytes[j] >> 4] * scale;
      }
#endif
    }
}

// ---- lut8: one byte per 1 or 2 weights into a 256-entry table ---------------

// A decoder turns codes into weights: value() one at a time, lookup8() eight at a time.
// On Zen 3 eight scalar loads assemble a vector twice as fast as vgatherdps does.
struct FloatTable {  // lut [256, 1]
  static constexpr int width = 1;
  const float* lut;
  float value(const uint8_t* codes, int64_t k) const { return lut[codes[k]]; }
#ifdef __AVX2__
  __m256 lookup8(const uint8_t* c) const {
    return _mm256_setr_ps(lut[c[0]], lut[c[1]], lut[c[2]], lut[c[3]], lut[c[4]], lut[c[5]],
                          lut[c[6]], lut[c[7]]);
  }
#endif
};

struct PairTable {  // lut [256, 2]: each code is a pair of adjacent weights, one 64-bit load
  static constexpr int width = 2;
  const float* lut;
  float value(const uint8_t* codes, int64_t k) const { return lut[codes[k / 2] * 2 + k % 2]; }
#ifdef __AVX2__
  __m256 lookup8(const uint8_t* c) const {
    const double* pairs = reinterpret_cast<const double*>(lut);
    return _mm256_castpd_ps(_mm256_setr_pd(pairs[c[0]], pairs[c[1]], pairs[c[2]], pairs[c[3]]));
  }
#endif
};

// The float8_e4m3fn table (fp8 weights) is decoded arithmetically, another 2x over table
// loads: e4m3 moved into float16 bits is the value / 256 (exponent bias 15 instead of 7,
// subnormals included), which vcvtph2ps widens exactly. 0x7F/0xFF are NaN.
struct E4m3Table {
  static constexpr int width = 1;
  const float* lut;
  float value(const uint8_t* codes, int64_t k) const { return lut[codes[k]]; }
#ifdef __AVX2__
  __m256 lookup8(const uint8_t* c) const {
    __m128i bytes = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    // Sign-extended, << 7 puts the sign in bits 14 and 15 and the rest in bits 7..13.
    __m128i half = _mm_and_si128(_mm_slli_epi16(bytes, 7), _mm_set1_epi16(-0x4001));
    __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(half, _mm_set1_epi16(0x3FFF)),
                                  _mm_set1_epi16(0x3F80));
    __m256 scaled_down = _mm256_cvtph_ps(_mm_or_si128(half, nan));
    return _mm256_mul_ps(scaled_down, _mm256_set1_ps(256.f));
  }
#endif
};

bool is_e4m3_table(const float* lut) {
  return std::memcmp(lut, e4m3_table(), 256 * sizeof(float)) == 0;
}

// dots[r] = sum_k x[r, k] * lut[code, k % width] * scale_group(k) over one weight row.
template <int R, typename Decoder, typename Scales>
void lut8_dots(const float* x, const uint8_t* codes, Decoder decoder, Scales scales, int64_t K,
               int64_t group, float* dots) {
  constexpr int D = Decoder::width;
  int64_t groups = K / group;
#ifdef __AVX2__
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale = _mm256_set1_ps(scales[g]);
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      __m256 w0 = _mm256_mul_ps(decoder.lookup8(codes + k / D), scale);
      __m256 w1 = _mm256_mul_ps(decoder.lookup8(codes + (k + 8) / D), scale);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float scale = scales[g];
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      float w = decoder.value(codes, k) * scale;
      for (int r = 0; r < R; ++r) dots[r] += x[r * K + k] * w;
    }
  }
#endif
}

template <typename Decoder, typename Scales>
void dequantize_lut8_tile(const uint8_t* codes, Decoder decoder, Scales scales, int64_t K,
                          int64_t group, int64_t rows, float* w) {
  constexpr int D = Decoder::width;
  int64_t groups = K / group;
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      float scale = scales[o * groups + g];
      const uint8_t* row = codes + o * (K / D);
      float* out = w + o * K;
#ifdef __AVX2__
      __m256 s = _mm256_set1_ps(scale);
      for (int64_t k = g * group; k < (g + 1) * group; k += 8)
        _mm256_storeu_ps(out + k, _mm256_mul_ps(decoder.lookup8(row + k / D), s));
#else
      for (int64_t k = g * group; k < (g + 1) * group; ++k) out[k] = decoder.value(row, k) * scale;
#endif
    }
}

// ---- Hadamard rotation ---------------------------------------------------------

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

#ifdef __AVX2__
int32_t horizontal_sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01001110));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10110001));
  return _mm_cvtsi128_si32(s);
}
#endif

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
    gemv(M, N, [&](auto rows, int64_t m, int64_t o) {
      constexpr int R = decltype(rows)::value;
      float dots[R];
      int8_dots<R>(xp + m * K, qp + o * K, K, dots);
      for (int r = 0; r < R; ++r) dots[r] *= sp[o];
      store_outputs<R>(dots, b, o, yp + m * N, N);
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
    std::vector<float> xsums = group_sums(xp, M, K, group_size);
    gemv(M, N, [&](auto rows, int64_t m, int64_t o) {
      constexpr int R = decltype(rows)::value;
      float dots[R];
      int4_dots<R>(xp + m * K, pp + o * (K / 2), sp + o * groups, zp + o * groups,
                   xsums.data() + m * groups, K, group_size, dots);
      store_outputs<R>(dots, b, o, yp + m * N, N);
    });
  }
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; packed: uint8 [N, K/2] (column 2j low nibble, 2j+1 high); lut:
// float32 [16]; scales: float32, float16, uint8 (e8m0) or float8_e4m3fn [N, K/group];
// bias: [N] or None. w[o, k] = lut[code(o, k)] * scales[o, k / group].
torch::Tensor lut4_linear(const torch::Tensor& x_in, const torch::Tensor& packed_in,
                          const torch::Tensor& lut_in, const torch::Tensor& scales_in,
                          const c10::optional<torch::Tensor>& bias, int64_t group_size) {
  const char* op = "slimgraph lut4_linear";
  TORCH_CHECK(packed_in.scalar_type() == torch::kUInt8 && packed_in.dim() == 2, op,
              ": packed must be a 2-D uint8 [out, in/2] tensor, got ", packed_in.scalar_type(),
              " ", packed_in.sizes(), ".");
  int64_t N = packed_in.size(0), K = packed_in.size(1) * 2;
  int64_t groups = check_group_size(group_size, K, op);
  TORCH_CHECK(lut_in.scalar_type() == torch::kFloat32 && lut_in.dim() == 1 &&
                  lut_in.size(0) == 16,
              op, ": lut must be a float32 [16] tensor (code -> value), got ",
              lut_in.scalar_type(), " ", lut_in.sizes(), ".");
  check_scales(scales_in, N, groups, op);
  torch::Tensor x = flatten_input(x_in, K, op);
  torch::Tensor packed = packed_in.contiguous(), lut = lut_in.contiguous();
  torch::Tensor scales = scales_in.contiguous();
  torch::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  torch::Tensor y = initial_output(M, N, b, x);
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_scales(scales, [&](auto reader) {
    if (M >= LARGE_M) {
      tiled_gemm(x, y, K, N, [&](int64_t start, int64_t rows, float* w) {
        dequantize_lut4_tile(pp + start * (K / 2), lp, reader.shifted(start * groups), K,
                             group_size, rows, w);
      });
    } else {
      gemv(M, N, [&](auto rows, int64_t m, int64_t o) {
        constexpr int R = decltype(rows)::value;
        float dots[R];
        lut4_dots<R>(xp + m * K, pp + o * (K / 2), lp, reader.shifted(o * groups), K,
                     group_size, dots);
        store_outputs<R>(dots, b, o, yp + m * N, N);
      });
    }
  });
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; codes: uint8 [N, K/D]; lut: float32 [256, D] with D = 1 or 2;
// scales and bias as for lut4_linear. w[o, D*j + i] = lut[codes[o, j], i] * scale.
torch::Tensor lut8_linear(const torch::Tensor& x_in, const torch::Tensor& codes_in,
                          const torch::Tensor& lut_in, const torch::Tensor& scales_in,
                          const c10::optional<torch::Tensor>& bias, int64_t group_size) {
  const char* op = "slimgraph lut8_linear";
  TORCH_CHECK(lut_in.scalar_type() == torch::kFloat32 && lut_in.dim() == 2 &&
                  lut_in.size(0) == 256 && (lut_in.size(1) == 1 || lut_in.size(1) == 2),
              op, ": lut must be a float32 [256, d] tensor with d = 1 or 2, got ",
              lut_in.scalar_type(), " ", lut_in.sizes(), ".");
  int64_t D = lut_in.size(1);
  TORCH_CHECK(codes_in.scalar_type() == torch::kUInt8 && codes_in.dim() == 2, op,
              ": codes must be a 2-D uint8 [out, in/", D, "] tensor, got ",
              codes_in.scalar_type(), " ", codes_in.sizes(), ".");
  int64_t N = codes_in.size(0), K = codes_in.size(1) * D;
  int64_t groups = check_group_size(group_size, K, op);
  check_scales(scales_in, N, groups, op);
  torch::Tensor x = flatten_input(x_in, K, op);
  torch::Tensor codes = codes_in.contiguous(), lut = lut_in.contiguous();
  torch::Tensor scales = scales_in.contiguous();
  torch::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  torch::Tensor y = initial_output(M, N, b, x);
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](auto decoder, auto reader) {
    if (M >= LARGE_M) {
      tiled_gemm(x, y, K, N, [&](int64_t start, int64_t rows, float* w) {
        dequantize_lut8_tile(cp + start * (K / D), decoder, reader.shifted(start * groups), K,
                             group_size, rows, w);
      });
    } else {
      gemv(M, N, [&](auto rows, int64_t m, int64_t o) {
        constexpr int R = decltype(rows)::value;
        float dots[R];
        lut8_dots<R>(xp + m * K, cp + o * (K / D), decoder, reader.shifted(o * groups), K,
                     group_size, dots);
        store_outputs<R>(dots, b, o, yp + m * N, N);
      });
    }
  };
  with_scales(scales, [&](auto reader) {
    if (D == 2)
      run(PairTable{lp}, reader);
    else if (is_e4m3_table(lp))
      run(E4m3Table{lp}, reader);
    else
      run(FloatTable{lp}, reader);
  });
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; signs: float32 [g], g a power of two in [2, 4096] dividing K.
// Each group of g entries becomes H_g (signs * x_group) / sqrt(g), H_g Sylvester-ordered.
torch::Tensor hadamard_rotate(const torch::Tensor& x_in, const torch::Tensor& signs_in) {
  const char* op = "slimgraph hadamard_rotate";
  TORCH_CHECK(signs_in.scalar_type() == torch::kFloat32 && signs_in.dim() == 1, op,
              ": signs must be a 1-D float32 [g] tensor of +-1, got ", signs_in.scalar_type(),
              " ", signs_in.sizes(), ".");
  int64_t g = signs_in.size(0);
  TORCH_CHECK(g >= 2 && g <= 4096 && (g & (g - 1)) == 0, op, ": the group size g=", g,
              " (signs.numel()) must be a power of two from 2 to 4096.");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32, op, ": x must be float32, got ",
              x_in.scalar_type(), "; cast the activations with x.float().");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % g == 0, op, ": x has last dim ",
              x_in.dim() ? x_in.size(-1) : 0, ", which is not a multiple of the group size g=",
              g, ".");
  torch::Tensor x = x_in.detach().contiguous(), signs = signs_in.contiguous();
  torch::Tensor y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* sp = signs.data_ptr<float>();
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

// x: float32 [..., K]; qweight: int8 [N, K]; weight_scales: float32 [N]; bias: [N] or None.
// Each row of x is quantized to int8 with its own scale max|x| / 127, the products are
// summed exactly in int32, and y = sum * x_scale * weight_scale + bias.
torch::Tensor int8_dynamic_linear(const torch::Tensor& x_in, const torch::Tensor& qweight,
                                  const torch::Tensor& weight_scales_in,
                                  const c10::optional<torch::Tensor>& bias) {
  const char* op = "slimgraph int8_dynamic_linear";
  TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.dim() == 2, op,
              ": qweight must be a 2-D int8 [out, in] tensor, got ", qweight.scalar_type(), " ",
              qweight.sizes(), ".");
  int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(K <= MAX_EXACT_K, op, ": in_features=", K, " exceeds ", MAX_EXACT_K,
              ", beyond which an int32 sum of 127 * 128 products can overflow.");
  TORCH_CHECK(weight_scales_in.numel() == N, op, ": weight_scales has ",
              weight_scales_in.numel(), " elements, expected one per output row (", N, ").");
  torch::Tensor x = flatten_input(x_in, K, op);
  torch::Tensor q = qweight.contiguous();
  torch::Tensor weight_scales = weight_scales_in.to(torch::kFloat32).contiguous();
  torch::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  torch::Tensor xq = torch::empty({M, K}, x.options().dtype(torch::kInt16));
  torch::Tensor x_scales = torch::empty({M}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), x_scales.data_ptr<float>());
  torch::Tensor y = torch::empty({M, N}, x.options());
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
  m.def("lut4_linear", &lut4_linear,
        "y = x @ (lut[codes] * scales).T + bias, 4-bit codes packed two per byte", py::arg("x"),
        py::arg("packed"), py::arg("lut"), py::arg("scales"), py::arg("bias"),
        py::arg("group_size"));
  m.def("lut8_linear", &lut8_linear,
        "y = x @ (lut[codes] * scales).T + bias, one byte per 1 or 2 weights", py::arg("x"),
        py::arg("codes"), py::arg("lut"), py::arg("scales"), py::arg("bias"),
        py::arg("group_size"));
  m.def("hadamard_rotate", &hadamard_rotate,
        "H_g (signs * x) / sqrt(g) for each group of g = signs.numel() entries", py::arg("x"),
        py::arg("signs"));
  m.def("int8_dynamic_linear", &int8_dynamic_linear,
        "y = (round(x / s) @ qweight.T) * s * weight_scales + bias, s = max|x row| / 127",
        py::arg("x"), py::arg("qweight"), py::arg("weight_scales"), py::arg("bias"));
  m.def("built_with_avx2", &built_with_avx2, "whether this build uses the AVX2/FMA inner loops");
}
