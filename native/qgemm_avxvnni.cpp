// The integer GEMMs with AVX-VNNI (VEX vpdpbusd / vpdpwssd on 256-bit vectors: Alder Lake and later,
// Zen 5): q4, q5, q6 and q8p panels (qgemm_panel.h) and q8 rows (qgemm_q8.h). The dot products go straight into
// int32 lanes; the integers, and so the results, are those of the AVX2 path bit for bit.
#include "qgemm_panel.h"
#include "qgemm_q8.h"

namespace seqshare {

namespace {

struct AvxVnniDot {
  using V = Ymm;
  static constexpr int tokens(int G, int) { return G == 16 ? 5 : 6; }  // float + int32 accumulators of 16 registers
  static constexpr bool kInt16Sums = false;
  static __m256i start(__m256i a32) { return a32; }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
  static __m256i finish(__m256i, __m256i acc) { return acc; }
};

struct AvxVnniWordDot {
  using V = Q8Ymm;
  static constexpr int kR = 3, kT = 3;  // 9 accumulators of 16 registers
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_avx_epi32(acc, w, x); }
};

}  // namespace

void qgemm_q4_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<AvxVnniDot, 4>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q5_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<AvxVnniDot, 5>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q6_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<AvxVnniDot, 6>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8p_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<AvxVnniDot, 8>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q8_rows<AvxVnniWordDot>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
