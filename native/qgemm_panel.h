// q4, q5, q6 and q8p weights x int8 activations straight from the bundle's 8-row panels (ops.h), for every
// x86 ISA: the tile below is written once and instantiated by qgemm_panel_avx2.cpp, _avxvnni.cpp and
// _avx512.cpp, each compiled with its own flags, with a policy `D` for the integer dot product
// (start / madd / add / finish on the vectors of its width policy `D::V`: one panel per 256-bit
// vector, or two panels per 512-bit vector in qgemm_avx512.cpp).
//
// One 32-byte load holds 4 columns of each of 8 rows in its low nibbles and 4 more in its high
// nibbles, one row per 32-bit lane. Against 4 bytes of x broadcast to all lanes, one multiply-add
// step does 32 multiply-adds for 8 rows at once:
//   AVX2:        vpmaddubsw into int16 lanes; a 32-column block adds up without saturating
//                (8 x 2 x 15 x 127 < 2^15) before one vpmaddwd widens it to int32;
//   (AVX-)VNNI:  vpdpbusd adds the four products straight into the int32 lanes.
// q5 adds each value's fifth bit to its nibble (with_bits) and is then the same step. Its values
// reach 31, so AVX2's int16 lanes take at most four steps (4 x 2 x 31 x 127 < 2^15) before they are
// widened. q6 (q6_tile) adds a sixth bit and groups 16 columns.
// All give the exact integer sum of a group (however the chain of steps is split into partial
// sums), so every ISA computes the same integers and then the same float operations, in group order,
// whatever the number of tokens: results are bit-identical across ISAs and do not depend on the
// batch. A symmetric panel (minimum = scale x -2^(bits - 1)) takes the offset into the integer sum,
// which then starts at -2^(bits - 1) x sum(x), and has one FMA per group (TileTokens::add_sym); a
// panel with a mins plane has one FMA for the scale and one for the minimum (TileTokens::add).
//
// Everything here has internal linkage (an anonymous namespace): each including file gets its own
// copy compiled for its ISA, and the linker can never hand an AVX2 caller an AVX-512 body.
//
// Activations use qgemm_avx2.cpp's layout: int8 q[cols], float d[ngp], float s[ngp].
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "qgemm_vec.h"

