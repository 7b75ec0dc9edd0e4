// q4, q5, q6 and q8p weights x int8 activations straight from the bundle's 8-row panels (ops.h), for every
// ARM level: the tile below is written once and instantiated by qgemm_neon.cpp, qgemm_dotprod.cpp and
// qgemm_i8mm.cpp, each compiled with its own -march, with a policy `P` that computes the exact
// int32 sums of one weight group for T tokens:
//   baseline:  smull (int8 x int8 -> int16) and sadalp (pairwise into int32), reduced by addp;
//   dotprod:   sdot by lane: one 16-byte load (4 rows x 4 columns) against 4 bytes of x;
//   i8mm:      smmla on pairs of tokens: 2 rows x 8 columns against 2 tokens x 8 columns.
// All give the same integers, and the float part (one FMA per group for the scale, one for the
// minimum) is the same code, so the three levels agree bit for bit and no result depends on the
// batch. Internal linkage throughout, as in qgemm_panel.h.
//
// Panel bytes: block b (32 columns) of panel p is 128 bytes (q5: 160, q6: 192); byte 32j + 4i + c
// holds column 4j + c (low nibble) and 16 + 4j + c (high nibble) of row 8p + i; for q5 bit 2j + h of
// byte 128 + 4i + c is the fifth bit of nibble h, for q6 bits 2 (2 (j % 2) + h) and up of byte
// 128 + 32 (j / 2) + 4i + c are its two high bits. q5 and q6 values
// (0..31, 0..63) are still int8, so every policy multiplies them as it does the nibbles. A q6 group
// is 16 columns, half a block: the policies then take only its nibbles (uses_low / uses_high). A q8p
// block is 256 bytes of value + 128: load j (j < 8) is column 4j + c of row i at byte 32j + 4i + c, so
// loads j and 4 + j stand where the low and high nibbles of q4's load j do; the policies multiply
// value - 128 (int8) and the tile adds 128 x sum(x), the same integers as x86's.
// Activations: the reference layout (kernels_ref.cpp): int8 q[cols], float d[ng], float s[ng].
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace seqshare {
namespace {

struct Panel {
  // [j][rows 0-3 | 4-7]: values as int8 0..15 (q5: 0..31, q6: 0..63, q8p: value - 128, -128..127)
  int32x4_t lo[4][2], hi[4][2];
};

// The `width` bits from bit s of every byte of a bit plane, moved to bit 4 and added to v (a negative
// count shifts right).
inline uint8x16_t with_bits(uint8x16_t v, uint8x16_t plane, int s, int width) {
  const uint8x16_t moved = vshlq_u8(plane, vdupq_n_s8(static_cast<std::int8_t>(4 - s)));
  return vorrq_u8(v, vandq_u8(moved, vdupq_n_u8(static_cast<std::uint8_t>(((1 << width) - 1) << 4))));
}

template <int Bits>
inline void load_block(const std::uint8_t* pw, Panel& p) {
  if constexpr (Bits == 8) {  // q8p: loads j and 4 + j, less 128 (neon_panel_tile adds it back)
    const uint8x16_t bias = vdupq_n_u8(0x80);
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) {
        p.lo[j][h] = vreinterpretq_s32_u8(veorq_u8(vld1q_u8(pw + 32 * j + 16 * h), bias));
        p.hi[j][h] = vreinterpretq_s32_u8(veorq_u8(vld1q_u8(pw + 128 + 32 * j + 16 * h), bias));
      }
    return;
  }
  const uint8x16_t m4 = vdupq_n_u8(0x0F);
  for (int h = 0; h < 2; ++h) {
    uint8x16_t high[2] = {vdupq_n_u8(0), vdupq_n_u8(0)};  // q5: fifth bits; q6: high bits of j < 2, j >= 2
    if constexpr (Bits >= 5) high[0] = vld1q_u8(pw + 128 + 16 * h);
    if constexpr (Bits == 6) high[1] = vld1q_u8(pw + 160 + 16 * h);
    for (int j = 0; j < 4; ++j) {
      const uint8x16_t raw = vld1q_u8(pw + 32 * j + 16 * h);
      uint8x16_t lo = vandq_u8(raw, m4), hi = vshrq_n_u8(raw, 4);
      if constexpr (Bits == 5) {
        lo = with_bits(lo, high[0], 2 * j, 1);
        hi = with_bits(hi, high[0], 2 * j + 1, 1);
      }
      if constexpr (Bits == 6) {
        lo = with_bits(lo, high[j / 2], 4 * (j % 2), 2);
        hi = with_bits(hi, high[j / 2], 4 * (j % 2) + 2, 2);
      }
      p.lo[j][h] = vreinterpretq_s32_u8(lo);
      p.hi[j][h] = vreinterpretq_s32_u8(hi);
    }
  }
}

// The sum of G int8 activations.
template <int G>
inline int act_sum(const std::int8_t* x) {
  int sum = 0;
  for (int i = 0; i < G; i += 16) sum += vaddlvq_s8(vld1q_s8(x + i));
  return sum;
}

inline float32x4_t h4(const std::uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

// Scale and minimum of group g of a panel's rows 0-3 and 4-7, as x86's GroupScales computes them
// (qgemm_panel.h): from the float16 planes, or from K scales. Which one is the tile's (KScales), fixed
// when it is compiled, as on x86, where a run-time branch here cost AVX2's prefill 10%.
template <int Bits, int G, bool KScales>
inline void group_scales(const WeightView& w, int panel, int g, float32x4_t* dw, float32x4_t* mw) {
  if constexpr (!KScales) {
    const PanelMins mins = panel_mins(w);
    const std::size_t at = (static_cast<std::size_t>(panel) * (w.cols / G) + g) * 8;
    for (int h = 0; h < 2; ++h) {
      dw[h] = h4(w.scales + at + 4 * h);
      mw[h] = vmulq_n_f32(h4(mins.plane + at + 4 * h), mins.factor);
    }
    return;
  }
  const std::uint8_t* k = kscales_at(w, 8 * panel, g);
  const auto* d = reinterpret_cast<const std::uint16_t*>(k);  // d[8] (q4k/q5k: then dmin[8])
  const int j = 8 * (g % (kSuperCols / G));
  if constexpr (Bits == 6) {
    const int16x8_t sc = vmovl_s8(vld1_s8(reinterpret_cast<const std::int8_t*>(k + 16 + j)));
    dw[0] = vmulq_f32(h4(d), vcvtq_f32_s32(vmovl_s16(vget_low_s16(sc))));
    dw[1] = vmulq_f32(h4(d + 4), vcvtq_f32_s32(vmovl_s16(vget_high_s16(sc))));
    for (int h = 0; h < 2; ++h) mw[h] = vmulq_n_f32(dw[h], -32.0f);
  } else {
    const uint16x8_t sc = vmovl_u8(vld1_u8(k + 32 + j)), m = vmovl_u8(vld1_u8(k + 96 + j));
    dw[0] = vmulq_f32(h4(d), vcvtq_f32_u32(vmovl_u16(vget_low_u16(sc))));
    dw[1] = vmulq_f32(h4(d + 4), vcvtq_f32_u32(vmovl_u16(vget_high_u16(sc))));
    mw[0] = vmulq_n_f32(vmulq_f32(h4(d + 8), vcvtq_f32_u32(vmovl_u16(vget_low_u16(m)))), -1.0f);
    mw[1] = vmulq_n_f32(vmulq_f32(h4(d + 12), vcvtq_f32_u32(vmovl_u16(vget_high_u16(m)))), -1.0f);
  }
}

// Y[n + t, r + lane] for T tokens and the 8 rows of one panel.
template <class P, int Bits, int G, int T, bool KScales>
void neon_panel_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, float* Y, int ldy,
                     int nrows) {
  const int K = w.cols, ng = K / G, nb = K / 32;
  const std::int8_t* x[T];
  const float* dx[T];
  for (int t = 0; t < T; ++t) {
    x[t] = reinterpret_cast<const std::int8_t*>(xq + t * x_stride);
    dx[t] = reinterpret_cast<const float*>(xq + t * x_stride + K);
  }
  float32x4_t acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
  const std::uint8_t* pw =
      static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(panel) * nb * panel_block_bytes(Bits);
  for (int g = 0; g < ng; ++g) {
    int32x4_t s[T][2];
    // The group's first block (q6's 16-column groups are each half a block).
    const std::uint8_t* pg = pw + static_cast<std::size_t>(g) * G / 32 * panel_block_bytes(Bits);
    P::template group<Bits, G, T>(pg, x, g * G, s);
    if constexpr (Bits == 8)  // the policies multiplied value - 128: + 128 x sum(x) gives the bytes' sums
      for (int t = 0; t < T; ++t) {
        const int32x4_t back = vdupq_n_s32(128 * act_sum<G>(x[t] + g * G));
        s[t][0] = vaddq_s32(s[t][0], back);
        s[t][1] = vaddq_s32(s[t][1], back);
      }
    float32x4_t dw[2], mw[2];
    group_scales<Bits, G, KScales>(w, panel, g, dw, mw);
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < 2; ++h) {
        acc[t][h] = vfmaq_f32(acc[t][h], vcvtq_f32_s32(s[t][h]), vmulq_n_f32(dw[h], dx[t][g]));
        acc[t][h] = vfmaq_n_f32(acc[t][h], mw[h], dx[t][ng + g]);  // + min * sum(x)
      }
  }
  for (int t = 0; t < T; ++t) {
    float out[8];
    vst1q_f32(out, acc[t][0]);
    vst1q_f32(out + 4, acc[t][1]);
    std::memcpy(Y + static_cast<std::size_t>(t) * ldy, out, sizeof(float) * nrows);
  }
}

