// q4, q5, q6 and q8p panels with the int8 matrix-multiply extension (smmla; Cortex-A78/X, Neoverse V, RK3588-class
// boards): one smmla multiplies 2 rows x 8 columns by 2 tokens x 8 columns into a 2 x 2 int32 block,
// 32 multiply-adds per instruction against sdot's 16. Two 4-column groups of the panel zipped by
// 32-bit lanes are 2 rows x 8 columns. Tokens go in pairs; an odd one left over takes the sdot path.
// The tile and the float part are in qgemm_neon.h.
#include "qgemm_dotprod.h"

namespace seqshare {

namespace {

struct SmmlaDot {
  static constexpr int kTokens = 4;
  template <int Bits, int G, int T>
  static void group(const std::uint8_t* pw, const std::int8_t* const* x, int col0, int32x4_t (*out)[2]) {
    constexpr int kPairs = T / 2;
    int32x4_t a[kPairs > 0 ? kPairs : 1][4];  // per pair: row pairs (0,1) (2,3) (4,5) (6,7), lanes r0a r0b r1a r1b
    for (int p = 0; p < kPairs; ++p)
      for (int k = 0; k < 4; ++k) a[p][k] = vdupq_n_s32(0);
    const std::uint8_t* pw0 = pw;
    Panel blk;
    const int m0 = uses_low(G, col0) ? 0 : 2, m1 = uses_high(G, col0) ? 4 : 2;
    for (int q = 0; q < group_blocks<G>(); ++q, pw += panel_block_bytes(Bits)) {
      load_block<Bits>(pw, blk);
      const int col = col0 - col0 % 32 + 32 * q;
      // Columns 8m..8m+7 of the block: m = 0, 1 from the low nibbles of j = (0,1), (2,3); m = 2, 3
      // from the high nibbles.
      for (int m = m0; m < m1; ++m) {
        const int32x4_t(*src)[2] = m < 2 ? blk.lo : blk.hi;
        const int j = 2 * (m % 2);
        int8x16_t wv[4];
        for (int h = 0; h < 2; ++h) {
          wv[2 * h] = vreinterpretq_s8_s32(vzip1q_s32(src[j][h], src[j + 1][h]));
          wv[2 * h + 1] = vreinterpretq_s8_s32(vzip2q_s32(src[j][h], src[j + 1][h]));
        }
        for (int p = 0; p < kPairs; ++p) {
          const int8x16_t xv = vcombine_s8(vld1_s8(x[2 * p] + col + 8 * m), vld1_s8(x[2 * p + 1] + col + 8 * m));
          for (int k = 0; k < 4; ++k) a[p][k] = vmmlaq_s32(a[p][k], wv[k], xv);
        }
      }
    }
    for (int p = 0; p < kPairs; ++p)
      for (int h = 0; h < 2; ++h) {
        out[2 * p][h] = vuzp1q_s32(a[p][2 * h], a[p][2 * h + 1]);
        out[2 * p + 1][h] = vuzp2q_s32(a[p][2 * h], a[p][2 * h + 1]);
      }
    if constexpr (T % 2 == 1) SdotDot::group<Bits, G, 1>(pw0, x + T - 1, col0, out + T - 1);
  }
};

}  // namespace

void qgemm_q4_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SmmlaDot, 4>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q5_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SmmlaDot, 5>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q6_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SmmlaDot, 6>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8p_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SmmlaDot, 8>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
