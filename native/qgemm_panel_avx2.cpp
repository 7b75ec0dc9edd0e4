// q4 weights x int8 activations with AVX2, straight from the bundle's 8-row panels (ops.h).
//
// One 32-byte load holds 4 columns of each of 8 rows in its low nibbles and 4 more in its high
// nibbles, one row per 32-bit lane. vpmaddubsw against 4 bytes of x broadcast to all lanes does
// 32 multiply-adds for 8 rows at once; the int16 results of a 32-column block add up without
// saturating (8 x 2 x 15 x 127 < 2^15) before one vpmaddwd, and scales then apply per lane (= per
// row). There are no horizontal sums, and every output element is the same sequence of float
// operations -- one FMA per group, in group order -- whatever the number of tokens: a row's result
// does not depend on the batch it was computed in.
//
// Activations use qgemm_avx2.cpp's layout: int8 q[cols], float d[ngp], float s[ngp].
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "avx2.h"
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
template <int G, int T>
void panel_tile(const WeightView& w, int panel, const std::uint8_t* xq, std::size_t x_stride, int ngp, float* Y,
                int ldy, int nrows) {
  const int K = w.cols, ng = K / G, nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
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
      __m256i a16[T];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) a16[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + 32 * j));
        const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(lo, bcast4(x[t] + col + 4 * j)));
          a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(hi, bcast4(x[t] + col + 16 + 4 * j)));
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) a32[t] = _mm256_add_epi32(a32[t], _mm256_madd_epi16(a16[t], ones));
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

template <int G>
void run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  constexpr int T = G == 32 ? 6 : 4;  // accumulators that fit the 16 registers
  const int K = w.cols, ngp = (K / G + 7) & ~7;
  const std::size_t x_stride = qacts_row_bytes_avx2(K, G, false);
  const auto* x = static_cast<const std::uint8_t*>(xq);
  for (int r = r0; r < r1; r += 8) {  // r0 is a multiple of 8: ops split rows in whole panels
    const int nrows = r1 - r < 8 ? r1 - r : 8;
    float* y = Y + r;
    int n = 0;
    for (; n + T <= N; n += T) panel_tile<G, T>(w, r / 8, x + n * x_stride, x_stride, ngp, y + static_cast<std::size_t>(n) * ldy, ldy, nrows);
    switch (N - n) {
      case 5: if constexpr (T > 5) panel_tile<G, 5>(w, r / 8, x + n * x_stride, x_stride, ngp, y + static_cast<std::size_t>(n) * ldy, ldy, nrows); break;
      case 4: if constexpr (T > 4) panel_tile<G, 4>(w, r / 8, x + n * x_stride, x_stride, ngp, y + static_cast<std::size_t>(n) * ldy, ldy, nrows); break;
      case 3: panel_tile<G, 3>(w, r / 8, x + n * x_stride, x_stride, ngp, y + static_cast<std::size_t>(n) * ldy, ldy, nrows); break;
      case 2: panel_tile<G, 2>(w, r / 8, x + n * x_stride, x_stride, ngp, y + static_cast<std::size_t>(n) * ldy, ldy, nrows); break;
      case 1: panel_tile<G, 1>(w, r / 8, x + n * x_stride, x_stride, ngp, y + static_cast<std::size_t>(n) * ldy, ldy, nrows); break;
      default: break;
    }
  }
}

}  // namespace

void qgemm_q4_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  switch (w.group) {
    case 32: return run<32>(w, xq, N, Y, ldy, r0, r1);
    case 64: return run<64>(w, xq, N, Y, ldy, r0, r1);
    default: return run<128>(w, xq, N, Y, ldy, r0, r1);
  }
}

}  // namespace seqshare
