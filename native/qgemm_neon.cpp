// q4, q5, q6 and q8p panels with baseline Advanced SIMD (Cortex-A53/A72): no int8 dot product, so smull multiplies
// 8 int8 pairs into int16 and sadalp adds neighbours into int32; the pairs of a row are added at the
// end of each group (addp). The tile and the float part are in qgemm_neon.h.
#include "qgemm_neon.h"

namespace seqshare {

namespace {

struct NeonDot {
  static constexpr int kTokens = 3;  // 3 x (4 int32 + 2 float) accumulators, 8 weight registers
  template <int Bits, int G, int T>
  static void group(const std::uint8_t* pw, const std::int8_t* const* x, int col0, int32x4_t (*out)[2]) {
    int32x4_t a[T][4];  // rows (0,1), (2,3), (4,5), (6,7), each as two pair sums per row
    for (int t = 0; t < T; ++t)
      for (int k = 0; k < 4; ++k) a[t][k] = vdupq_n_s32(0);
    Panel p;
    const bool low = uses_low(G, col0), high = uses_high(G, col0);
    for (int q = 0; q < group_blocks<G>(); ++q, pw += panel_block_bytes(Bits)) {
      load_block<Bits>(pw, p);
      const int col = col0 - col0 % 32 + 32 * q;
      for (int t = 0; t < T; ++t) {
        const int32x4_t xl = vreinterpretq_s32_s8(vld1q_s8(x[t] + col));
        const int32x4_t xh = vreinterpretq_s32_s8(vld1q_s8(x[t] + col + 16));
        for (int j = 0; j < 4; ++j) {
          const int8x16_t bl = vreinterpretq_s8_s32(vdupq_laneq_s32(xl, j));
          const int8x16_t bh = vreinterpretq_s8_s32(vdupq_laneq_s32(xh, j));
          for (int h = 0; h < 2; ++h) {
            const int8x16_t wl = vreinterpretq_s8_s32(p.lo[j][h]), wh = vreinterpretq_s8_s32(p.hi[j][h]);
            if (low) {
              a[t][2 * h] = vpadalq_s16(a[t][2 * h], vmull_s8(vget_low_s8(wl), vget_low_s8(bl)));
              a[t][2 * h + 1] = vpadalq_s16(a[t][2 * h + 1], vmull_high_s8(wl, bl));
            }
            if (high) {
              a[t][2 * h] = vpadalq_s16(a[t][2 * h], vmull_s8(vget_low_s8(wh), vget_low_s8(bh)));
              a[t][2 * h + 1] = vpadalq_s16(a[t][2 * h + 1], vmull_high_s8(wh, bh));
            }
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      out[t][0] = vpaddq_s32(a[t][0], a[t][1]);
      out[t][1] = vpaddq_s32(a[t][2], a[t][3]);
    }
  }
};

}  // namespace

void qgemm_q4_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<NeonDot, 4>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q5_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<NeonDot, 5>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q6_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<NeonDot, 6>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8p_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<NeonDot, 8>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
