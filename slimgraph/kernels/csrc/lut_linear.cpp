// 4-bit codes (two per byte) and 8-bit codes read through a table: int4 (integer
// codes, optional zero points), NF4 / fp4 / HIGGS p=1 (lut4), fp8 / HIGGS p=2 (lut8).

#include "common.h"

#include <numeric>

namespace {

// ---- 4-bit codes: group zero points -------------------------------------------

// int4 subtracts a zero point per group before scaling; the table formats do not.
struct NoZeros {
  static constexpr bool any = false;
  float operator[](int64_t) const { return 0.f; }
  NoZeros shifted(int64_t) const { return {}; }
};

template <typename T>
struct Zeros {  // uint8 or float32 zero points, one per group
  static constexpr bool any = true;
  const T* data;
  float operator[](int64_t i) const { return static_cast<float>(data[i]); }
  Zeros shifted(int64_t n) const { return {data + n}; }
};

// The value of a 4-bit code k of a row in its group: (lut[code] - zero) * scale, rounded
// as the torch reference rounds it.
inline float lut4_weight(const uint8_t* packed_row, const float* lut, float scale, float zero,
                         int64_t k) {
  uint8_t byte = packed_row[k >> 1];
  return (lut[(k & 1) ? (byte >> 4) : (byte & 0x0F)] - zero) * scale;
}

// ---- 4-bit codes: batch-1 kernel -----------------------------------------------

// Codes become 16-bit integers by byte lookups: the table round(lut * t) split into its
// low and high bytes, one vpshufb each per 32 codes, one round of unpacks to join them
// (5 shuffles per 32 weights where assembling fp32 took 13), then vpmaddwd with x in
// fixed point (see fixed_point_x). The unpacks interleave, so a chunk's 32 columns
// come out as two vectors ordered [0, 2, .., 14, 1, 3, .., 15] and [16, 18, .., 30,
// 17, .., 31]; x is laid out in that order (nibble_order) and the products line up.
#ifdef __AVX2__
struct Int16Table {
  __m256i low, high;  // the bytes of round(lut * t), each 16 entries twice (both lanes)
  float inverse;      // 1 / t, folded into the x scales
};

// t is a power of two where that represents every entry exactly (integer codes, e2m1:
// no rounding at all), else the largest t with |lut * t| <= MAX_WEIGHT_LEVEL, so an
// entry is off by at most 2^-15 of the largest one.
Int16Table int16_table(const float* lut) {
  float largest = 0.f;
  for (int v = 0; v < 16; ++v) largest = std::max(largest, std::fabs(lut[v]));
  float t = largest > 0.f ? MAX_WEIGHT_LEVEL / largest : 1.f;
  float power = std::exp2(std::floor(std::log2(t)));
  if (std::all_of(lut, lut + 16, [&](float v) { return std::nearbyint(v * power) == v * power; }))
    t = power;
  alignas(32) uint8_t low[32], high[32];
  for (int v = 0; v < 16; ++v) {
    auto level = static_cast<uint16_t>(static_cast<int16_t>(std::lrint(lut[v] * t)));
    low[v] = low[v + 16] = static_cast<uint8_t>(level & 0xFF);
    high[v] = high[v + 16] = static_cast<uint8_t>(level >> 8);
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(low)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(high)), 1.f / t};
}

// 16 packed bytes (32 codes) -> the 16-bit table values of columns 0..15 and 16..31.
inline void lookup32(const uint8_t* bytes, const Int16Table& t, __m256i& first, __m256i& second) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  __m128i mask = _mm_set1_epi8(0x0F);
  // Lane 0: the low nibbles (even columns), lane 1: the high ones (odd columns).
  __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask),
                                   _mm_and_si128(v, mask));
  __m256i low = _mm256_shuffle_epi8(t.low, codes), high = _mm256_shuffle_epi8(t.high, codes);
  first = _mm256_unpacklo_epi8(low, high);
  second = _mm256_unpackhi_epi8(low, high);
}
#endif

// The chunk column at position i of lookup32's output.
inline int64_t nibble_order(int64_t i) { return (i & 16) + 2 * (i & 7) + ((i >> 3) & 1); }

// One call's x as each path reads it: float rows in column order (scalar loops, tails,
// zero points) and the fixed-point rows of the AVX2 loops.
struct Lut4Inputs {
  const float* x;         // [M, K]
  FixedPointRows fixed;   // nibble_order, scales times the table's 1/t; q null without AVX2
  const float* xsums;     // [M, groups]: x summed over each group, for zero points
  int64_t K;
};

