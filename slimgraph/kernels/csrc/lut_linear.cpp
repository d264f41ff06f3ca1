// 4-bit codes (two per byte) and 8-bit codes read through a table: int4 (integer
// codes, optional zero points), NF4 / fp4 / HIGGS p=1 (lut4), fp8 / HIGGS p=2 (lut8; HIGGS's
// sign-symmetric pair grid in int8 at batch 1).

#include "common.h"

#include <optional>

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

// Codes become int8 table values by one vpshufb per 32 codes, and vpmaddubsw multiplies
// them with x rounded to int8 per chunk of 32 columns, as llama.cpp (Q8_0 activations)
// and XNNPACK (qd8) do on CPUs: 1.5-1.8x faster than 16-bit products, whose table
// values took 5 shuffles per 32 codes to assemble. x is off by at most max|x over its
// chunk| / 254 per entry and a table entry not exact in int8 (NF4, HIGGS) by max|lut| /
// 254: 4e-3 to 8e-3 of the output's norm, a twentieth of 4-bit rounding's own error.
//
// A 32-byte load holds the codes of 64 columns: its low nibbles are the even columns,
// its high ones the odd columns, so x is laid out per 64-column block as its 32 even
// columns, then its 32 odd ones (int8_x). vpmaddubsw multiplies an unsigned byte by a
// signed one, so the products are |w| times x with w's sign (vpsignb); no pair of them
// reaches 2^15 (2 * 127 * 127), and vpmaddwd adds pairs into int32: lane j of a block's
// sums covers its columns 8j .. 8j + 7.

// x [M, K] in int8 for the whole 64-column blocks; the columns past them run in float.
struct Int8Rows {
  const int8_t* q = nullptr;  // [rows, blocks * 64]: per block, even columns then odd
  const float* s = nullptr;   // [rows, blocks * 8]: each 8-column lane's chunk scale
  int64_t blocks = 0;         // per row

  const int8_t* block(int64_t row, int64_t p) const { return q + (row * blocks + p) * 64; }
  const float* lane_scales(int64_t row, int64_t p) const { return s + (row * blocks + p) * 8; }
  Int8Rows from(int64_t row) const { return {block(row, 0), lane_scales(row, 0), blocks}; }
};

// One call's x as each path reads it: float rows (scalar loops, tails, zero points) and
// the int8 rows of the AVX2 loop.
struct Lut4Inputs {
  const float* x;             // [M, K]
  const Int8Rows* int8_rows;  // the AVX2 loop's (scales times the table's 1/t), or null
  const float* xsums;         // [M, groups]: x summed over each group, for zero points (int8_x)
  int64_t K;
};

#ifdef __AVX2__
struct Int8Table {
  __m256i values;  // round(lut * t), the 16 entries twice (both lanes)
  float inverse;   // 1 / t, folded into the x scales
};

// t is a power of two where that makes every entry an exact integer within ±127
// (integer codes, e2m1: no rounding at all), else 127 / max|lut|.
Int8Table int8_table(const float* lut) {
  float largest = 0.f;
  for (int v = 0; v < 16; ++v) largest = std::max(largest, std::fabs(lut[v]));
  float t = largest > 0.f ? X8_LEVELS / largest : 1.f;
  float power = std::exp2(std::floor(std::log2(t)));
  if (std::all_of(lut, lut + 16, [&](float v) { return std::nearbyint(v * power) == v * power; }))
    t = power;
  alignas(32) int8_t values[32];
  for (int v = 0; v < 16; ++v)
    values[v] = values[v + 16] = static_cast<int8_t>(std::lrint(lut[v] * t));
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(values)), 1.f / t};
}

struct Int8X {  // the tensors that own a call's int8 rows
  at::Tensor values, scales, group_sums;
  Int8Rows rows;
};