namespace seqshare {
namespace {

// One panel's 8 rows in the lanes of a 256-bit vector. `panel_bytes` / `panel_halves` step to the
// next panel; a wider policy (qgemm_avx512.cpp) puts two panels side by side in one vector.
struct Ymm : Vec256 {
  static constexpr int kRows = 8;
  static I load_w(const std::uint8_t* p, std::size_t) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static F load_h(const std::uint16_t* p, std::size_t) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // 8 bytes (unsigned, or int8) as floats: a K-scale panel's multiples (ops.h).
  static F load_u8(const std::uint8_t* p, std::size_t) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_i8(const std::uint8_t* p, std::size_t) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // A whole panel (all but a matrix's last) needs no mask: a plain store, not vmaskmovps, whose
  // store form is slow on AMD's cores.
  static void store(float* y, int nrows, F v) {
    if (nrows == 8) return _mm256_storeu_ps(y, v);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(y, m, v);
  }
};

// Each group's scale and minimum of a panel (two, side by side, for a wide V) as the float step
// takes them: from the float16 planes (the minimum as plane x factor, ops.h panel_mins), or from
// K scales: d x sc and -dmin x m (q6k: -32 x the scale), the products ops.h panel_scale_at names.
// Which of the two (KScales), the bits and the group size G are the tile's, fixed when it is compiled:
// choosing between them at run time, per group, would cost AVX2's prefill tile 10% (measured).
// A cursor: `next` gives group 0, 1, 2, ... in turn, walking pointers. Turning a group number into
// a super-block and an offset (a division, a remainder and their address arithmetic) took the
// one-token q4k loop to 75 instructions per group; with the cursor it is 67 (q4's is 50). K scales'
// d and -dmin belong to the whole super-block and are converted when a super-block starts. Every
// product is exact in float, so where they are converted does not change a bit.
template <class V, int Bits, int G, bool KScales>
class GroupScales {
 public:
  using F = typename V::F;
  GroupScales(const WeightView& w, int panel) : k_(w.kscales) {
    const PanelMins mins = panel_mins(w);
    if constexpr (KScales) {
      next_ = static_cast<std::size_t>(w.cols / kSuperCols) * kBytes;
      k_ += static_cast<std::size_t>(panel) * next_;
      factor_ = V::set1_f(kSix ? -32.0f : -1.0f);
    } else {
      next_ = static_cast<std::size_t>(w.cols / w.group) * 8;
      sc_ = w.scales + static_cast<std::size_t>(panel) * next_;
      mn_ = mins.plane + static_cast<std::size_t>(panel) * next_;
      factor_ = V::set1_f(mins.factor);
    }
  }
  void next(F& dw, F& mw) {
    if constexpr (!KScales) {
      dw = V::load_h(sc_, next_);
      mw = V::mul(V::load_h(mn_, next_), factor_);
      sc_ += 8;
      mn_ += 8;
      return;
    }
    if (j_ == 0) {
      const auto* d = reinterpret_cast<const std::uint16_t*>(k_);  // d[8], then dmin[8]
      d_ = V::load_h(d, next_ / 2);
      if constexpr (!kSix) neg_dmin_ = V::mul(V::load_h(d + 8, next_ / 2), factor_);
    }
    if constexpr (kSix) {
      dw = V::mul(d_, V::load_i8(k_ + 16 + j_, next_));
      mw = V::mul(dw, factor_);
    } else {
      dw = V::mul(d_, V::load_u8(k_ + 32 + j_, next_));
      mw = V::mul(neg_dmin_, V::load_u8(k_ + 96 + j_, next_));
    }
    j_ += 8;
    if (j_ == 8 * kPerSuper) {
      j_ = 0;
      k_ += kBytes;
    }
  }

 private:
  static constexpr bool kSix = Bits == 6;
  static constexpr int kPerSuper = kSuperCols / G, kBytes = kscale_bytes(Bits);
  const std::uint8_t* k_;  // the current super-block's K scales
  int j_ = 0;              // the next group's offset in them: 8 x its index in the super-block
  const std::uint16_t *sc_ = nullptr, *mn_ = nullptr;  // the next group's (float16 planes)
  std::size_t next_ = 0;  // to the next panel's groups: halves of the planes, bytes of the K scales
  F factor_;
  F d_, neg_dmin_;  // the current super-block's (K scales only)
};

// The T tokens of a tile: each one's int8 activations x, per-group scales dx, then sums and offset
// terms (the layout of qgemm_avx2.cpp), and its float accumulator. `add` is the float step of a
// panel with a mins plane: one FMA per group for the scale and one for the minimum, in group
// order; add_sym that of a symmetric panel.
template <class V, int T>
struct TileTokens {
  using I = typename V::I;
  using F = typename V::F;
  const std::int8_t* x[T];
  const float* dx[T];
  F acc[T];
  int ngp;