#ifdef __AVX2__
// acc[r] += (x row r) . (table values) over chunk c: two int32 dot products of 16 pairs,
// one float FMA with the chunk's x scale. `x` holds the block's rows from its first on.
template <int R>
inline void lut4_chunk(const FixedPointRows& x, const uint8_t* packed, const Int16Table& t,
                       int64_t c, __m256* acc) {
  __m256i first, second;
  lookup32(packed + c * (CHUNK / 2), t, first, second);
  for (int r = 0; r < R; ++r) {
    const int16_t* xq = x.chunk(r, c);
    __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(first, load16(xq)),
                                    _mm256_madd_epi16(second, load16(xq + 16)));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(x.scale(r, c)), acc[r]);
  }
}

// Groups of 32 or 64 columns, in one flat pass over the chunks: each chunk's sums are
// scaled by its x scale times its group's scale (one more multiply a chunk; a loop per
// group costs more in setup than its one or two chunks of work: 338 -> 304 µs for a
// 2048² layer at 32 columns, 304 -> 281 at 64, one thread), and a group's zero point
// comes off as zero * scale * the group's x sum. Two accumulators alternate, so FMA
// latency does not bound one x row.
template <int R, typename Scales, typename Zero>
void lut4_dots_by_chunk(const Lut4Inputs& in, int64_t m, const uint8_t* packed,
                        const Int16Table& table, Scales scales, Zero zeros, int64_t group,
                        float* dots) {
  const Int16Table t = table;  // copies, so the loops keep them in registers
  const FixedPointRows x = in.fixed.from(m);
  const int64_t per_group = group / CHUNK, groups = in.K / group;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t g = 0, left = per_group;
  float scale = scales[0];
  __m256 group_scale = _mm256_set1_ps(scale);
  auto chunk = [&](int64_t c, int parity) {  // lut4_chunk, with the group scale multiplied in
    __m256i first, second;
    lookup32(packed + c * (CHUNK / 2), t, first, second);
    for (int r = 0; r < R; ++r) {
      const int16_t* xq = x.chunk(r, c);
      __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(first, load16(xq)),
                                      _mm256_madd_epi16(second, load16(xq + 16)));
      __m256 chunk_scale = _mm256_mul_ps(_mm256_broadcast_ss(x.s + r * x.chunks + c), group_scale);
      acc[r][parity] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), chunk_scale, acc[r][parity]);
    }
    if (--left == 0) {
      if constexpr (Zero::any)
        for (int r = 0; r < R; ++r) dots[r] -= scale * zeros[g] * in.xsums[(m + r) * groups + g];
      if (++g < groups) {
        scale = scales[g];
        group_scale = _mm256_set1_ps(scale);
      }
      left = per_group;
    }
  };
  int64_t c = 0;
  for (; c + 2 <= x.chunks; c += 2) {
    chunk(c, 0);
    chunk(c + 1, 1);
  }
  if (c < x.chunks) chunk(c, 0);
  for (int r = 0; r < R; ++r) dots[r] += horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// Groups of 128 columns and more: a group's chunks are summed, then scaled once (the
// flat pass's extra multiply a chunk costs more than a loop per group from 4 chunks on:
// 263 against 271 µs at 128 columns), and its zero point comes off as zero * scale *
// the group's x sum. One x row alternates two accumulators over the chunks.
template <int R, typename Scales, typename Zero>
void lut4_dots_by_group(const Lut4Inputs& in, int64_t m, const uint8_t* packed,
                        const Int16Table& table, Scales scales, Zero zeros, int64_t group,
                        float* dots) {
  const Int16Table t = table;  // copies, so the loops keep them in registers
  const FixedPointRows x = in.fixed.from(m);
  const int64_t per_group = group / CHUNK, groups = in.K / group;
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t c = g * per_group, end = c + per_group;
    if constexpr (R == 1)
      for (; c + 2 <= end; c += 2) {
        lut4_chunk<R>(x, packed, t, c, even);
        lut4_chunk<R>(x, packed, t, c + 1, odd);
      }
    for (; c < end; ++c) lut4_chunk<R>(x, packed, t, c, even);
    float scale = scales[g];
    for (int r = 0; r < R; ++r)
      total[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), _mm256_set1_ps(scale), total[r]);
    if constexpr (Zero::any)
      for (int r = 0; r < R; ++r) dots[r] -= scale * zeros[g] * in.xsums[(m + r) * groups + g];
  }
  for (int r = 0; r < R; ++r) dots[r] += horizontal_sum(total[r]);
}

