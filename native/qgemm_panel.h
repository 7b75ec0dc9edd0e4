// q4 weights x int8 activations straight from the bundle's 8-row panels (ops.h), for every x86
// ISA: the tile below is written once and instantiated by qgemm_panel_avx2.cpp, _avxvnni.cpp and
// _avx512.cpp, each compiled with its own flags, with a policy `D` for the integer dot product.
//
// One 32-byte load holds 4 columns of each of 8 rows in its low nibbles and 4 more in its high
// nibbles, one row per 32-bit lane. Against 4 bytes of x broadcast to all lanes, one multiply-add
// step does 32 multiply-adds for 8 rows at once:
//   AVX2:        vpmaddubsw into int16 lanes; a 32-column block adds up without saturating
//                (8 x 2 x 15 x 127 < 2^15) before one vpmaddwd widens it to int32;
//   (AVX-)VNNI:  vpdpbusd adds the four products straight into the int32 lanes.
// Both give the exact integer sum of a 32-column block, so every ISA computes the same integers and
// then the same float operations -- one FMA per group, in group order -- whatever the number of
// tokens: results are bit-identical across ISAs and do not depend on the batch.
//
// Everything here has internal linkage (an anonymous namespace): each including file gets its own
// copy compiled for its ISA, and the linker can never hand an AVX2 caller an AVX-512 body.
//
// Activations use qgemm_avx2.cpp's layout: int8 q[cols], float d[ngp], float s[ngp].
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace seqshare {
namespace {

inline __m256i bcast4(const std::int8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256 load_h8(const std::uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Y[n + t, r + lane] for T tokens and the 8 rows of one panel.
template <class D, int G, int T>
void panel_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, int ngp, float* Y,
                int ldy, int nrows) {
  const int K = w.cols, ng = K / G, nb = K / 32;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const std::int8_t* x[T];
  const float* dx[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    x[t] = reinterpret_cast<const std::int8_t*>(xq + t * x_stride);
    dx[t] = reinterpret_cast<const float*>(xq + t * x_stride + K);
  }
  __m256 acc[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  const std::uint8_t* pw = static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(panel) * nb * 128;
  const std::uint16_t* sc = w.scales + static_cast<std::size_t>(panel) * ng * 8;
  const std::uint16_t* mn = w.mins + static_cast<std::size_t>(panel) * ng * 8;
  for (int g = 0; g < ng; ++g) {
    __m256i a32[T];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) a32[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int q = 0; q < G / 32; ++q, pw += 128) {
      const int col = g * G + 32 * q;
      __m256i blk[T];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) blk[t] = D::start(a32[t]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + 32 * j));
        const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          blk[t] = D::madd(blk[t], lo, bcast4(x[t] + col + 4 * j));
          blk[t] = D::madd(blk[t], hi, bcast4(x[t] + col + 16 + 4 * j));
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) a32[t] = D::finish(a32[t], blk[t]);
    }
    const __m256 dw = load_h8(sc + 8 * g), mw = load_h8(mn + 8 * g);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m256 scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(dx[t] + g));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32[t]), scale, acc[t]);
      acc[t] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(dx[t] + ngp + g), acc[t]);  // + min * sum(x)
    }
  }
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) _mm256_maskstore_ps(Y + static_cast<std::size_t>(t) * ldy, m, acc[t]);
}

template <class D, int G>
void panel_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  constexpr int T = D::tokens(G);  // accumulators that fit the register file
  const int K = w.cols, ngp = (K / G + 7) & ~7;
  const std::size_t x_stride = qacts_row_bytes_avx2(K, G, false);
  const auto* x = static_cast<const std::uint8_t*>(xq);
  for_panel_tiles<T>(N, r0, r1, [&](int r, int n, int nrows, auto L) {
    panel_tile<D, G, L.value>(w, r / 8, x + n * x_stride, x_stride, ngp, Y + r + static_cast<std::size_t>(n) * ldy, ldy,
                              nrows);
  });
}

template <class D>
void qgemm_q4_panels(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_group(w.group, [&](auto G) { panel_run<D, G.value>(w, xq, N, Y, ldy, r0, r1); });
}

}  // namespace
}  // namespace seqshare
