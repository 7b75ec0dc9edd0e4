// q8/q4 weights x int8 activations with AVX-512 VNNI (vpdpbusd), register-tiled over R rows x T
// tokens. Activations are quantised once per linear call into the layout below, so the inner loop
// is two vpdpbusd, a convert and two FMAs per 128 columns per (row, token) pair.
//
// Layout of one quantised row: a 256-byte record per 128-column chunk (the last chunk may hold
// 64 columns):
//   [0, 128)   int8 x in "nibble order": first the first half of every group of the chunk, then
//              every second half -- the order in which a q4 byte vector unpacks (low nibbles, then
//              high nibbles). For q8 weights x is stored offset by +128 as unsigned.
//   [128, 192) float dx per int32 lane (the scale of the group that lane covers)
//   [192, 256) float s / lanes_per_group per lane (so summing the lanes gives sum_g s_g)
// A 64-column chunk keeps the same order in its first 64 bytes.
#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#ifndef SEQ_QR
#define SEQ_QR 6
#define SEQ_QT 4
#endif

namespace seqshare {

namespace {

constexpr int kChunk = 128, kRecord = 256;

int lanes_per_group(int G, bool half_chunk) { return half_chunk ? G / 4 : G / 8; }
int group_of_lane(int k, int G, bool half_chunk) { return (half_chunk ? k % 8 : k) / (G / 8); }

}  // namespace

std::size_t qacts_row_bytes_avx512(int cols, int group) {
  return static_cast<std::size_t>((cols + kChunk - 1) / kChunk) * kRecord;
}

void quantize_acts_avx512(const float* x, int cols, int G, bool for_q8, void* out) {
  auto* rec = static_cast<std::uint8_t*>(out);
  for (int c0 = 0; c0 < cols; c0 += kChunk, rec += kRecord) {
    const int width = cols - c0 < kChunk ? cols - c0 : kChunk;
    const bool half_chunk = width < kChunk;
    const int ng = width / G;
    float d[4], s[4];
    for (int g = 0; g < ng; ++g) {
      const float* xg = x + c0 + g * G;
      __m512 amax = _mm512_setzero_ps();
      for (int i = 0; i < G; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
      const float dg = _mm512_reduce_max_ps(amax) / 127.0f;
      const __m512 id = _mm512_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
      __m512i sum = _mm512_setzero_si512();
      alignas(64) std::int8_t q[128];
      for (int i = 0; i < G; i += 16) {
        const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), id));
        sum = _mm512_add_epi32(sum, qi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(qi));
      }
      if (for_q8)
        for (int i = 0; i < G; ++i) q[i] = static_cast<std::int8_t>(q[i] ^ 0x80);
      const int half = G / 2, second = width / 2;  // where the second halves start
      std::memcpy(rec + g * half, q, half);
      std::memcpy(rec + second + g * half, q + half, half);
      d[g] = dg;
      s[g] = dg * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
    auto* dxv = reinterpret_cast<float*>(rec + 128);
    auto* sxv = reinterpret_cast<float*>(rec + 192);
    const float inv_lanes = 1.0f / static_cast<float>(lanes_per_group(G, half_chunk));
    for (int k = 0; k < 16; ++k) {
      const int g = group_of_lane(k, G, half_chunk);
      dxv[k] = d[g];
      sxv[k] = s[g] * inv_lanes;
    }
  }
}

namespace {

struct Ctx {
  const WeightView* w;
  const std::uint8_t* xq;
  std::size_t x_stride;  // bytes per quantised token row
  std::size_t w_stride;  // bytes per weight row
  int ng_row;            // groups per weight row
  int full_chunks;
  bool tail;             // a final 64-column chunk
  __m512i idx_full, idx_half;  // lane -> group-in-chunk
  float* Y;
  int ldy;
};

// Per-lane weight scale (and min) of the groups a chunk covers, from float16.
inline __m512 lane_scales(const std::uint16_t* p, int n_groups, __m512i idx) {
  const __m128i h = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n_groups) - 1), p);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

// Weight bytes of one chunk as (a, b) vectors matching x's (first halves, second halves).
template <bool Q4>
inline void load_full(const Ctx& c, const std::uint8_t* p, __m512i& a, __m512i& b) {
  if (Q4) {
    const __m512i raw = _mm512_loadu_si512(p);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    a = _mm512_and_si512(raw, m4);
    b = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    return;
  }
  const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
  switch (c.w->group) {
    case 32:
      a = _mm512_shuffle_i64x2(w0, w1, _MM_SHUFFLE(2, 0, 2, 0));
      b = _mm512_shuffle_i64x2(w0, w1, _MM_SHUFFLE(3, 1, 3, 1));
      break;
    case 64:
      a = _mm512_shuffle_i64x2(w0, w1, _MM_SHUFFLE(1, 0, 1, 0));
      b = _mm512_shuffle_i64x2(w0, w1, _MM_SHUFFLE(3, 2, 3, 2));
      break;
    default: a = w0; b = w1;
  }
}

template <bool Q4>
inline __m512i load_half(const Ctx& c, const std::uint8_t* p) {
  if (Q4) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, m4)),
                              _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), 1);
  }
  const __m512i w = _mm512_loadu_si512(p);
  return c.w->group == 32 ? _mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0)) : w;
}

// -128 * sum of the signed weights per lane: the correction for storing x as x + 128.
inline __m512i q8_correction(__m512i a, __m512i b) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, a);
  s = _mm512_dpbusd_epi32(s, k128, b);
  return _mm512_sub_epi32(_mm512_setzero_si512(), s);
}