// Groups of an odd multiple of 16 (NVFP4's 16): each 16-column half of a chunk can have
// its own scale, so the halves are scaled apart, into two accumulators.
template <int R, typename Scales>
void lut4_dots_by_half(const Lut4Inputs& in, int64_t m, const uint8_t* packed,
                       const Int16Table& table, Scales scales, int64_t group, float* dots) {
  const Int16Table t = table;
  const FixedPointRows x = in.fixed.from(m);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t halves_per_group = group / 16, g = 0, left = halves_per_group;
  for (int64_t c = 0; c < x.chunks; ++c) {
    __m256i halves[2];
    lookup32(packed + c * (CHUNK / 2), t, halves[0], halves[1]);
    for (int h = 0; h < 2; ++h) {
      float scale = scales[g];
      if (--left == 0) {
        ++g;
        left = halves_per_group;
      }
      for (int r = 0; r < R; ++r) {
        __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(halves[h], load16(x.chunk(r, c) + 16 * h)));
        float x_scale = x.scale(r, c) * scale;
        acc[r][h] = _mm256_fmadd_ps(sums, _mm256_set1_ps(x_scale), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) dots[r] += horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
}
#endif

// dots[r] = sum_k x[m + r, k] * (lut[code_k] - zero_g) * scale_g over one weight row.
// With the fixed-point rows (AVX2, group a multiple of 16) the whole chunks go through
// the vector loops and zero points come off as zero * scale * the group's x sum; a last
// 16 columns, other groups and builds without AVX2 run in float.
template <int R, typename Scales, typename Zero>
void lut4_dots(const Lut4Inputs& in, int64_t m, const uint8_t* packed, const float* lut,
               const void* table, Scales scales, Zero zeros, int64_t group, float* dots) {
  int64_t K = in.K;
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
#ifdef __AVX2__
  if (in.fixed.q) {
    const Int16Table& t = *static_cast<const Int16Table*>(table);
    if (group % CHUNK == 0) {
      if (group >= 4 * CHUNK)
        lut4_dots_by_group<R>(in, m, packed, t, scales, zeros, group, dots);
      else
        lut4_dots_by_chunk<R>(in, m, packed, t, scales, zeros, group, dots);
      return;
    }
    lut4_dots_by_half<R>(in, m, packed, t, scales, group, dots);
    for (int64_t k = in.fixed.chunks * CHUNK; k < K; ++k) {
      float w = lut4_weight(packed, lut, scales[k / group], 0.f, k);
      for (int r = 0; r < R; ++r) dots[r] += in.x[(m + r) * K + k] * w;
    }
    if constexpr (Zero::any)
      for (int64_t g = 0; g < K / group; ++g)
        for (int r = 0; r < R; ++r)
          dots[r] -= scales[g] * zeros[g] * in.xsums[(m + r) * (K / group) + g];
    return;
  }
#endif
  for (int64_t k = 0; k < K; ++k) {
    float w = lut4_weight(packed, lut, scales[k / group], zeros[k / group], k);
    for (int r = 0; r < R; ++r) dots[r] += in.x[(m + r) * K + k] * w;
  }
}

// ---- 4-bit codes: large-batch tiles --------------------------------------------

#ifdef __AVX2__
// 8 codes (one 32-bit word: column i in bits 4i..4i+3) through a 16-entry table held in
// two registers, in column order for the GEMM. vpermps reads the low 3 bits of each
// lane's index, bit 3 moved to the sign bit picks the half.
inline __m256 lookup8(uint32_t word, __m256 table_lo, __m256 table_hi) {
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

// w[o, k] = (lut[code] - zero) * scale for `rows` weight rows; the table is shifted and
// scaled once per group, which rounds each weight exactly as lut4_weight does.
template <typename Scales, typename Zero>
void dequantize_lut4_tile(const uint8_t* packed, const float* lut, Scales scales, Zero zeros,
                          int64_t K, int64_t group, int64_t rows, float* w) {
  int64_t groups = K / group;
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      float scale = scales[o * groups + g], zero = zeros[o * groups + g];
      const uint8_t* row = packed + o * (K / 2);
      float* out = w + o * K;
      int64_t k = g * group, end = k + group;
#ifdef __AVX2__
      __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
      __m256 lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(lut), z), s);
      __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(lut + 8), z), s);
      for (; k + 8 <= end; k += 8)
        _mm256_storeu_ps(out + k, lookup8(load_word(row + k / 2), lo, hi));
