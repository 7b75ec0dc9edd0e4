// Activation quantisation for the integer kernels, and q8 weights x int16 activations with AVX2
// (the tile is in qgemm_q8.h; q4 weights x int8 activations: qgemm_panel.h): weights sign-extended
// to int16 and multiplied pairwise into int32 with vpmaddwd.
//
// Layout of one quantised activation row (private to this file):
//   q4: int8 q[cols]    natural column order        q8: int16 q[cols]
//       float d[ngp]    per group (weight group G): q * d = x; zero past ng
//       float s[ngp]    q4 only: per group d * sum(q), for a mins plane's term; zero past ng
//       int32 o[4][ngp] q4 only: per group -sum(q) x 8, x 16, x 32 and x 128, where the integer
//                       sum of a symmetric q4, q5, q6 or q8p panel starts (kSymOffsets,
//                       qgemm_panel.h); zero past ng
// with ng = cols / G and ngp = ng rounded up to 8.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "avx2.h"
#include "kernels.h"
#include "qgemm_q8.h"

namespace seqshare {

namespace {

inline int padded_groups(int cols, int G) { return (cols / G + 7) & ~7; }

// 32 int32 (four vectors) -> 32 int8 in order; the values are already within -127..127.
inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

std::size_t qacts_row_bytes_avx2(int cols, int group, bool for_q8) {
  const auto ngp = static_cast<std::size_t>(padded_groups(cols, group));
  return for_q8 ? 2u * static_cast<std::size_t>(cols) + 4u * ngp : static_cast<std::size_t>(cols) + 24u * ngp;
}

// int16 activations for q8 weights: q = round(x / d), d = amax / 32767.
static void quantize_acts16(const float* x, int cols, int G, void* out) {
  auto* q = static_cast<std::int16_t*>(out);
  const int ng = cols / G, ngp = padded_groups(cols, G);
  float* d = reinterpret_cast<float*>(q + cols);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int g = 0; g < ng; ++g) {
    const float* xg = x + static_cast<std::size_t>(g) * G;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < G; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
    const float dg = avx2::hmax(amax) / 32767.0f;
    const __m256 id = _mm256_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
    for (int i = 0; i < G; i += 16) {
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i), id));  // round to nearest even
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8), id));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + static_cast<std::size_t>(g) * G + i),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0)));
    }
    d[g] = dg;
  }
  for (int g = ng; g < ngp; ++g) d[g] = 0.0f;
}

void quantize_acts_avx2(const float* x, int cols, int G, bool for_q8, void* out) {
  if (for_q8) return quantize_acts16(x, cols, G, out);
  auto* q = static_cast<std::int8_t*>(out);
  QActsTail tail(out, cols, G);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int g = 0; g < tail.groups(); ++g) {
    const float* xg = x + static_cast<std::size_t>(g) * G;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < G; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    const float dg = _mm_cvtss_f32(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < G; i += 32) {
      const int n = G - i < 32 ? 2 : 4;  // q6's groups are 16 columns
      __m256i v[4];
      for (int j = 0; j < n; ++j) {
        v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * j), id));  // round to nearest even
        sum = _mm256_add_epi32(sum, v[j]);
      }
      auto* dst = q + static_cast<std::size_t>(g) * G + i;
      if (n == 2)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(pack_i8(v[0], v[1], v[0], v[1])));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), pack_i8(v[0], v[1], v[2], v[3]));
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
    tail.set(g, dg, _mm_cvtsi128_si32(t));
  }
  tail.pad();
}

namespace {

struct MaddwdDot {
  using V = Q8Ymm;
  static constexpr int kR = 3, kT = 3;  // 9 accumulators of 16 registers
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
};

}  // namespace

void qgemm_q8_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q8_rows<MaddwdDot>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
