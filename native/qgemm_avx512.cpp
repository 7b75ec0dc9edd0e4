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

struct Avx512WordDot {
  static constexpr int kR = 4, kT = 4;  // 16 accumulators
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(acc, w, x); }
};

}  // namespace

void qgemm_q4_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q4_panels<Avx512ByteDot>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q8_rows<Avx512WordDot>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