#endif
      for (; k < end; ++k) out[k] = lut4_weight(row, lut, scale, zero, k);
    }
}

// Both paths of a 4-bit linear: x [M, K] float32, y [M, N] from initial_output.
template <typename Scales, typename Zero>
void run_lut4(const at::Tensor& x, at::Tensor& y, const float* bias, const uint8_t* packed,
              const float* lut, Scales scales, Zero zeros, int64_t group) {
  int64_t M = x.size(0), K = x.size(1), groups = K / group;
  Lut4Inputs in{x.data_ptr<float>(), {}, nullptr, K};
  FixedPointX fixed;
  at::Tensor xsums;
  const void* table = nullptr;
#ifdef __AVX2__
  Int16Table int16 = int16_table(lut);
  table = &int16;
  if (M < LARGE_M && group % 16 == 0) {
    fixed = fixed_point_x(x, int16.inverse, nibble_order);
    in.fixed = fixed.rows;
    if (Zero::any) {  // a plain loop: an ATen sum costs more than the whole 2048-column row
      xsums = at::empty({M, groups}, x.options());
      float* sums = xsums.data_ptr<float>();
      for (int64_t i = 0; i < M * groups; ++i)
        sums[i] = std::accumulate(in.x + i * group, in.x + (i + 1) * group, 0.f);
      in.xsums = sums;
    }
  }
#endif
  auto dots = [&](auto rows, int64_t m, int64_t o, float* out) {
    constexpr int R = decltype(rows)::value;
    lut4_dots<R>(in, m, packed + o * (K / 2), lut, table, scales.shifted(o * groups),
                 zeros.shifted(o * groups), group, out);
  };
  run_linear(x, y, bias, dots, [&](int64_t start, int64_t rows, float* w) {
    dequantize_lut4_tile(packed + start * (K / 2), lut, scales.shifted(start * groups),
                         zeros.shifted(start * groups), K, group, rows, w);
  });
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

}  // namespace

// x: float32 [..., K]; packed: uint8 [N, K/2] (column 2j low nibble, 2j+1 high);
// scales: float32 or float16 [N, K/group]; zeros: uint8 or float [N, K/group], or None
// for symmetric codes (zero point 8); bias: [N] or None. w = (q - zero) * scale.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& packed_in,
                       const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& zeros_in,
                       const c10::optional<at::Tensor>& bias, int64_t group_size) {
  const char* op = "slimgraph int4_linear";
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2, op,
              ": packed must be a 2-D uint8 [out, in/2] tensor.");
  int64_t N = packed_in.size(0), K = packed_in.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, op,
              ": group_size=", group_size, " must be even and divide in_features=", K, ".");
  int64_t groups = K / group_size;
  TORCH_CHECK(scales_in.numel() == N * groups, op, ": scales must be [", N, ", ", groups,
              "], got ", scales_in.sizes(), ".");
  at::Tensor x = flatten_input(x_in, K, op);
  at::Tensor packed = packed_in.contiguous();
  at::Tensor scales = scales_in.scalar_type() == at::kHalf
                             ? scales_in.contiguous()
                             : scales_in.to(at::kFloat).contiguous();
  at::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  at::Tensor y = initial_output(x.size(0), N, b, x);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  // Codes as floats; symmetric codes have the zero point 8 folded into the table.
  std::array<float, 16> lut;
  for (int v = 0; v < 16; ++v) lut[v] = static_cast<float>(zeros_in.has_value() ? v : v - 8);
  at::Tensor zeros;
  if (zeros_in.has_value()) {
    TORCH_CHECK(zeros_in->numel() == N * groups, op, ": zeros must be [", N, ", ", groups,
                "], got ", zeros_in->sizes(), ".");
    zeros = zeros_in->scalar_type() == at::kByte ? zeros_in->contiguous()
                                                     : zeros_in->to(at::kFloat).contiguous();
  }
  with_scales(scales, [&](auto reader) {
    if (!zeros.defined())
      run_lut4(x, y, b, pp, lut.data(), reader, NoZeros{}, group_size);
    else if (zeros.scalar_type() == at::kByte)
      run_lut4(x, y, b, pp, lut.data(), reader, Zeros<uint8_t>{zeros.data_ptr<uint8_t>()},
               group_size);
    else
      run_lut4(x, y, b, pp, lut.data(), reader, Zeros<float>{zeros.data_ptr<float>()},
               group_size);
  });
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; packed: uint8 [N, K/2] (column 2j low nibble, 2j+1 high); lut:
// float32 [16]; scales: float32, float16, uint8 (e8m0) or float8_e4m3fn [N, K/group];
// bias: [N] or None. w[o, k] = lut[code(o, k)] * scales[o, k / group].
at::Tensor lut4_linear(const at::Tensor& x_in, const at::Tensor& packed_in,
                       const at::Tensor& lut_in, const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& bias, int64_t group_size) {
  const char* op = "slimgraph lut4_linear";
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2, op,
              ": packed must be a 2-D uint8 [out, in/2] tensor, got ", packed_in.scalar_type(),
              " ", packed_in.sizes(), ".");
  int64_t N = packed_in.size(0), K = packed_in.size(1) * 2;
  int64_t groups = check_group_size(group_size, K, op);
  TORCH_CHECK(lut_in.scalar_type() == at::kFloat && lut_in.dim() == 1 &&
                  lut_in.size(0) == 16,
              op, ": lut must be a float32 [16] tensor (code -> value), got ",
              lut_in.scalar_type(), " ", lut_in.sizes(), ".");
  check_scales(scales_in, N, groups, op);
  at::Tensor x = flatten_input(x_in, K, op);
  at::Tensor packed = packed_in.contiguous(), lut = lut_in.contiguous();
  const float* entries = lut.data_ptr<float>();
  TORCH_CHECK(std::all_of(entries, entries + 16, [](float v) { return std::isfinite(v); }), op,
              ": lut must be finite, got ", lut_in, ".");
  at::Tensor scales = scales_in.contiguous();
  at::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  at::Tensor y = initial_output(x.size(0), N, b, x);
  with_scales(scales, [&](auto reader) {
    run_lut4(x, y, b, packed.data_ptr<uint8_t>(), entries, reader, NoZeros{}, group_size);
  });
  return y.reshape(output_shape(x_in, N));
}

