// The tiled attention (attention_tiles.h) at 16 lanes: a 32-key tile is two vectors, so the score
// loop, the softmax's exponentials and P.V take half the instructions of AVX2's. The bits are
// AVX2's: scores and P.V never mix lanes, and the softmax does AVX2's operations per lane and adds
// its weights in AVX2's order.
#include "attention_tiles.h"

namespace seqshare {
namespace {

// avx2::exp's operations in its order, on 16 lanes: each lane gets avx2::exp's bits.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

struct Lanes16 {
  using F = __m512;
  static constexpr int kLanes = 16, kScoreRows = 12, kPvRows = 4;
  static F load(const std::uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F zero() { return _mm512_setzero_ps(); }
  static F scale(F x, float c) { return _mm512_mul_ps(x, _mm512_set1_ps(c)); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }

  // row_softmax on two vectors: the masked lanes become -inf, then weight 0, as there; the
  // maximum is exact in any order; the weights are added as 8-lane halves in row_softmax's order.
  static float softmax(float scale, int lo, int rhi, float* sc, RowState& row) {
    static_assert(kKeys == 2 * kLanes);
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const bool full = lo == 0 && rhi == kKeys;
    const std::uint64_t seen = ((std::uint64_t{1} << rhi) - 1) & ~((std::uint64_t{1} << lo) - 1);
    const __mmask16 mask[2] = {static_cast<__mmask16>(seen), static_cast<__mmask16>(seen >> 16)};
    __m512 x[2];
    for (int c = 0; c < 2; ++c) {
      x[c] = _mm512_mul_ps(_mm512_loadu_ps(sc + 16 * c), _mm512_set1_ps(scale));
      if (!full) x[c] = _mm512_mask_blend_ps(mask[c], ninf, x[c]);
    }
    const float m_new = std::max(row.m, _mm512_reduce_max_ps(_mm512_max_ps(x[0], x[1])));
    const __m512 mv = _mm512_set1_ps(m_new);
    __m256 half[4];
    for (int c = 0; c < 2; ++c) {
      __m512 pc = exp16(_mm512_sub_ps(x[c], mv));
      if (!full) pc = _mm512_maskz_mov_ps(mask[c], pc);
      _mm512_storeu_ps(sc + 16 * c, pc);
      half[2 * c] = _mm512_castps512_ps256(pc);
      half[2 * c + 1] = _mm512_extractf32x8_ps(pc, 1);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(half[0], half[1]), half[2]), half[3]);
    return row_fold(row, m_new, avx2::hsum(sum));
  }
};

}  // namespace

void attention_avx512(const AttnArgs& a, int n0, int n1, int b) { attention_tiles<Lanes16>(a, n0, n1, b); }

}  // namespace seqshare
