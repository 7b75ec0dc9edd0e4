// q8 weights x int16 activations, register-tiled over R rows x T tokens, for every x86 ISA: written
// once, instantiated by qgemm_avx2.cpp, qgemm_avxvnni.cpp and qgemm_avx512.cpp with a policy `D`
// whose `madd` adds pairwise int16 products into int32 lanes (vpmaddwd + vpaddd, or VNNI's
// vpdpwssd: the same exact integers). Every output element is the same float sequence (8 lanes per group, summed once
// at the end) for any number of tokens and any tile shape, so results are bit-identical across
// ISAs and batches. Internal linkage throughout (see qgemm_panel.h). Activation layout: qgemm_avx2.cpp.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace seqshare {
namespace {

struct Q8Ctx {
  const WeightView* w;
  const std::uint8_t* xq;
  std::size_t x_stride;  // bytes per quantised token row
  int ng;
  float* Y;
  int ldy;
};

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));  // as avx2::hsum: the same bits
  return _mm_cvtss_f32(s);
}

inline __m256 h16_scalar(std::uint16_t h) { return _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))); }

// Decode streams weights from memory faster when they are requested ahead. A tile of R rows reads
// the contiguous bytes [r K, (r + R) K) in R interleaved streams; at group g it requests the same
// share of the next tile's bytes, so that tile arrives as one sequential stream (2-core Zen 5, weights
// far larger than the caches: 27 -> 39 GB/s with AVX2).
template <int R, int G>
inline void q8_prefetch_next(const std::int8_t* W, std::size_t K, int r, int g) {
  const std::int8_t* next = W + static_cast<std::size_t>(r + R) * K + static_cast<std::size_t>(g) * R * G;
#pragma GCC unroll 8
  for (int off = 0; off < R * G; off += 64) _mm_prefetch(reinterpret_cast<const char*>(next + off), _MM_HINT_T0);
}

// int32 lanes of sum(w * x) over one group of G columns of one row (int8, sign-extended to int16
// in `wv`, once for all tokens of a tile) and one token (int16), 16 columns per step: lane k sums
// the column pairs 16b + 2k, 16b + 2k + 1.
template <class Madd, int G>
inline __m256i dot256(const __m256i* wv, const std::int16_t* x) {
  __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int b = 0; b < G / 16; ++b)
    acc = Madd::madd(acc, wv[b], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * b)));
  return acc;
}

// Y[n + j, r + i] for i < R, j < T.
template <class D, int G, int R, int T>
void q8_tile(const Q8Ctx& c, int r, int n) {
  __m256 acc[R][T];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
  const std::size_t K = static_cast<std::size_t>(c.w->cols);
  const auto* W = static_cast<const std::int8_t*>(c.w->data);
  const std::uint8_t* xrow = c.xq + static_cast<std::size_t>(n) * c.x_stride;
  for (int g = 0; g < c.ng; ++g) {
    if constexpr (T <= 2) q8_prefetch_next<R, G>(W, K, r, g);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const std::int8_t* wg = W + static_cast<std::size_t>(r + i) * K + static_cast<std::size_t>(g) * G;
      const __m256 dw = h16_scalar(c.w->scales[static_cast<std::size_t>(r + i) * c.ng + g]);
      __m256i wv[G / 16];
#pragma GCC unroll 8
      for (int b = 0; b < G / 16; ++b)
        wv[b] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16 * b)));
#pragma GCC unroll 16
      for (int j = 0; j < T; ++j) {
        const auto* x = reinterpret_cast<const std::int16_t*>(xrow + j * c.x_stride);
        const __m256i s = dot256<D, G>(wv, x + static_cast<std::size_t>(g) * G);
        const __m256 dx = _mm256_broadcast_ss(reinterpret_cast<const float*>(x + K) + g);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx), acc[i][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < T; ++j) c.Y[static_cast<std::size_t>(n + j) * c.ldy + r + i] = hsum8(acc[i][j]);
}

template <class D, int G, int R>
void q8_tokens(const Q8Ctx& c, int r, int n0, int n1) {
  int n = n0;
  for (; n + D::kT <= n1; n += D::kT) q8_tile<D, G, R, D::kT>(c, r, n);
  if (n < n1) with_tokens<D::kT>(n1 - n, [&](auto L) { q8_tile<D, G, R, L.value>(c, r, n); });
}

constexpr int kQ8TokBlock = 12;

template <class D, int G>
void q8_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  const Q8Ctx c{&w, static_cast<const std::uint8_t*>(xq), qacts_row_bytes_avx2(w.cols, G, true), w.cols / G, Y, ldy};
  // Tokens outer in blocks that stay in L1; rows inner, each row tile's weights read once per block.
  for (int nb = 0; nb < N; nb += kQ8TokBlock) {
    const int ne = N - nb < kQ8TokBlock ? N : nb + kQ8TokBlock;
    int r = r0;
    for (; r + D::kR <= r1; r += D::kR) q8_tokens<D, G, D::kR>(c, r, nb, ne);
    for (; r < r1; ++r) q8_tokens<D, G, 1>(c, r, nb, ne);
  }
}

template <class D>
void qgemm_q8_rows(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_group(w.group, [&](auto G) { q8_run<D, G.value>(w, xq, N, Y, ldy, r0, r1); });
}

}  // namespace
}  // namespace seqshare