// x: float32 [..., K]; codes: uint8 [N, K/D]; lut: float32 [256, D] with D = 1 or 2;
// scales and bias as for lut4_linear. w[o, D*j + i] = lut[codes[o, j], i] * scale.
at::Tensor lut8_linear(const at::Tensor& x_in, const at::Tensor& codes_in,
                       const at::Tensor& lut_in, const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& bias, int64_t group_size) {
  const char* op = "slimgraph lut8_linear";
  TORCH_CHECK(lut_in.scalar_type() == at::kFloat && lut_in.dim() == 2 &&
                  lut_in.size(0) == 256 && (lut_in.size(1) == 1 || lut_in.size(1) == 2),
              op, ": lut must be a float32 [256, d] tensor with d = 1 or 2, got ",
              lut_in.scalar_type(), " ", lut_in.sizes(), ".");
  int64_t D = lut_in.size(1);
  TORCH_CHECK(codes_in.scalar_type() == at::kByte && codes_in.dim() == 2, op,
              ": codes must be a 2-D uint8 [out, in/", D, "] tensor, got ",
              codes_in.scalar_type(), " ", codes_in.sizes(), ".");
  int64_t N = codes_in.size(0), K = codes_in.size(1) * D;
  int64_t groups = check_group_size(group_size, K, op);
  check_scales(scales_in, N, groups, op);
  at::Tensor x = flatten_input(x_in, K, op);
  at::Tensor codes = codes_in.contiguous(), lut = lut_in.contiguous();
  at::Tensor scales = scales_in.contiguous();
  at::Tensor bias_holder;
  const float* b = bias_ptr(bias, bias_holder, N, op);
  int64_t M = x.size(0);
  at::Tensor y = initial_output(M, N, b, x);
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  auto run = [&](auto decoder, auto reader) {
    run_linear(
        x, y, b,
        [&](auto rows, int64_t m, int64_t o, float* dots) {
          constexpr int R = decltype(rows)::value;
          lut8_dots<R>(xp + m * K, cp + o * (K / D), decoder, reader.shifted(o * groups), K,
                       group_size, dots);
        },
        [&](int64_t start, int64_t rows, float* w) {
          dequantize_lut8_tile(cp + start * (K / D), decoder, reader.shifted(start * groups), K,
                               group_size, rows, w);
        });
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