  TileTokens() = default;  // for arrays of tiles (qgemm_amx.cpp), each assigned before use
  TileTokens(const std::uint8_t* xq, std::size_t x_stride, int K, int ngp_) : ngp(ngp_) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      x[t] = reinterpret_cast<const std::int8_t*>(xq + t * x_stride);
      dx[t] = reinterpret_cast<const float*>(xq + t * x_stride + K);
      acc[t] = V::zero_f();
    }
  }
  void add(int g, const I* a32, F dw, F mw) { add_to(acc, g, a32, dw, mw); }
  // The same into accumulators held elsewhere (qgemm_amx.cpp keeps them in registers over groups).
  void add_to(F* into, int g, const I* a32, F dw, F mw) const {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      into[t] = V::fmadd(V::to_f(a32[t]), V::mul(dw, V::bcast_f(dx[t] + g)), into[t]);
      into[t] = V::fmadd(mw, V::bcast_f(dx[t] + ngp + g), into[t]);  // + min * sum(x)
    }
  }
  // A symmetric panel (no mins plane; Q4_0, Q5_0, Q6_K, Q8_0) holds q + 2^(bits - 1) for signed
  // values q: its group's exact integer sum of q x is that of the stored values plus the offset
  // term -sum(x) x 2^(bits - 1), and its float step is one FMA, the scale's: add_sym. VNNI adds
  // into the int32 sums, so the term starts them (start_sym); AVX2's int16 chains leave the int32
  // sums out of the registers until they are widened (the term would spill them: 6-7% slower),
  // so it is added after them (add_sym).
  template <int Bits>
  I offset_term(int t, int g) const {  // -sum(x) x 2^(bits - 1), after the sums in the row
    return V::bcast_i(reinterpret_cast<const std::int32_t*>(dx[t] + (2 + sym_offset_row(Bits)) * ngp) + g);
  }
  template <class D, int Bits>
  I start_sym(int t, int g) const {
    return D::kInt16Sums ? V::zero_i() : offset_term<Bits>(t, g);
  }
  template <class D, int Bits>
  void add_sym(int g, I* a32, F dw) {
    add_sym_to<D, Bits>(acc, g, a32, dw);
  }
  template <class D, int Bits>
  void add_sym_to(F* into, int g, I* a32, F dw) const {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      if constexpr (D::kInt16Sums) a32[t] = V::add_i(a32[t], offset_term<Bits>(t, g));
      into[t] = V::fmadd(V::to_f(a32[t]), V::mul(dw, V::bcast_f(dx[t] + g)), into[t]);
    }
  }
  void store(float* Y, int ldy, int nrows) const {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) V::store(Y + static_cast<std::size_t>(t) * ldy, nrows, acc[t]);
  }
};

// Decode (one or two tokens) streams the panel from memory: asking for the bytes this far ahead,
// with the chain split below, raised it from 34 to 45 GB/s at the AVX2 level (bench/kernels.py
// --layers 10 on a 2-core Zen 5).
constexpr int kPanelPrefetchBytes = 4096;

// A prefill's tokens go in blocks of about this many bytes of activations, which stay in L2 while
// the unit's panels pass over them. Unblocked, a 512-token prefill's activations (850 KiB at 896
// columns) came from L3 once per panel: with 64 KiB blocks the prefill GEMMs ran 3-18% faster at
// 0.5B shapes on AVX2 (Zen 3), and won most alternated runs on avx512 and avxvnni (AMX Xeon).
constexpr std::size_t kPanelTokenBlockBytes = 65536;

