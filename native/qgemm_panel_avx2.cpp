// q4 weights x int8 activations for many tokens (prefill, batched decode) with AVX2.
//
// Row-major dot products (qgemm_avx2.cpp) spend 5 instructions per 32 multiply-adds of one
// (row, token) pair. Here each call repacks an 8-row panel of W into L1 with one row per 32-bit
// lane -- lane i holds 4 consecutive columns of row i as unsigned bytes -- so one vpmaddubsw
// against 4 bytes of x broadcast to all lanes does 32 multiply-adds for 8 rows at once, and the
// int16 results of a whole 32-column block add up without saturating (8 x 2 x 15 x 127 < 2^15)
// before one vpmaddwd. Scales then apply per lane (= per row). The repack costs about as much as
// three tokens of compute, so ops pick this path only for enough tokens.
//
// Activations use qgemm_avx2.cpp's layout: int8 q[cols], float d[ngp], float s[ngp].
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "avx2.h"
#include "kernels.h"

namespace seqshare {

namespace {

constexpr int kLanes = 8;  // rows per panel

// Columns [32b, 32b + 32) of one q4 row as 32 unsigned bytes in column order. A group's G/2
// bytes hold column i (low nibble) and i + G/2 (high nibble).
inline __m256i unpack_block(const std::uint8_t* row, int G, int b) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if (G == 32) {
    const __m256i r = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b)));
    return _mm256_and_si256(_mm256_srlv_epi32(r, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), m4);
  }
  const int per = G / 32, g = b / per, q = b % per, half = G / 2;
  const std::uint8_t* grp = row + static_cast<std::size_t>(g) * half;
  const bool high = 32 * q >= half;
  const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + (high ? 32 * q - half : 32 * q)));
  return _mm256_and_si256(high ? _mm256_srli_epi16(r, 4) : r, m4);
}

struct Panel {
  const std::uint8_t* w;  // (K / 4, 8 lanes, 4 bytes)
  const float* dw;        // (ng, 8) weight scales per lane
  const float* mw;        // (ng, 8) weight mins per lane
};

// Rows [r, r + nrows) of W into the panel layout; missing rows are zero.
void pack(const WeightView& w, int r, int nrows, std::uint8_t* pw, float* dw, float* mw) {
  const int K = w.cols, G = w.group, ng = K / G;
  const std::size_t stride = static_cast<std::size_t>(K) / 2;
  const auto* base = static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(r) * stride;
  for (int b = 0; b < K / 32; ++b) {
    __m256 v[kLanes];
    for (int i = 0; i < kLanes; ++i)
      v[i] = i < nrows ? _mm256_castsi256_ps(unpack_block(base + i * stride, G, b)) : _mm256_setzero_ps();
    avx2::transpose8(v);  // 32-bit units: v[k] = 4 columns of each of the 8 rows
    for (int k = 0; k < kLanes; ++k) _mm256_store_ps(reinterpret_cast<float*>(pw + (8 * b + k) * 32), v[k]);
  }
  alignas(16) std::uint16_t hs[kLanes], hm[kLanes];
  for (int g = 0; g < ng; ++g) {
    for (int i = 0; i < kLanes; ++i) {
      const std::size_t at = static_cast<std::size_t>(r + i) * ng + g;
      hs[i] = i < nrows ? w.scales[at] : 0;
      hm[i] = i < nrows ? w.mins[at] : 0;
    }
    _mm256_store_ps(dw + 8 * g, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(hs))));
    _mm256_store_ps(mw + 8 * g, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(hm))));
  }
}

inline __m256i bcast4(const std::int8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Y[n + t, r + lane] for T tokens over the whole panel.
template <int G, int T>
void panel_tile(const Panel& P, const std::uint8_t* xq, std::size_t x_stride, int K, int ngp, float* Y, int ldy,
                int nrows) {
  const int ng = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
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
  const std::uint8_t* pw = P.w;
  for (int g = 0; g < ng; ++g) {
    __m256i a32[T];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) a32[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int q = 0; q < G / 32; ++q) {
      const int col = g * G + 32 * q;
      __m256i a16[T];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) a16[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s, pw += 32) {
        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(pw));
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(wv, bcast4(x[t] + col + 4 * s)));
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) a32[t] = _mm256_add_epi32(a32[t], _mm256_madd_epi16(a16[t], ones));
    }
    const __m256 dw = _mm256_load_ps(P.dw + 8 * g), mw = _mm256_load_ps(P.mw + 8 * g);
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
  constexpr int T = G == 32 ? 6 : 4;
  const int K = w.cols, ng = K / G, ngp = (ng + 7) & ~7;
  const std::size_t x_stride = qacts_row_bytes_avx2(K, G);
  thread_local std::vector<float> buf;
  buf.resize(static_cast<std::size_t>(K) * 2 + 16 * static_cast<std::size_t>(ng) + 8);  // K*8 bytes + scales
  auto* base = reinterpret_cast<std::uint8_t*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 31) & ~std::uintptr_t(31));
  Panel P{base, reinterpret_cast<float*>(base + static_cast<std::size_t>(K) * 8), nullptr};
  P.mw = P.dw + 8 * ng;
  const auto* x = static_cast<const std::uint8_t*>(xq);
  for (int r = r0; r < r1; r += kLanes) {
    const int nrows = r1 - r < kLanes ? r1 - r : kLanes;
    pack(w, r, nrows, base, const_cast<float*>(P.dw), const_cast<float*>(P.mw));
    int n = 0;
    for (; n + T <= N; n += T)
      panel_tile<G, T>(P, x + n * x_stride, x_stride, K, ngp, Y + static_cast<std::size_t>(n) * ldy + r, ldy, nrows);
    for (; n < N; ++n)
      panel_tile<G, 1>(P, x + n * x_stride, x_stride, K, ngp, Y + static_cast<std::size_t>(n) * ldy + r, ldy, nrows);
  }
}

}  // namespace

void qgemm_q4_panel_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  switch (w.group) {
    case 32: return run<32>(w, xq, N, Y, ldy, r0, r1);
    case 64: return run<64>(w, xq, N, Y, ldy, r0, r1);
    default: return run<128>(w, xq, N, Y, ldy, r0, r1);
  }
}

}  // namespace seqshare