// One 32-column chunk of x in int8, rounded as fixed_point_code rounds (scale max|x| / 127;
// all zeros and a NaN scale when an entry is not finite), vectorized: column by column it
// took 3.7 ns a column, 30 µs of an 8192-column row. Its 16 even columns go to `even`,
// its 16 odd ones to `odd`; half_sums, when given, gets the codes summed over each
// 16-column half. Returns the scale.
inline float int8_chunk(const float* chunk, int8_t* even, int8_t* odd, int32_t* half_sums) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], largest = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(chunk + 8 * i);
    largest = _mm256_max_ps(largest, _mm256_and_ps(v[i], magnitude));
    // v - v is 0 unless v is inf or NaN.
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_sub_ps(v[i], v[i]), _mm256_setzero_ps(), _CMP_EQ_OQ));
  }
  __m128 top = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  top = _mm_max_ps(top, _mm_movehl_ps(top, top));
  float top_value = _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
  bool all_finite = _mm256_movemask_ps(finite) == 0xFF;
  if (!all_finite || top_value == 0.f) {
    std::memset(even, 0, 16);
    std::memset(odd, 0, 16);
    if (half_sums) half_sums[0] = half_sums[1] = 0;
    return all_finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
  }
  __m256 inverse = _mm256_set1_ps(X8_LEVELS / top_value);
  __m256i codes[4];
  for (int i = 0; i < 4; ++i) codes[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // nearest even, as rint
  if (half_sums) {
    half_sums[0] = horizontal_sum_epi32(_mm256_add_epi32(codes[0], codes[1]));
    half_sums[1] = horizontal_sum_epi32(_mm256_add_epi32(codes[2], codes[3]));
  }
  // Packing works per 128-bit lane: its dwords hold columns 0-3, 8-11, 16-19, 24-27, 4-7, ...
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(codes[0], codes[1]), _mm256_packs_epi32(codes[2], codes[3]));
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // column order
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, split), 0xD8);  // evens, then odds
  _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm256_castsi256_si128(bytes));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm256_extracti128_si256(bytes, 1));
  return top_value / X8_LEVELS;
}

// Every scale is multiplied by `factor`, the table's 1 / t. With `group` > 0, group_sums
// [M, K / group] holds x summed over each group as the kernel sees it (int8 values times
// their scales, the float columns past the blocks as they are), so a zero point takes off
// what the products added.
Int8X int8_x(const at::Tensor& x, float factor, int64_t group) {
  int64_t M = x.size(0), K = x.size(1), blocks = K / 64, groups = group > 0 ? K / group : 0;
  at::Tensor values = at::empty({M, blocks * 64}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M, blocks * 8}, x.options());
  at::Tensor group_sums = groups ? at::zeros({M, groups}, x.options()) : at::Tensor();
  const float* xp = x.data_ptr<float>();
  int8_t* q = values.data_ptr<int8_t>();
  float* s = scales.data_ptr<float>();
  float* sums = groups ? group_sums.data_ptr<float>() : nullptr;
  for (int64_t c = 0; c < M * blocks * 2; ++c) {  // chunk c: half c % 2 of block c / 2
    int64_t row = c / (blocks * 2), first = (c % (blocks * 2)) * CHUNK;
    int8_t* half = q + (c / 2) * 64 + (c % 2) * 16;  // its block's even columns, then odd
    int32_t half_sums[2];
    float scale = int8_chunk(xp + row * K + first, half, half + 32, groups ? half_sums : nullptr);
    std::fill(s + c * 4, s + c * 4 + 4, scale * factor);
    for (int h = 0; groups && h < 2; ++h)  // groups are multiples of 16 columns
      sums[row * groups + (first + 16 * h) / group] += static_cast<float>(half_sums[h]) * scale;
  }
  for (int64_t row = 0; groups && row < M; ++row)
    for (int64_t k = blocks * 64; k < K; ++k) sums[row * groups + k / group] += xp[row * K + k];
  return {values, scales, group_sums, {q, s, blocks}};
}

// |even| · (x_even with even's signs) + |odd| · (x_odd with odd's signs), in int32 lanes.
inline __m256i signed_products(__m256i even_magnitude, __m256i x_even, __m256i even_signs,
                               __m256i odd_magnitude, __m256i x_odd, __m256i odd_signs) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i products_even = _mm256_maddubs_epi16(even_magnitude, _mm256_sign_epi8(x_even, even_signs));
  __m256i products_odd = _mm256_maddubs_epi16(odd_magnitude, _mm256_sign_epi8(x_odd, odd_signs));
  return _mm256_add_epi32(_mm256_madd_epi16(products_even, ones), _mm256_madd_epi16(products_odd, ones));
}