// Y[n + t, r + lane] for T tokens and the V::kRows rows of one panel (or two, side by side).
// D::V is the vector policy; D's integer steps work on its vectors.
template <class D, int Bits, int G, int T, bool KScales, bool Sym>
void panel_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, int ngp, float* Y,
                int ldy, int nrows) {
  using V = typename D::V;
  using I = typename V::I;
  using F = typename V::F;
  constexpr int kBlock = panel_block_bytes(Bits);
  const int K = w.cols, ng = K / G, nb = K / 32;
  const std::size_t panel_bytes = static_cast<std::size_t>(nb) * kBlock;
  // q5 sums in int16 lanes are widened every four steps: each of the four chains, or the one chain
  // halfway through the block (a second chain per token would not fit the registers).
  constexpr bool kWidenEach = Bits == 5 && D::kInt16Sums;
  constexpr int kChains = T <= 2 ? 4 : 1;
  const I m4 = V::nibbles();
  TileTokens<V, T> tok(xq, x_stride, K, ngp);
  const std::int8_t* const* x = tok.x;
  const std::uint8_t* pw = static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(panel) * panel_bytes;
  GroupScales<V, Bits, G, KScales> scales(w, panel);
  for (int g = 0; g < ng; ++g) {
    I a32[T];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) a32[t] = Sym ? tok.template start_sym<D, Bits>(t, g) : V::zero_i();
#pragma GCC unroll 4
    for (int q = 0; q < G / 32; ++q, pw += kBlock) {
      const int col = g * G + 32 * q;
      // With few tokens one chain of multiply-adds would wait on its own latency: split it into
      // kChains partial sums, added at the end (exact integers, so the same bits).
      I blk[T][kChains];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        blk[t][0] = D::start(a32[t]);
#pragma GCC unroll 4
        for (int k = 1; k < kChains; ++k) blk[t][k] = V::zero_i();
      }
      I plane = V::zero_i();
      if constexpr (Bits == 5) {
        if constexpr (T <= 2) _mm_prefetch(reinterpret_cast<const char*>(pw + 128 + kPanelPrefetchBytes), _MM_HINT_T0);
        plane = V::load_w(pw + 128, panel_bytes);
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if constexpr (T <= 2)
          _mm_prefetch(reinterpret_cast<const char*>(pw + 32 * j + kPanelPrefetchBytes), _MM_HINT_T0);
        const I raw = V::load_w(pw + 32 * j, panel_bytes);
        I lo = V::low(raw, m4), hi = V::high(raw, m4);
        if constexpr (Bits == 5) {
          lo = V::template with_bits<1>(lo, plane, 2 * j);
          hi = V::template with_bits<1>(hi, plane, 2 * j + 1);
        }
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          I& lo_sum = blk[t][(2 * j) % kChains];
          I& hi_sum = blk[t][(2 * j + 1) % kChains];
          lo_sum = D::madd(lo_sum, lo, V::bcast4(x[t] + col + 4 * j));
          hi_sum = D::madd(hi_sum, hi, V::bcast4(x[t] + col + 16 + 4 * j));
        }
        if constexpr (kWidenEach && kChains == 1) {
          if (j == 1) {
#pragma GCC unroll 16
            for (int t = 0; t < T; ++t) {
              a32[t] = D::finish(a32[t], blk[t][0]);
              blk[t][0] = V::zero_i();
            }
          }
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        if constexpr (kWidenEach) {
#pragma GCC unroll 4
          for (int k = 0; k < kChains; ++k) a32[t] = D::finish(a32[t], blk[t][k]);
        } else {
#pragma GCC unroll 4
          for (int k = 1; k < kChains; ++k) blk[t][0] = D::add(blk[t][0], blk[t][k]);
          a32[t] = D::finish(a32[t], blk[t][0]);
        }
      }
    }
    F dw, mw;
    scales.next(dw, mw);
    if constexpr (Sym)
      tok.template add_sym<D, Bits>(g, a32, dw);
    else
      tok.add(g, a32, dw, mw);
  }
  tok.store(Y, ldy, nrows);
}

