// q8 weights x int16 activations, register-tiled over R rows x T tokens, for every x86 ISA: written
// once, instantiated by qgemm_avx2.cpp, qgemm_avxvnni.cpp and qgemm_avx512.cpp with a policy `D`
// whose `madd` adds pairwise int16 products into int32 lanes (vpmaddwd + vpaddd, or VNNI's
// vpdpwssd: the same exact integers) on the vectors of its width policy `D::V` (one row per
// 256-bit vector, or two rows per 512-bit vector in qgemm_avx512.cpp). Every output element is the same float sequence (8 lanes per group, summed once
// at the end) for any number of tokens and any tile shape, so results are bit-identical across
// ISAs and batches. Internal linkage throughout (see qgemm_panel.h). Activation layout: qgemm_avx2.cpp.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"
#include "qgemm_vec.h"

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
// share of the next tile's bytes, so that tile arrives as one sequential stream (bench/kernels.py
// --layers 10 on a 2-core Zen 5, AVX2 level: 29 -> 41 GB/s).
template <int R, int G>
inline void q8_prefetch_next(const std::int8_t* W, std::size_t K, int r, int g) {
  const std::int8_t* next = W + static_cast<std::size_t>(r + R) * K + static_cast<std::size_t>(g) * R * G;
#pragma GCC unroll 8
  for (int off = 0; off < R * G; off += 64) _mm_prefetch(reinterpret_cast<const char*>(next + off), _MM_HINT_T0);
}

// One row's 8 lanes per 256-bit vector. `row_bytes` / `group_stride` step to the next row's weights
// and scales; qgemm_avx512.cpp's wider policy holds two rows side by side in a 512-bit vector.
struct Q8Ymm : Vec256 {
  static constexpr int kRows = 1;
  // 16 int8 weights of a row, sign-extended to int16.
  static I load_w(const std::int8_t* p, std::size_t) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I load_x(const std::int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static F scale(const std::uint16_t* p, int) { return h16_scalar(*p); }
  static void store(float* y, F v) { y[0] = hsum8(v); }
};

// int32 lanes of sum(w * x) over one group of G columns of a row (int8, sign-extended to int16 in
// `wv`, once for all tokens of a tile) and one token (int16), 16 columns per step: lane k sums the
// column pairs 16b + 2k, 16b + 2k + 1.
template <class D, int G>
inline typename D::V::I q8_dot(const typename D::V::I* wv, const std::int16_t* x) {
  using V = typename D::V;
  typename V::I acc = V::zero_i();
#pragma GCC unroll 8
  for (int b = 0; b < G / 16; ++b) acc = D::madd(acc, wv[b], V::load_x(x + 16 * b));
  return acc;
}

// Y[n + j, r + i] for i < R * V::kRows, j < T.
template <class D, int G, int R, int T>
void q8_tile(const Q8Ctx& c, int r, int n) {
  using V = typename D::V;
  typename V::F acc[R][T];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < T; ++j) acc[i][j] = V::zero_f();
  const std::size_t K = static_cast<std::size_t>(c.w->cols);
  const auto* W = static_cast<const std::int8_t*>(c.w->data);
  const std::uint8_t* xrow = c.xq + static_cast<std::size_t>(n) * c.x_stride;
  for (int g = 0; g < c.ng; ++g) {
    if constexpr (T <= 2) q8_prefetch_next<R * V::kRows, G>(W, K, r, g);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const std::size_t row = static_cast<std::size_t>(r + V::kRows * i);
      const std::int8_t* wg = W + row * K + static_cast<std::size_t>(g) * G;
      const typename V::F dw = V::scale(c.w->scales + row * c.ng + g, c.ng);
      typename V::I wv[G / 16];
#pragma GCC unroll 8
      for (int b = 0; b < G / 16; ++b) wv[b] = V::load_w(wg + 16 * b, K);
#pragma GCC unroll 16
      for (int j = 0; j < T; ++j) {
        const auto* x = reinterpret_cast<const std::int16_t*>(xrow + j * c.x_stride);
        const typename V::I s = q8_dot<D, G>(wv, x + static_cast<std::size_t>(g) * G);
        const typename V::F dx = V::bcast_f(reinterpret_cast<const float*>(x + K) + g);
        acc[i][j] = V::fmadd(V::to_f(s), V::mul(dw, dx), acc[i][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < T; ++j) V::store(c.Y + static_cast<std::size_t>(n + j) * c.ldy + r + V::kRows * i, acc[i][j]);
}

template <class D, int G, int R>
void q8_tokens(const Q8Ctx& c, int r, int n0, int n1) {
  int n = n0;
  for (; n + D::kT <= n1; n += D::kT) q8_tile<D, G, R, D::kT>(c, r, n);
  if (n < n1) with_tokens<D::kT>(n1 - n, [&](auto L) { q8_tile<D, G, R, L.value>(c, r, n); });
}

// Rows [r0, r1) in tiles of D::kR vectors, then one vector at a time.
template <class D, int G>
void q8_rows(const Q8Ctx& c, int& r, int r1, int nb, int ne) {
  constexpr int step = D::kR * D::V::kRows;
  for (; r + step <= r1; r += step) q8_tokens<D, G, D::kR>(c, r, nb, ne);
  for (; r + D::V::kRows <= r1; r += D::V::kRows) q8_tokens<D, G, 1>(c, r, nb, ne);
}

constexpr int kQ8TokBlock = 12;

template <class D, int G>
void q8_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  using Narrow = typename NarrowOf<D>::type;
  const Q8Ctx c{&w, static_cast<const std::uint8_t*>(xq), qacts_row_bytes_avx2(w.cols, G, true), w.cols / G, Y, ldy};
  // Tokens outer in blocks that stay in L1; rows inner, each row tile's weights read once per block.
  for (int nb = 0; nb < N; nb += kQ8TokBlock) {
    const int ne = N - nb < kQ8TokBlock ? N : nb + kQ8TokBlock;
    int r = r0;
    // Decode's one or two tokens stream from memory faster one row per vector (measured), and a
    // lone last row has no partner: the narrow policy takes both.
    if (ne - nb > 2) q8_rows<D, G>(c, r, r1, nb, ne);
    q8_rows<Narrow, G>(c, r, r1, nb, ne);
  }
}

template <class D>
void qgemm_q8_rows(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_group(w.group, [&](auto G) { q8_run<D, G.value>(w, xq, N, Y, ldy, r0, r1); });
}

}  // namespace
}  // namespace seqshare
