// The integer GEMMs with AVX512-VNNI (EVEX vpdpbusd / vpdpwssd on 256-bit vectors: Ice Lake and
// later, Zen 4): q4 panels (qgemm_panel.h) and q8 rows (qgemm_q8.h). EVEX reaches 32 vector
// registers, so tiles hold more tokens and rows than the AVX2 ones; the integers and the float
// operations per output element are those of every other ISA, so the results are too.
#include "qgemm_panel.h"
#include "qgemm_q8.h"

namespace seqshare {

namespace {

struct Avx512ByteDot {
  static constexpr int tokens(int) { return 12; }  // 12 float + 12 int32 accumulators of 32 registers
  static __m256i start(__m256i a32) { return a32; }
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static __m256i finish(__m256i, __m256i acc) { return acc; }
};

// 32 columns per vpdpwssd on 512-bit vectors: lanes 0-7 sum the even 16-column blocks and lanes
// 8-15 the odd ones, so adding the halves gives the AVX2 path's 8 lanes, integer for integer.
struct Avx512WordDot {
  static constexpr int kR = 4, kT = 4;  // 16 accumulators
  template <int G>
  static __m256i group(const std::int8_t* w, const std::int16_t* x) {
    __m512i acc = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int b = 0; b < G / 32; ++b) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b)));
      acc = _mm512_dpwssd_epi32(acc, wv, _mm512_loadu_si512(x + 32 * b));
    }
    return _mm256_add_epi32(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1));
  }
};

}  // namespace

void qgemm_q4_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q4_panels<Avx512ByteDot>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q8_rows<Avx512WordDot>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