inline __m256i load_block(const int8_t* x) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
}

// Block sums of 4-bit codes, two per byte: the int32 sums of block p of one weight row
// with R rows of x (`x` from the first).
struct NibbleBlocks {
  const uint8_t* packed;
  __m256i table;

  template <int R>
  void sums(const Int8Rows& x, int64_t p, __m256i* out) const {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * p));
    __m256i even = _mm256_shuffle_epi8(table, _mm256_and_si256(bytes, low));
    __m256i odd = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low));
    __m256i even_magnitude = _mm256_sign_epi8(even, even), odd_magnitude = _mm256_sign_epi8(odd, odd);
    for (int r = 0; r < R; ++r)
      out[r] = signed_products(even_magnitude, load_block(x.block(r, p)), even, odd_magnitude,
                               load_block(x.block(r, p) + 32), odd);
  }
};

// The group scale of each 8-column lane of block p, for groups that are not a multiple of
// 64 columns: NVFP4's 16 and MX's 32 directly, other multiples of 16 by division.
template <typename Scales>
inline __m256 lane_group_scales(Scales scales, int64_t p, int64_t group) {
  if (group == 32) return _mm256_set_m128(_mm_set1_ps(scales[2 * p + 1]), _mm_set1_ps(scales[2 * p]));
  if (group == 16) {
    float a = scales[4 * p], b = scales[4 * p + 1], c = scales[4 * p + 2], d = scales[4 * p + 3];
    return _mm256_setr_ps(a, a, b, b, c, c, d, d);
  }
  alignas(32) float lanes[8];
  for (int j = 0; j < 8; ++j) lanes[j] = scales[(64 * p + 8 * j) / group];
  return _mm256_load_ps(lanes);
}

// dots[r] += the whole blocks' part of row r's dot product, less its zero points (zero *
// scale * the group's x sum, over all groups). Groups of 64 columns and more sum their
// blocks, then scale once and take the zero point off with the scale at hand (a pass of
// its own re-decoded every scale: +20% for int4 with float16 scales); smaller ones scale
// each block by its lanes' groups.
template <int R, typename Blocks, typename Scales, typename Zero>
void dots_int8(const Lut4Inputs& in, int64_t m, const Blocks blocks, Scales scales, Zero zeros,
               int64_t group, float* dots) {
  const Int8Rows x = in.int8_rows->from(m);
  const int64_t groups = in.K / group;
  const float* xsums = in.xsums + m * groups;
  __m256 total[R];
  __m256i sums[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  if (group % 64 == 0) {
    // One loop over the blocks that folds a group at its last block: with a loop per
    // group, GCC reloaded the block tables at every group (~28 instructions, against ~32
    // per block of HIGGS pairs at group 128).
    const int64_t per_group = group / 64;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t p = 0, g = 0, group_end = per_group; p < x.blocks; ++p) {
      blocks.template sums<R>(x, p, sums);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_loadu_ps(x.lane_scales(r, p)), acc[r]);
      if (p + 1 < group_end) continue;
      float scale = scales[g];
      for (int r = 0; r < R; ++r) {
        total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(scale), total[r]);
        acc[r] = _mm256_setzero_ps();
      }
      if constexpr (Zero::any)
        for (int r = 0; r < R; ++r) dots[r] -= scale * zeros[g] * xsums[r * groups + g];
      ++g;
      group_end += per_group;
    }
  } else {
    for (int64_t p = 0; p < x.blocks; ++p) {
      __m256 group_scales = lane_group_scales(scales, p, group);
      blocks.template sums<R>(x, p, sums);
      for (int r = 0; r < R; ++r) {
        __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(x.lane_scales(r, p)), group_scales);
        total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, total[r]);
      }
    }
    if constexpr (Zero::any)
      for (int64_t g = 0; g < groups; ++g)
        for (int r = 0; r < R; ++r) dots[r] -= scales[g] * zeros[g] * xsums[r * groups + g];
  }
  for (int r = 0; r < R; ++r) dots[r] += horizontal_sum(total[r]);
}
#endif