// q6 (GGUF Q6_K): 16-column groups, each the low or the high nibbles of a 32-column block, so each
// half of a block is its own group with its own float step; the values (0..63) are the nibbles plus
// their two high bits, which sit side by side in two planes (one shift, mask and or per 32 values),
// and the minimum is -32 x the scale (no mins plane: q6 is symmetric, add_sym).
// AVX2's int16 lanes hold two steps of them (2 x 2 x 63 x 127 < 2^15) before they are widened.
template <class D, int T, bool KScales>
void q6_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, int ngp, float* Y,
             int ldy, int nrows) {
  using V = typename D::V;
  using I = typename V::I;
  using F = typename V::F;
  constexpr int kBlock = panel_block_bytes(6);
  constexpr int kChains = T <= 2 ? 2 : 1;  // as panel_tile: few tokens split the chain of steps
  const int K = w.cols, nb = K / 32;
  const std::size_t panel_bytes = static_cast<std::size_t>(nb) * kBlock;
  const I m4 = V::nibbles();
  GroupScales<V, 6, kQ6Group, KScales> scales(w, panel);
  TileTokens<V, T> tok(xq, x_stride, K, ngp);
  const std::int8_t* const* x = tok.x;
  const std::uint8_t* pw = static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(panel) * panel_bytes;
  for (int b = 0; b < nb; ++b, pw += kBlock) {
    if constexpr (T <= 2)
      for (int l = 0; l < kBlock; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pw + l + kPanelPrefetchBytes), _MM_HINT_T0);
    const I high01 = V::load_w(pw + 128, panel_bytes), high23 = V::load_w(pw + 160, panel_bytes);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int g = 2 * b + h;
      I a32[T], blk[T][kChains];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        a32[t] = tok.template start_sym<D, 6>(t, g);
        blk[t][0] = D::start(a32[t]);
        if constexpr (kChains > 1) blk[t][1] = V::zero_i();
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const I raw = V::load_w(pw + 32 * j, panel_bytes);
        I v = h ? V::high(raw, m4) : V::low(raw, m4);
        v = V::template with_bits<2>(v, j < 2 ? high01 : high23, 2 * (2 * (j % 2) + h));
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          I& sum = blk[t][j % kChains];
          sum = D::madd(sum, v, V::bcast4(x[t] + 32 * b + 16 * h + 4 * j));
        }
        if constexpr (D::kInt16Sums && kChains == 1) {
          if (j == 1) {
#pragma GCC unroll 16
            for (int t = 0; t < T; ++t) {
              a32[t] = D::finish(a32[t], blk[t][0]);
              blk[t][0] = D::start(a32[t]);
            }
          }
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        if constexpr (D::kInt16Sums) {
#pragma GCC unroll 2
          for (int k = 0; k < kChains; ++k) a32[t] = D::finish(a32[t], blk[t][k]);
        } else {
          if constexpr (kChains > 1) blk[t][0] = D::add(blk[t][0], blk[t][1]);
          a32[t] = D::finish(a32[t], blk[t][0]);
        }
      }
      F dw, mw;
      scales.next(dw, mw);
      tok.template add_sym<D, 6>(g, a32, dw);
    }
  }
  tok.store(Y, ldy, nrows);
}

// q8p (GGUF Q8_0): whole bytes, the values + 128 (0..255), minimum -128 x the scale (add_sym); a
// 32-column block is 8 loads, load j holding columns 4j..4j+3 of the 8 rows. VNNI multiplies the
// bytes as they are. AVX2's vpmaddubsw would saturate (2 x 255 x 127 > 2^15), so it takes each byte
// as its two nibbles in two chains, the high one widened x 16 (D::finish_high): 8 steps of
// 2 x 15 x 127 fit int16 lanes.
template <class D, int G, int T>
void q8p_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, int ngp, float* Y,
              int ldy, int nrows) {
  using V = typename D::V;
  using I = typename V::I;
  using F = typename V::F;
  constexpr int kBlock = panel_block_bytes(8);
  constexpr bool kNibbles = D::kInt16Sums;
  constexpr int kChains = kNibbles ? 2 : T <= 2 ? 4 : 1;  // AVX2: low and high nibbles; else as panel_tile
  const int K = w.cols, ng = K / G, nb = K / 32;
  const std::size_t panel_bytes = static_cast<std::size_t>(nb) * kBlock;
  const I m4 = V::nibbles();
  GroupScales<V, 8, G, false> scales(w, panel);
  TileTokens<V, T> tok(xq, x_stride, K, ngp);
  const std::int8_t* const* x = tok.x;
  const std::uint8_t* pw = static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(panel) * panel_bytes;
  for (int g = 0; g < ng; ++g) {
    I a32[T];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) a32[t] = tok.template start_sym<D, 8>(t, g);
#pragma GCC unroll 4
    for (int q = 0; q < G / 32; ++q, pw += kBlock) {
      const int col = g * G + 32 * q;
      if constexpr (T <= 2)
        for (int l = 0; l < kBlock; l += 64)
          _mm_prefetch(reinterpret_cast<const char*>(pw + l + kPanelPrefetchBytes), _MM_HINT_T0);
      I blk[T][kChains];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        blk[t][0] = D::start(a32[t]);
#pragma GCC unroll 4
        for (int k = 1; k < kChains; ++k) blk[t][k] = V::zero_i();
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const I raw = V::load_w(pw + 32 * j, panel_bytes);
        if constexpr (kNibbles) {
          const I lo = V::low(raw, m4), hi = V::high(raw, m4);
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            const I xb = V::bcast4(x[t] + col + 4 * j);
            blk[t][0] = D::madd(blk[t][0], lo, xb);
            blk[t][1] = D::madd(blk[t][1], hi, xb);
          }
        } else {
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            I& sum = blk[t][j % kChains];
            sum = D::madd(sum, raw, V::bcast4(x[t] + col + 4 * j));
          }
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        if constexpr (kNibbles) {
          a32[t] = D::finish_high(D::finish(a32[t], blk[t][0]), blk[t][1]);
        } else {
#pragma GCC unroll 4
          for (int k = 1; k < kChains; ++k) blk[t][0] = D::add(blk[t][0], blk[t][k]);
          a32[t] = D::finish(a32[t], blk[t][0]);
        }
      }
    }
    F dw, mw;
    scales.next(dw, mw);
    tok.template add_sym<D, 8>(g, a32, dw);
  }
  tok.store(Y, ldy, nrows);
}

