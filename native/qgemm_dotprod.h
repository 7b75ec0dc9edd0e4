// The sdot policy of the panel tile (qgemm_neon.h), shared by qgemm_dotprod.cpp and
// qgemm_i8mm.cpp (which uses it for the odd token of a tile). Needs +dotprod.
#pragma once
#include "qgemm_neon.h"

namespace seqshare {
namespace {

struct SdotDot {
  static constexpr int kTokens = 4;  // 4 x (2 int32 + 2 float) accumulators, 16 weight registers
  template <int Bits, int G, int T>
  static void group(const std::uint8_t* pw, const std::int8_t* const* x, int col0, int32x4_t (*out)[2]) {
    for (int t = 0; t < T; ++t) out[t][0] = out[t][1] = vdupq_n_s32(0);
    Panel p;
    const bool low = uses_low(G, col0), high = uses_high(G, col0);
    for (int q = 0; q < group_blocks<G>(); ++q, pw += panel_block_bytes(Bits)) {
      load_block<Bits>(pw, p);
      const int col = col0 - col0 % 32 + 32 * q;
      for (int t = 0; t < T; ++t) {
        const int8x16_t xl = vld1q_s8(x[t] + col), xh = vld1q_s8(x[t] + col + 16);
        for (int h = 0; h < 2; ++h) {
          if (low) {
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.lo[0][h]), xl, 0);
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.lo[1][h]), xl, 1);
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.lo[2][h]), xl, 2);
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.lo[3][h]), xl, 3);
          }
          if (high) {
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.hi[0][h]), xh, 0);
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.hi[1][h]), xh, 1);
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.hi[2][h]), xh, 2);
            out[t][h] = vdotq_laneq_s32(out[t][h], vreinterpretq_s8_s32(p.hi[3][h]), xh, 3);
          }
        }
      }
    }
  }
};

}  // namespace
}  // namespace seqshare
