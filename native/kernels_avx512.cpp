// The AVX-512 levels' float kernels: dot_f32, and the element-wise and activation steps of a
// prefill at 16 lanes. silu_mul and quantize_acts do AVX2's operations per element (avx512::exp
// is avx2::exp's), so every x86 level keeps the same bits.
#include <immintrin.h>

#include "avx512.h"
#include "kernels.h"

namespace seqshare {

float dot_f32_avx512(const float* a, const float* b, std::size_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  if (i + 16 <= n) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    i += 16;
  }
  if (i < n) {  // masked tail instead of a scalar loop
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

void silu_mul_avx512(float* gate, const float* up, std::size_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), neg = _mm512_set1_ps(-0.0f);
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = avx512::exp(_mm512_xor_ps(g, neg));
    _mm512_storeu_ps(gate + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
  // The last 1-15 elements to AVX2's kernel: from a multiple of 16 it takes the 8-wide vectors and
  // the scalar tail that it takes over the whole run, so they get its bits too.
  if (i < n) silu_mul_avx2(gate + i, up + i, n - i);
}

// quantize_acts_avx2's layout and arithmetic (qgemm_avx2.cpp) for groups of 16 or more columns:
// the group's maximum is exact in any order, each value's scaling and rounding is per element, and
// the sum is an integer, so the 16-lane steps give its bytes. q8's int16 rows stay AVX2's.
void quantize_acts_avx512(const float* x, int cols, int G, bool for_q8, void* out) {
  if (for_q8 || G % 16 != 0) return quantize_acts_avx2(x, cols, G, for_q8, out);
  auto* q = static_cast<std::int8_t*>(out);
  QActsTail tail(out, cols, G);
  for (int g = 0; g < tail.groups(); ++g) {
    const float* xg = x + static_cast<std::size_t>(g) * G;
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < G; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
    const float dg = _mm512_reduce_max_ps(amax) / 127.0f;
    const __m512 id = _mm512_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < G; i += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), id));  // round to nearest even
      sum = _mm512_add_epi32(sum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + static_cast<std::size_t>(g) * G + i), _mm512_cvtsepi32_epi8(v));
    }
    tail.set(g, dg, _mm512_reduce_add_epi32(sum));
  }
  tail.pad();
}

}  // namespace seqshare