template <class D, int Bits, int G, int T, bool KScales, bool Sym>
void any_panel_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, int ngp, float* Y,
                    int ldy, int nrows) {
  if constexpr (Bits == 6)
    q6_tile<D, T, KScales>(w, panel, xq, x_stride, ngp, Y, ldy, nrows);
  else if constexpr (Bits == 8)
    q8p_tile<D, G, T>(w, panel, xq, x_stride, ngp, Y, ldy, nrows);
  else
    panel_tile<D, Bits, G, T, KScales, Sym>(w, panel, xq, x_stride, ngp, Y, ldy, nrows);
}

// KScales: the weight's scales are K scales (w.kscales); Sym: the panel is symmetric (no minimums
// but -2^(bits - 1) x the scale).
template <class D, int Bits, int G, bool KScales, bool Sym>
void panel_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  constexpr int T = D::tokens(G, Bits);  // accumulators that fit the register file
  constexpr int kRows = D::V::kRows;
  const int K = w.cols, ngp = (K / G + 7) & ~7;
  const std::size_t x_stride = qacts_row_bytes_avx2(K, G, false);
  const auto* x = static_cast<const std::uint8_t*>(xq);
  const int block = std::max(1, static_cast<int>(kPanelTokenBlockBytes / x_stride) / T) * T;
  for_panel_tiles<T, kRows>(N, r0, r1, [&](int r, int n, int nrows, auto L) {
    const std::uint8_t* xn = x + n * x_stride;
    float* yn = Y + r + static_cast<std::size_t>(n) * ldy;
    if constexpr (kRows > 8) {
      // Decode streams one panel at a time (faster from memory, measured), and a lone last panel
      // has no second one to read: the narrow policy takes both cases.
      using Narrow = typename NarrowOf<D>::type;
      if (L.value <= 2 || nrows <= 8) {
        any_panel_tile<Narrow, Bits, G, L.value, KScales, Sym>(w, r / 8, xn, x_stride, ngp, yn, ldy,
                                                               nrows < 8 ? nrows : 8);
        if (nrows > 8)
          any_panel_tile<Narrow, Bits, G, L.value, KScales, Sym>(w, r / 8 + 1, xn, x_stride, ngp, yn + 8, ldy,
                                                                 nrows - 8);
        return;
      }
    }
    any_panel_tile<D, Bits, G, L.value, KScales, Sym>(w, r / 8, xn, x_stride, ngp, yn, ldy, nrows);
  }, block);
}

// Bits: 4 (q4), 5 (q5), 6 (q6, whose group is always 16) or 8 (q8p).
template <class D, int Bits>
void qgemm_panels(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_panel_layout<Bits>(w, [&](auto G, auto KScales) {
    with_symmetry<Bits, KScales.value>(w, [&](auto Sym) {
      panel_run<D, Bits, G.value, KScales.value, Sym.value>(w, xq, N, Y, ldy, r0, r1);
    });
  });
}

}  // namespace
}  // namespace seqshare
