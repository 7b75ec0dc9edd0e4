// The integer GEMMs with AVX512-VNNI (EVEX vpdpbusd / vpdpwssd: Ice Lake and later, Zen 4): q4
// panels (qgemm_panel.h) and q8 rows (qgemm_q8.h). Many tokens take 512-bit vectors holding two
// panels or two rows side by side, which halves the instructions per multiply-add (Zen 5, 2 cores,
// 512 tokens: q4 654 -> 1,230 and q8 242 -> 417 GFLOP/s); decode's one or two tokens take the 256-bit
// tiles, which stream from memory faster. EVEX reaches 32 vector registers, so tiles hold more tokens
// and rows than the AVX2 ones. Every lane holds one output's integers and runs its float steps in
// the order every other x86 ISA does, so the results are theirs bit for bit.
#include "qgemm_panel.h"
#include "qgemm_q8.h"

namespace seqshare {

namespace {

struct Avx512ByteDot {
  using V = Ymm;
  static constexpr int tokens(int) { return 12; }  // 12 float + 12 int32 accumulators of 32 registers
  static __m256i start(__m256i a32) { return a32; }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static __m256i finish(__m256i, __m256i acc) { return acc; }
};

// Two panels side by side: rows r..r+7 in the low 256 bits, r+8..r+15 in the high ones. Each lane
// still holds one row's integers and one row's floats, so the results are the Ymm policy's bits.
struct Zmm {
  using I = __m512i;
  using F = __m512;
  static constexpr int kRows = 16;
  static I load_w(const std::uint8_t* p, std::size_t panel_bytes) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + panel_bytes)), 1);
  }
  static F load_h(const std::uint16_t* p, std::size_t panel_halves) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + panel_halves)), 1));
  }
  static I bcast4(const std::int8_t* p) {
    std::int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static I nibbles() { return _mm512_set1_epi8(0x0F); }
  static I low(I raw, I m4) { return _mm512_and_si512(raw, m4); }
  static I high(I raw, I m4) { return _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static F bcast_f(const float* p) { return _mm512_set1_ps(*p); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F to_f(I a) { return _mm512_cvtepi32_ps(a); }
  static void store(float* y, int nrows, F v) {
    _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << nrows) - 1), v);
  }
};

struct Avx512PanelPairDot {
  using V = Zmm;
  using Narrow = Avx512ByteDot;  // a lone last panel
  static constexpr int tokens(int) { return 12; }  // 12 float + 12 int32 accumulators of 32 registers
  static __m512i start(__m512i a32) { return a32; }
  static __m512i add(__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }
  static __m512i madd(__m512i acc, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static __m512i finish(__m512i, __m512i acc) { return acc; }
};

struct Avx512WordDot {
  static constexpr int kR = 4, kT = 4;  // 16 accumulators
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(acc, w, x); }
};

// q8 rows two at a time: row r's 8 lanes in the low 256 bits of a vector, row r + 1's in the high
// ones. Every lane holds the integers and runs the float steps of qgemm_q8.h's tile, so the results
// are its bits, with half the instructions per multiply-add.
constexpr int kPairT = 6;  // 2 pairs x 6 tokens: 12 float + 12 int32 accumulators of 32 registers

inline __m512i q8_pair_w(const std::int8_t* a, const std::int8_t* b) {
  return _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1));
}

// Y[n + j, r + i] for i < 2P, j < T.
template <int G, int P, int T>
void q8_pair_tile(const Q8Ctx& c, int r, int n) {
  __m512 acc[P][T];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < T; ++j) acc[p][j] = _mm512_setzero_ps();
  const std::size_t K = static_cast<std::size_t>(c.w->cols);
  const auto* W = static_cast<const std::int8_t*>(c.w->data);
  const std::uint8_t* xrow = c.xq + static_cast<std::size_t>(n) * c.x_stride;
  for (int g = 0; g < c.ng; ++g) {
    __m512i s[P][T];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
      for (int j = 0; j < T; ++j) s[p][j] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int b = 0; b < G / 16; ++b) {
      const std::size_t col = static_cast<std::size_t>(g) * G + 16 * b;
      __m512i wv[P];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) wv[p] = q8_pair_w(W + (r + 2 * p) * K + col, W + (r + 2 * p + 1) * K + col);
#pragma GCC unroll 16
      for (int j = 0; j < T; ++j) {
        const auto* x = reinterpret_cast<const std::int16_t*>(xrow + j * c.x_stride) + col;
        const __m512i xb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) s[p][j] = _mm512_dpwssd_epi32(s[p][j], wv[p], xb);
      }
    }
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const std::uint16_t* sc = c.w->scales + static_cast<std::size_t>(r + 2 * p) * c.ng + g;
      const __m512 dw = _mm512_insertf32x8(_mm512_castps256_ps512(h16_scalar(sc[0])), h16_scalar(sc[c.ng]), 1);
#pragma GCC unroll 16
      for (int j = 0; j < T; ++j) {
        const auto* x = reinterpret_cast<const std::int16_t*>(xrow + j * c.x_stride);
        const __m512 dx = _mm512_set1_ps(reinterpret_cast<const float*>(x + K)[g]);
        acc[p][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[p][j]), _mm512_mul_ps(dw, dx), acc[p][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < T; ++j) {
      float* y = c.Y + static_cast<std::size_t>(n + j) * c.ldy + r + 2 * p;
      y[0] = hsum8(_mm512_castps512_ps256(acc[p][j]));
      y[1] = hsum8(_mm512_extractf32x8_ps(acc[p][j], 1));
    }
}

template <int G, int P>
void q8_pair_tokens(const Q8Ctx& c, int r, int n0, int n1) {
  int n = n0;
  for (; n + kPairT <= n1; n += kPairT) q8_pair_tile<G, P, kPairT>(c, r, n);
  if (n < n1) with_tokens<kPairT>(n1 - n, [&](auto L) { q8_pair_tile<G, P, L.value>(c, r, n); });
}

// As qgemm_q8.h's q8_run, rows in pairs; a lone last row takes the 256-bit tile. So do decode's one
// or two tokens: streaming weights from memory, the 256-bit tile with its prefetch ran faster here
// (Zen 5: 40 against 35 GB/s).
template <int G>
void q8_pair_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  const Q8Ctx c{&w, static_cast<const std::uint8_t*>(xq), qacts_row_bytes_avx2(w.cols, G, true), w.cols / G, Y, ldy};
  for (int nb = 0; nb < N; nb += kQ8TokBlock) {
    const int ne = N - nb < kQ8TokBlock ? N : nb + kQ8TokBlock;
    int r = r0;
    if (ne - nb <= 2)
      for (; r + Avx512WordDot::kR <= r1; r += Avx512WordDot::kR) q8_tokens<Avx512WordDot, G, Avx512WordDot::kR>(c, r, nb, ne);
    for (; r + 4 <= r1; r += 4) q8_pair_tokens<G, 2>(c, r, nb, ne);
    for (; r + 2 <= r1; r += 2) q8_pair_tokens<G, 1>(c, r, nb, ne);
    if (r < r1) q8_tokens<Avx512WordDot, G, 1>(c, r, nb, ne);
  }
}

}  // namespace

void qgemm_q4_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q4_panels<Avx512PanelPairDot>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_group(w.group, [&](auto G) { q8_pair_run<G.value>(w, xq, N, Y, ldy, r0, r1); });
}

}  // namespace seqshare
