// fp32 FMA GEMM for f32 / f16 / bf16 weights with AVX2 (no quantisation of activations, so f32
// weights stay exact to float rounding). Each 16-row panel of W is converted and packed k-major
// into a thread-local buffer (8x8 transposes), then an outer-product micro-kernel (16 rows x up to
// 6 tokens = 12 accumulators, x broadcast from memory) runs over all tokens. Every output element
// is one FMA chain along k, in order, whatever the number of tokens: a row's result does not depend
// on the batch it was computed in (decode and prefill agree bit for bit).
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "avx2.h"
#include "half.h"
#include "kernels.h"

namespace seqshare {

namespace {

constexpr int kPanel = 16, kTok = 6;

template <WFmt F>
inline __m256 load_w(const void* W, std::size_t i) {
  if constexpr (F == WFmt::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(W) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(W) + i));
    if constexpr (F == WFmt::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <WFmt F>
inline float load_w1(const void* W, std::size_t i) {
  if constexpr (F == WFmt::F32) return static_cast<const float*>(W)[i];
  const std::uint16_t h = static_cast<const std::uint16_t*>(W)[i];
  if constexpr (F == WFmt::F16) return f16_to_f32(h);
  return bf16_to_f32(h);
}

// packed (K, 16): row i of the panel in lane i, zero rows past the end of W.
template <WFmt F>
void pack_panel(const WeightView& w, int r, int nrows, float* packed) {
  const std::size_t K = static_cast<std::size_t>(w.cols);
  for (int half = 0; half < 2; ++half) {
    const int i0 = 8 * half;
    std::size_t k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i)
        v[i] = i0 + i < nrows ? load_w<F>(w.data, static_cast<std::size_t>(r + i0 + i) * K + k) : _mm256_setzero_ps();
      avx2::transpose8(v);  // v[j] = column k + j of the 8 rows
      for (int j = 0; j < 8; ++j) _mm256_store_ps(packed + (k + j) * kPanel + i0, v[j]);
    }
    for (; k < K; ++k)
      for (int i = 0; i < 8; ++i)
        packed[k * kPanel + i0 + i] =
            i0 + i < nrows ? load_w1<F>(w.data, static_cast<std::size_t>(r + i0 + i) * K + k) : 0.0f;
  }
}

template <int T>
void outer_tile(const float* P, int K, const float* X, float* Y, int ldy, int nrows) {
  __m256 a0[T], a1[T];
  #pragma GCC unroll 16
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_load_ps(P + static_cast<std::size_t>(k) * kPanel);
    const __m256 w1 = _mm256_load_ps(P + static_cast<std::size_t>(k) * kPanel + 8);
    #pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m256 xb = _mm256_broadcast_ss(X + static_cast<std::size_t>(t) * K + k);
      a0[t] = _mm256_fmadd_ps(w0, xb, a0[t]);
      a1[t] = _mm256_fmadd_ps(w1, xb, a1[t]);
    }
  }
  // Rows past the end of W are masked off (their lanes hold zeros times x).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows), lane);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nrows - 8), lane);
  #pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    _mm256_maskstore_ps(Y + static_cast<std::size_t>(t) * ldy, m0, a0[t]);
    _mm256_maskstore_ps(Y + static_cast<std::size_t>(t) * ldy + 8, m1, a1[t]);
  }
}

using OuterFn = void (*)(const float*, int, const float*, float*, int, int);
constexpr OuterFn kOuter[kTok + 1] = {nullptr, outer_tile<1>, outer_tile<2>, outer_tile<3>,
                                      outer_tile<4>, outer_tile<5>, outer_tile<6>};

template <WFmt F>
void gemm_packed(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  thread_local std::vector<float> buf;
  const int K = w.cols;
  buf.resize(static_cast<std::size_t>(K) * kPanel + 8);
  float* packed = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 31) & ~std::uintptr_t(31));
  for (int r = r0; r < r1; r += kPanel) {
    const int nrows = r1 - r < kPanel ? r1 - r : kPanel;
    pack_panel<F>(w, r, nrows, packed);
    for (int n = 0; n < N; n += kTok) {
      const int t = N - n < kTok ? N - n : kTok;
      kOuter[t](packed, K, X + static_cast<std::size_t>(n) * K, Y + static_cast<std::size_t>(n) * ldy + r, ldy, nrows);
    }
  }
}

template <WFmt F>
void gemm(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm_packed<F>(w, X, N, Y, ldy, r0, r1);
}

}  // namespace

void gemm_f32_avx2(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm<WFmt::F32>(w, X, N, Y, ldy, r0, r1);
}
void gemm_f16_avx2(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm<WFmt::F16>(w, X, N, Y, ldy, r0, r1);
}
void gemm_bf16_avx2(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm<WFmt::BF16>(w, X, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
