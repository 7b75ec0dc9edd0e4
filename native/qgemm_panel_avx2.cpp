// q4, q5, q6 and q8p weights x int8 activations with AVX2 (the tile is in qgemm_panel.h): vpmaddubsw into
// int16 lanes, widened with vpmaddwd once per 32-column block (q5: once per half, q6: per quarter;
// q8p: its two nibble chains once per block).
#include "qgemm_panel.h"

namespace seqshare {

namespace {

struct MaddubsDot {
  using V = Ymm;
  // 16 registers; q8p's two chains per token leave room for 3 tokens.
  static constexpr int tokens(int G, int Bits) { return G == 16 || Bits == 8 ? 3 : G == 32 ? 6 : 4; }
  static constexpr bool kInt16Sums = true;
  static __m256i start(__m256i) { return _mm256_setzero_si256(); }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi16(a, b); }
  // The empty asm keeps each chain a chain. Without it gcc 12 reassociates a group's adds into a
  // tree after all of the group's products, which must then wait in memory: 79 stack accesses per
  // group in q8p's 3-token tile, 94 in q4's 6-token one (now 3 and 17), and the q4 and q8p prefill
  // GEMMs took 1.25-1.8x as long (Zen 3). The sums are exact integers: the order changes no bit.
  static __m256i madd(__m256i acc16, __m256i w, __m256i x) {
    __m256i sum = _mm256_add_epi16(acc16, _mm256_maddubs_epi16(w, x));
    __asm__("" : "+x"(sum));
    return sum;
  }
  static __m256i finish(__m256i a32, __m256i acc16) {
    return _mm256_add_epi32(a32, _mm256_madd_epi16(acc16, _mm256_set1_epi16(1)));
  }
  static __m256i finish_high(__m256i a32, __m256i acc16) {  // q8p's high nibbles: x 16
    return _mm256_add_epi32(a32, _mm256_madd_epi16(acc16, _mm256_set1_epi16(16)));
  }
};

}  // namespace

void qgemm_q4_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<MaddubsDot, 4>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q5_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<MaddubsDot, 5>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q6_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<MaddubsDot, 6>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8p_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<MaddubsDot, 8>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