// dots[r] = sum_k x[m + r, k] * (lut[code_k] - zero_g) * scale_g over one weight row.
// With the int8 rows (AVX2, group a multiple of 16) the whole 64-column blocks go through
// the vector loop and zero points come off as zero * scale * the group's x sum; the
// columns past the last block and builds without AVX2 run in float.
template <int R, typename Scales, typename Zero>
void lut4_dots(const Lut4Inputs& in, int64_t m, const uint8_t* packed, const float* lut,
               const void* table, Scales scales, Zero zeros, int64_t group, float* dots) {
  int64_t K = in.K;
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
#ifdef __AVX2__
  if (in.int8_rows) {
    NibbleBlocks blocks{packed, static_cast<const Int8Table*>(table)->values};
    dots_int8<R>(in, m, blocks, scales, zeros, group, dots);
    for (int64_t k = in.int8_rows->blocks * 64; k < K; ++k) {  // zero points: in the x sums already
      float w = lut4_weight(packed, lut, scales[k / group], 0.f, k);
      for (int r = 0; r < R; ++r) dots[r] += in.x[(m + r) * K + k] * w;
    }
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
  Lut4Inputs in{x.data_ptr<float>(), nullptr, nullptr, K};
  const void* table = nullptr;
#ifdef __AVX2__
  Int8Table int8 = int8_table(lut);
  Int8X int8_rows;
  table = &int8;
  if (M < LARGE_M && group % 16 == 0) {
    int8_rows = int8_x(x, int8.inverse, Zero::any ? group : 0);
    in.int8_rows = &int8_rows.rows;
    if (Zero::any) in.xsums = int8_rows.group_sums.data_ptr<float>();
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

// ---- lut8 pairs on a sign-symmetric grid: batch-1 kernel -----------------------

// HIGGS's 4-bit pair grid is symmetric under sign flips (grids.py): code c stands for
// (±A[c & 63], ±B[c & 63]), bit 6 the first sign and bit 7 the second. So 64 magnitudes
// per coordinate, four 16-entry vpshufb tables blended by bits 4 and 5, replace 256
// unrelated pairs loaded one at a time (PairTable), and the signs go onto x (vpsignb).
// The shipped grid also has A[j] == A[j & 31]: two tables and one blend for the first
// coordinate, 17% fewer instructions a block. The rest is the 4-bit kernel's: x in int8
// per 32 columns, laid out per 64-column block as its even then its odd columns, which
// are the pairs' first and second entries, and vpmaddubsw products (magnitudes at most
// 127, so no pair of products reaches 2^15).
#ifdef __AVX2__
struct QuadrantTable {
  __m256i first[4], second[4];  // round(|A| * t), round(|B| * t): 16 codes each, both lanes
  float inverse;                // 1 / t, folded into the x scales
  bool shared_first;            // A[j] == A[j & 31]: first[2..3] repeat first[0..1]
};

// The tables of a [256, 2] pair grid, t = 127 / max magnitude; nullopt unless the grid is
// sign-symmetric in the layout above.
std::optional<QuadrantTable> quadrant_table(const float* lut) {
  float largest = 0.f;
  bool shared_first = true;
  for (int c = 0; c < 256; ++c) {
    float a = lut[2 * (c & 63)], b = lut[2 * (c & 63) + 1];
    if (!(a >= 0.f && b >= 0.f) || lut[2 * c] != ((c & 64) ? -a : a) ||
        lut[2 * c + 1] != ((c & 128) ? -b : b))
      return std::nullopt;
    largest = std::max({largest, a, b});
    shared_first = shared_first && a == lut[2 * (c & 31)];
  }
  float t = largest > 0.f ? X8_LEVELS / largest : 1.f;
  alignas(32) uint8_t bytes[2][4][32];
  for (int j = 0; j < 64; ++j)
    for (int i = 0; i < 2; ++i)
      bytes[i][j / 16][j % 16] = bytes[i][j / 16][j % 16 + 16] =
          static_cast<uint8_t>(std::lrint(lut[2 * j + i] * t));
  QuadrantTable table{};
  for (int q = 0; q < 4; ++q) {
    table.first[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[0][q]));
    table.second[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[1][q]));
  }
  table.inverse = 1.f / t;
  table.shared_first = shared_first;
  return table;
}

// Block sums of pair codes, one per byte (see NibbleBlocks).
template <bool SharedFirst>
struct QuadrantPairBlocks {
  const uint8_t* codes;
  const QuadrantTable* table;

  template <int R>
  void sums(const Int8Rows& x, int64_t p, __m256i* out) const {
    __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * p));
    __m256i index = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F));
    // vpblendvb reads each byte's top bit; 16-bit shifts move bit 4 or 5 of every byte
    // there.
    __m256i bit4 = _mm256_slli_epi16(bytes, 3), bit5 = _mm256_slli_epi16(bytes, 2);
    auto lookup32 = [&](const __m256i* quarters) {
      return _mm256_blendv_epi8(_mm256_shuffle_epi8(quarters[0], index),
                                _mm256_shuffle_epi8(quarters[1], index), bit4);
    };
    auto lookup64 = [&](const __m256i* quarters) {
      return _mm256_blendv_epi8(lookup32(quarters), lookup32(quarters + 2), bit5);
    };
    __m256i first = SharedFirst ? lookup32(table->first) : lookup64(table->first);
    __m256i second = lookup64(table->second);
    // Sign bytes are made odd, never 0, which vpsignb would turn into a 0; the 16-bit
    // shift then moves bit 6 to the top of each byte and keeps it nonzero (bit 1 set).
    __m256i second_signs = _mm256_or_si256(bytes, _mm256_set1_epi8(1));
    __m256i first_signs = _mm256_slli_epi16(second_signs, 1);
    for (int r = 0; r < R; ++r)
      out[r] = signed_products(first, load_block(x.block(r, p)), first_signs, second,
                               load_block(x.block(r, p) + 32), second_signs);
  }
};
#endif

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