// One chunk for R rows x T tokens; everything unrolled so the accumulators stay in registers.
template <bool Q4, int R, int T, bool HALF>
__attribute__((always_inline)) inline void chunk_step(const Ctx& c, int ch, const std::uint8_t* const* wrow,
                                                      const std::size_t* g0, const std::uint8_t* xc,
                                                      __m512 (&acc)[R][T]) {
  const int gpc = kChunk / c.w->group;
  const int ngc = HALF ? gpc / 2 : gpc;
  const __m512i idx = HALF ? c.idx_half : c.idx_full;
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const std::uint8_t* wp = wrow[i] + static_cast<std::size_t>(ch) * (Q4 ? 64 : 128);
    const std::size_t g = g0[i] + static_cast<std::size_t>(ch) * gpc;
    const __m512 dw = lane_scales(c.w->scales + g, ngc, idx);
    __m512 mw = _mm512_setzero_ps();
    if (Q4) mw = lane_scales(c.w->mins + g, ngc, idx);
    __m512i a, b = _mm512_setzero_si512(), corr = _mm512_setzero_si512();
    if (HALF)
      a = load_half<Q4>(c, wp);
    else
      load_full<Q4>(c, wp, a, b);
    if (!Q4) corr = q8_correction(a, b);
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) {
      const std::uint8_t* xp = xc + static_cast<std::size_t>(j) * c.x_stride;
      const __m512i xa = _mm512_load_si512(xp);
      __m512i s;
      if (Q4) {
        s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, xa);
        if (!HALF) s = _mm512_dpbusd_epi32(s, b, _mm512_load_si512(xp + 64));
      } else {
        s = _mm512_dpbusd_epi32(corr, xa, a);
        if (!HALF) s = _mm512_dpbusd_epi32(s, _mm512_load_si512(xp + 64), b);
      }
      const __m512 scale = _mm512_mul_ps(dw, _mm512_load_ps(reinterpret_cast<const float*>(xp + 128)));
      acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[i][j]);
      if (Q4) acc[i][j] = _mm512_fmadd_ps(mw, _mm512_load_ps(reinterpret_cast<const float*>(xp + 192)), acc[i][j]);
    }
  }
}

template <bool Q4, int R, int T>
void tile(const Ctx& c, int r, int n) {
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
  const std::uint8_t* wrow[R];
  std::size_t g0[R];
  for (int i = 0; i < R; ++i) {
    wrow[i] = static_cast<const std::uint8_t*>(c.w->data) + static_cast<std::size_t>(r + i) * c.w_stride;
    g0[i] = static_cast<std::size_t>(r + i) * c.ng_row;
  }
  const std::uint8_t* xrow = c.xq + static_cast<std::size_t>(n) * c.x_stride;
  for (int ch = 0; ch < c.full_chunks; ++ch)
    chunk_step<Q4, R, T, false>(c, ch, wrow, g0, xrow + static_cast<std::size_t>(ch) * kRecord, acc);
  if (c.tail)
    chunk_step<Q4, R, T, true>(c, c.full_chunks, wrow, g0, xrow + static_cast<std::size_t>(c.full_chunks) * kRecord,
                               acc);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < T; ++j) c.Y[static_cast<std::size_t>(n + j) * c.ldy + r + i] = _mm512_reduce_add_ps(acc[i][j]);
}

constexpr int kR = SEQ_QR, kT = SEQ_QT;

template <bool Q4, int R>
void tile_rows(const Ctx& c, int r, int N) {
  constexpr int T = kT;
  int n = 0;
  for (; n + T <= N; n += T) tile<Q4, R, T>(c, r, n);
  switch (N - n) {
    case 7: if constexpr (T > 7) tile<Q4, R, 7>(c, r, n); break;
    case 6: if constexpr (T > 6) tile<Q4, R, 6>(c, r, n); break;
    case 5: if constexpr (T > 5) tile<Q4, R, 5>(c, r, n); break;
    case 4: if constexpr (T > 4) tile<Q4, R, 4>(c, r, n); break;
    case 3: tile<Q4, R, 3>(c, r, n); break;
    case 2: tile<Q4, R, 2>(c, r, n); break;
    case 1: tile<Q4, R, 1>(c, r, n); break;
    default: break;
  }
}

template <bool Q4>
void qgemm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  Ctx c;
  c.w = &w;
  c.xq = static_cast<const std::uint8_t*>(xq);
  c.x_stride = qacts_row_bytes_avx512(w.cols, w.group);
  c.w_stride = Q4 ? static_cast<std::size_t>(w.cols) / 2 : static_cast<std::size_t>(w.cols);
  c.ng_row = w.cols / w.group;
  c.full_chunks = w.cols / kChunk;
  c.tail = (w.cols % kChunk) != 0;
  alignas(64) int idx[2][16];
  for (int k = 0; k < 16; ++k) {
    idx[0][k] = group_of_lane(k, w.group, false);
    idx[1][k] = group_of_lane(k, w.group, true);
  }
  c.idx_full = _mm512_load_si512(idx[0]);
  c.idx_half = _mm512_load_si512(idx[1]);
  c.Y = Y;
  c.ldy = ldy;
  // Rows inner, tokens outer: a block of T tokens stays in L1 while the rows' packed weights
  // stream from L2 (they are 4x smaller than the quantised activations).
  constexpr int R = kR, TB = 16;
  for (int nb = 0; nb < N; nb += TB) {
    const int nn = N - nb < TB ? N - nb : TB;
    Ctx cb = c;
    cb.xq = c.xq + static_cast<std::size_t>(nb) * c.x_stride;
    cb.Y = Y + static_cast<std::size_t>(nb) * ldy;
    int r = r0;
    for (; r + R <= r1; r += R) tile_rows<Q4, R>(cb, r, nn);
    for (; r < r1; ++r) tile_rows<Q4, 1>(cb, r, nn);
  }
}

}  // namespace

void qgemm_q8_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm<false>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q4_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm<true>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