// KScales: the weight's scales are K scales (w.kscales).
template <class P, int Bits, int G, bool KScales>
void neon_panel_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  constexpr int T = P::kTokens;
  const std::size_t x_stride = qacts_row_bytes_ref(w.cols, G, false);
  const auto* x = static_cast<const std::uint8_t*>(xq);
  for_panel_tiles<T>(N, r0, r1, [&](int r, int n, int nrows, auto L) {
    neon_panel_tile<P, Bits, G, L.value, KScales>(w, r / 8, x + n * x_stride, x_stride,
                                         Y + r + static_cast<std::size_t>(n) * ldy, ldy, nrows);
  });
}

template <class P, int Bits>
void qgemm_neon_panels(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_panel_layout<Bits>(w, [&](auto G, auto KScales) {
    neon_panel_run<P, Bits, G.value, KScales.value>(w, xq, N, Y, ldy, r0, r1);
  });
}

// The blocks a policy's group reads (one for q6's half-block groups) and, for q6, which half: the low
// nibbles (columns 0-15 of the block) or the high ones.
template <int G>
constexpr int group_blocks() { return G < 32 ? 1 : G / 32; }
inline bool uses_low(int G, int col0) { return G >= 32 || col0 % 32 == 0; }
inline bool uses_high(int G, int col0) { return G >= 32 || col0 % 32 != 0; }

}  // namespace
}  // namespace seqshare