#ifdef __AVX2__
// dots[r] for pair codes on a sign-symmetric grid: whole 64-column blocks in int8, the
// columns past them in float.
template <int R, bool SharedFirst, typename Scales>
void quadrant_pair_dots(const Lut4Inputs& in, int64_t m, const uint8_t* codes,
                        const QuadrantTable& table, const float* lut, Scales scales,
                        int64_t group, float* dots) {
  for (int r = 0; r < R; ++r) dots[r] = 0.f;
  dots_int8<R>(in, m, QuadrantPairBlocks<SharedFirst>{codes, &table}, scales, NoZeros{}, group,
               dots);
  PairTable pairs{lut};
  for (int64_t k = in.int8_rows->blocks * 64; k < in.K; ++k) {
    float w = pairs.value(codes, k) * scales[k / group];
    for (int r = 0; r < R; ++r) dots[r] += in.x[(m + r) * in.K + k] * w;
  }
}
#endif

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
  auto dequantize = [&](auto decoder, auto reader) {
    return [&, decoder, reader](int64_t start, int64_t rows, float* w) {
      dequantize_lut8_tile(cp + start * (K / D), decoder, reader.shifted(start * groups), K,
                           group_size, rows, w);
    };
  };
#ifdef __AVX2__
  std::optional<QuadrantTable> quadrant;
  if (D == 2 && M < LARGE_M && group_size % 16 == 0) quadrant = quadrant_table(lp);
  if (quadrant) {
    Int8X int8 = int8_x(x, quadrant->inverse, 0);
    Lut4Inputs in{xp, &int8.rows, nullptr, K};
    auto run_quadrant = [&](auto shared_first) {
      with_scales(scales, [&](auto reader) {
        auto dots = [&](auto rows, int64_t m, int64_t o, float* out) {
          constexpr int R = decltype(rows)::value;
          quadrant_pair_dots<R, decltype(shared_first)::value>(
              in, m, cp + o * (K / 2), *quadrant, lp, reader.shifted(o * groups), group_size, out);
        };
        run_linear(x, y, b, dots, dequantize(PairTable{lp}, reader));
      });
    };
    if (quadrant->shared_first)
      run_quadrant(std::true_type{});
    else
      run_quadrant(std::false_type{});
    return y.reshape(output_shape(x_in, N));
  }
#endif
  auto run = [&](auto decoder, auto reader) {
    run_linear(
        x, y, b,
        [&](auto rows, int64_t m, int64_t o, float* dots) {
          constexpr int R = decltype(rows)::value;
          lut8_dots<R>(xp + m * K, cp + o * (K / D), decoder, reader.shifted(o * groups), K,
                       group_size, dots);
        },
        dequantize(decoder, reader));
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
