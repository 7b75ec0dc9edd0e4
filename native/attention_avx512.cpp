// The tiled attention (attention_tiles.h) with 16-lane scores and P.V: a 32-key tile is two
// vectors, so each head_dim element of the score loop is half the instructions of AVX2's. The
// bits are AVX2's (the lanes never meet; the softmax is the same 8-lane code).
#include "attention_tiles.h"

namespace seqshare {
namespace {

struct Lanes16 {
  using F = __m512;
  static constexpr int kLanes = 16;
  static F load(const std::uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F zero() { return _mm512_setzero_ps(); }
  static F scale(F x, float c) { return _mm512_mul_ps(x, _mm512_set1_ps(c)); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
};

}  // namespace

void attention_avx512(const AttnArgs& a, int n0, int n1, int b) { attention_tiles<Lanes16>(a, n0, n1, b); }

}  // namespace seqshare
