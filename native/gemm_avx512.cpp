// fp32 FMA GEMM for f32 / f16 / bf16 weights with AVX-512 (no quantisation of activations, so
// f32 weights stay exact to float rounding).
//   N >= kPackMin: each 32-row panel of W is converted and packed k-major into a thread-local
//     buffer once, then an outer-product micro-kernel (32 rows x 12 tokens of accumulators,
//     x broadcast from memory) runs over all tokens: no horizontal sums, Y stored as vectors.
//   N < kPackMin (decode): dot products along K, 4 rows at a time, weights streamed once.
#include <immintrin.h>

#include <vector>

#include "kernels.h"

namespace seqshare {

namespace {

constexpr int kPanel = 32, kTok = 12, kPackMin = 4;

template <WFmt F>
inline __m512 load_w(const void* W, std::size_t i, __mmask16 m = 0xFFFF) {
  if constexpr (F == WFmt::F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(W) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const std::uint16_t*>(W) + i);
    if constexpr (F == WFmt::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// packed (K, 32): row i of the panel in lane i, zero rows past the end of W.
template <WFmt F>
void pack_panel(const WeightView& w, int r, int nrows, float* packed) {
  const std::size_t K = static_cast<std::size_t>(w.cols);
  alignas(64) float tmp[16];
  for (int i = 0; i < kPanel; ++i) {
    if (i >= nrows) {
      for (std::size_t k = 0; k < K; ++k) packed[k * kPanel + i] = 0.0f;
      continue;
    }
    const std::size_t base = static_cast<std::size_t>(r + i) * K;
    std::size_t k = 0;
    for (; k < K; k += 16) {
      const std::size_t left = K - k;
      const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      _mm512_store_ps(tmp, load_w<F>(w.data, base + k, m));
      const std::size_t cnt = left >= 16 ? 16 : left;
      for (std::size_t j = 0; j < cnt; ++j) packed[(k + j) * kPanel + i] = tmp[j];
    }
  }
}

template <int T>
void outer_tile(const float* P, int K, const float* X, float* Y, int ldy, int nrows) {
  __m512 a0[T], a1[T];
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_load_ps(P + static_cast<std::size_t>(k) * kPanel);
    const __m512 w1 = _mm512_load_ps(P + static_cast<std::size_t>(k) * kPanel + 16);
    for (int t = 0; t < T; ++t) {
      const __m512 xb = _mm512_set1_ps(X[static_cast<std::size_t>(t) * K + k]);
      a0[t] = _mm512_fmadd_ps(w0, xb, a0[t]);
      a1[t] = _mm512_fmadd_ps(w1, xb, a1[t]);
    }
  }
  const __mmask16 m0 = nrows >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nrows) - 1);
  const int n1 = nrows - 16;
  const __mmask16 m1 = n1 >= 16 ? 0xFFFF : (n1 <= 0 ? 0 : static_cast<__mmask16>((1u << n1) - 1));
  for (int t = 0; t < T; ++t) {
    _mm512_mask_storeu_ps(Y + static_cast<std::size_t>(t) * ldy, m0, a0[t]);
    _mm512_mask_storeu_ps(Y + static_cast<std::size_t>(t) * ldy + 16, m1, a1[t]);
  }
}

using OuterFn = void (*)(const float*, int, const float*, float*, int, int);
constexpr OuterFn kOuter[kTok + 1] = {nullptr,         outer_tile<1>,  outer_tile<2>, outer_tile<3>, outer_tile<4>,
                                      outer_tile<5>,   outer_tile<6>,  outer_tile<7>, outer_tile<8>, outer_tile<9>,
                                      outer_tile<10>,  outer_tile<11>, outer_tile<12>};

template <WFmt F>
void gemm_packed(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  thread_local std::vector<float, std::allocator<float>> buf;
  const int K = w.cols;
  buf.resize(static_cast<std::size_t>(K) * kPanel + 16);
  float* packed = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 63) & ~std::uintptr_t(63));
  for (int r = r0; r < r1; r += kPanel) {
    const int nrows = r1 - r < kPanel ? r1 - r : kPanel;
    pack_panel<F>(w, r, nrows, packed);
    for (int n = 0; n < N; n += kTok) {
      const int t = N - n < kTok ? N - n : kTok;
      kOuter[t](packed, K, X + static_cast<std::size_t>(n) * K, Y + static_cast<std::size_t>(n) * ldy + r, ldy, nrows);
    }
  }
}

template <WFmt F, int R, int T>
void dot_tile(const WeightView& w, const float* X, float* Y, int ldy, int r) {
  const std::size_t K = static_cast<std::size_t>(w.cols);
  __m512 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  for (std::size_t k = 0; k < K; k += 16) {
    const std::size_t left = K - k;
    const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(m, X + t * K + k);
    for (int i = 0; i < R; ++i) {
      const __m512 wv = load_w<F>(w.data, (r + i) * K + k, m);
      for (int t = 0; t < T; ++t) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) Y[static_cast<std::size_t>(t) * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

template <WFmt F, int T>
void gemm_dot(const WeightView& w, const float* X, float* Y, int ldy, int r0, int r1) {
  int r = r0;
  for (; r + 4 <= r1; r += 4) dot_tile<F, 4, T>(w, X, Y, ldy, r);
  for (; r < r1; ++r) dot_tile<F, 1, T>(w, X, Y, ldy, r);
}

template <WFmt F>
void gemm(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  if (N >= kPackMin) return gemm_packed<F>(w, X, N, Y, ldy, r0, r1);
  const std::size_t K = static_cast<std::size_t>(w.cols);
  for (int n = 0; n < N; ++n)  // N is 1..3 here; one pass of W per token is what decode costs anyway
    gemm_dot<F, 1>(w, X + n * K, Y + static_cast<std::size_t>(n) * ldy, ldy, r0, r1);
}

}  // namespace

void gemm_f32_avx512(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm<WFmt::F32>(w, X, N, Y, ldy, r0, r1);
}
void gemm_f16_avx512(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm<WFmt::F16>(w, X, N, Y, ldy, r0, r1);
}
void gemm_bf16_avx512(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm<WFmt::BF16>(w, X, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
