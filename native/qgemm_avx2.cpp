// q8/q4 weights x int8 activations with AVX2 (vpmaddubsw + vpmaddwd), register-tiled over R rows x
// T tokens. AVX2 has no int8 dot-product instruction: unsigned x signed byte pairs are multiplied
// and added into int16 (vpmaddubsw), then pairs of int16 into int32 (vpmaddwd with ones).
//   q4: nibbles are 0..15 (unsigned) and x is signed, exactly vpmaddubsw's operands; a pair sums
//       to at most 2 * 15 * 127, so the int16 results of a whole group (<= 4 blocks of 32) add up
//       without saturating before one vpmaddwd.
//   q8: both signed; |w| times x with w's sign (vpsignb) keeps the operands in range.
//
// Layout of one quantised activation row (private to this file):
//   int8 q[cols]            natural column order
//   float d[ngp]            per group (weight group G): q * d = x; zero past ng
//   float s[ngp]            per group: d * sum(q), for the q4 min term; zero past ng
// with ng = cols / G and ngp = ng rounded up to 8, so the min term is a plain 8-wide dot product.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "avx2.h"
#include "half.h"
#include "kernels.h"

namespace seqshare {

namespace {

inline int padded_groups(int cols, int G) { return (cols / G + 7) & ~7; }

// 32 int32 (four vectors) -> 32 int8 in order; the values are already within -127..127.
inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

std::size_t qacts_row_bytes_avx2(int cols, int group) {
  return static_cast<std::size_t>(cols) + 8u * static_cast<std::size_t>(padded_groups(cols, group));
}

void quantize_acts_avx2(const float* x, int cols, int G, bool /*for_q8*/, void* out) {
  auto* q = static_cast<std::int8_t*>(out);
  const int ng = cols / G, ngp = padded_groups(cols, G);
  float* d = reinterpret_cast<float*>(q + cols);
  float* s = d + ngp;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int g = 0; g < ng; ++g) {
    const float* xg = x + static_cast<std::size_t>(g) * G;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < G; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    const float dg = _mm_cvtss_f32(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(dg > 0.0f ? 1.0f / dg : 0.0f);
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < G; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * j), id));  // round to nearest even
        sum = _mm256_add_epi32(sum, v[j]);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + static_cast<std::size_t>(g) * G + i),
                          pack_i8(v[0], v[1], v[2], v[3]));
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
    d[g] = dg;
    s[g] = dg * static_cast<float>(_mm_cvtsi128_si32(t));
  }
  for (int g = ng; g < ngp; ++g) d[g] = s[g] = 0.0f;
}

namespace {

struct Ctx {
  const WeightView* w;
  const std::uint8_t* xq;
  std::size_t x_stride;  // bytes per quantised token row
  std::size_t w_stride;  // bytes per weight row
  int ng, ngp;
  float* Y;
  int ldy;
};

// The G weights of group `g` of one row as unsigned (q4) or signed (q8) bytes, 32 per vector, in
// natural column order. q4 byte i of a group holds column i (low nibble) and i + G/2 (high).
template <bool Q4, int G>
inline void load_group(const std::uint8_t* row, int g, __m256i (&w)[G / 32]) {
  if constexpr (!Q4) {
    for (int b = 0; b < G / 32; ++b)
      w[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + static_cast<std::size_t>(g) * G + 32 * b));
    return;
  } else {
    const std::uint8_t* p = row + static_cast<std::size_t>(g) * (G / 2);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    if constexpr (G == 32) {  // 16 bytes: low nibbles are columns 0..15, high nibbles 16..31
      const __m256i r = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      w[0] = _mm256_and_si256(_mm256_srlv_epi32(r, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), m4);
    } else {
      for (int b = 0; b < G / 64; ++b) {
        const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * b));
        w[b] = _mm256_and_si256(r, m4);                                  // columns 32b .. 32b+31
        w[b + G / 64] = _mm256_and_si256(_mm256_srli_epi16(r, 4), m4);  // columns G/2 + 32b ..
      }
    }
  }
}

// int32 lanes of sum(w * x) over one group for one token.
template <bool Q4, int G>
inline __m256i group_dot(const __m256i (&w)[G / 32], const __m256i (&aw)[G / 32], const std::int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Q4) {
    __m256i p = _mm256_maddubs_epi16(w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    for (int b = 1; b < G / 32; ++b)
      p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[b], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * b))));
    return _mm256_madd_epi16(p, ones);
  } else {
    __m256i acc = _mm256_setzero_si256();
    for (int b = 0; b < G / 32; ++b) {
      const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * b)), w[b]);
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[b], xv), ones));
    }
    return acc;
  }
}

// Y[n + j, r + i] for i < R, j < T. dwf/mwf: the R rows' scales and mins as float, (R, ngp).
template <bool Q4, int G, int R, int T>
void tile(const Ctx& c, int r, int n, const float* dwf, const float* mwf) {
  __m256 acc[R][T];
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
  const std::uint8_t* wrow[R];
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    wrow[i] = static_cast<const std::uint8_t*>(c.w->data) + static_cast<std::size_t>(r + i) * c.w_stride;
  const std::uint8_t* xrow = c.xq + static_cast<std::size_t>(n) * c.x_stride;
  const std::size_t K = static_cast<std::size_t>(c.w->cols);
  for (int g = 0; g < c.ng; ++g) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      __m256i w[G / 32], aw[G / 32];
      load_group<Q4, G>(wrow[i], g, w);
      if constexpr (!Q4)
        for (int b = 0; b < G / 32; ++b) aw[b] = _mm256_sign_epi8(w[b], w[b]);
      const __m256 dw = _mm256_broadcast_ss(dwf + i * c.ngp + g);
#pragma GCC unroll 4
      for (int j = 0; j < T; ++j) {
        const auto* x = reinterpret_cast<const std::int8_t*>(xrow + j * c.x_stride);
        const __m256i s = group_dot<Q4, G>(w, aw, x + static_cast<std::size_t>(g) * G);
        const __m256 dx = _mm256_broadcast_ss(reinterpret_cast<const float*>(x + K) + g);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx), acc[i][j]);
      }
    }
  }
  if constexpr (Q4) {  // + sum_g min_g * s_g, eight groups per step
    for (int g = 0; g < c.ngp; g += 8)
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const __m256 mw = _mm256_loadu_ps(mwf + i * c.ngp + g);
        #pragma GCC unroll 16
        for (int j = 0; j < T; ++j) {
          const auto* sx = reinterpret_cast<const float*>(xrow + j * c.x_stride + K) + c.ngp;
          acc[i][j] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(sx + g), acc[i][j]);
        }
      }
  }
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int j = 0; j < T; ++j) c.Y[static_cast<std::size_t>(n + j) * c.ldy + r + i] = avx2::hsum(acc[i][j]);
}

constexpr int kR = 3, kT = 3, kTokBlock = 12;
// From this many tokens on, q4 goes through repacked panels (qgemm_panel_avx2.cpp).
constexpr int kPanelMinTokens = 4;

template <bool Q4, int G, int R>
void tile_tokens(const Ctx& c, int r, int n0, int n1, const float* dwf, const float* mwf) {
  int n = n0;
  for (; n + kT <= n1; n += kT) tile<Q4, G, R, kT>(c, r, n, dwf, mwf);
  switch (n1 - n) {
    case 2: tile<Q4, G, R, 2>(c, r, n, dwf, mwf); break;
    case 1: tile<Q4, G, R, 1>(c, r, n, dwf, mwf); break;
    default: break;
  }
}

// Eight float16 values as float (F16C); `n` < 8 reads only n and zero-fills the rest.
inline __m256 load_h8(const std::uint16_t* p, int n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) std::uint16_t tmp[8] = {};
  std::memcpy(tmp, p, static_cast<std::size_t>(n) * 2);
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// The R rows' float16 scales (and mins) as float, zero-padded to ngp.
void row_scales(const Ctx& c, int r, int R, std::vector<float>& dwf, std::vector<float>& mwf, bool q4) {
  dwf.resize(static_cast<std::size_t>(R) * c.ngp);
  mwf.resize(static_cast<std::size_t>(R) * c.ngp);
  for (int i = 0; i < R; ++i) {
    const std::size_t base = static_cast<std::size_t>(r + i) * c.ng;
    for (int g = 0; g < c.ngp; g += 8) {
      _mm256_storeu_ps(&dwf[i * c.ngp + g], load_h8(c.w->scales + base + g, c.ng - g));
      if (q4) _mm256_storeu_ps(&mwf[i * c.ngp + g], load_h8(c.w->mins + base + g, c.ng - g));
    }
  }
}

template <bool Q4, int G>
void qgemm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  Ctx c{&w, static_cast<const std::uint8_t*>(xq), qacts_row_bytes_avx2(w.cols, G),
        Q4 ? static_cast<std::size_t>(w.cols) / 2 : static_cast<std::size_t>(w.cols),
        w.cols / G, padded_groups(w.cols, G), Y, ldy};
  thread_local std::vector<float> dwf, mwf;
  // Tokens outer in blocks that stay in L1; rows inner, each row tile's weights read once per block.
  for (int nb = 0; nb < N; nb += kTokBlock) {
    const int ne = N - nb < kTokBlock ? N : nb + kTokBlock;
    int r = r0;
    for (; r + kR <= r1; r += kR) {
      row_scales(c, r, kR, dwf, mwf, Q4);
      tile_tokens<Q4, G, kR>(c, r, nb, ne, dwf.data(), mwf.data());
    }
    for (; r < r1; ++r) {
      row_scales(c, r, 1, dwf, mwf, Q4);
      tile_tokens<Q4, G, 1>(c, r, nb, ne, dwf.data(), mwf.data());
    }
  }
}

template <bool Q4>
void qgemm_any(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  switch (w.group) {
    case 32: return qgemm<Q4, 32>(w, xq, N, Y, ldy, r0, r1);
    case 64: return qgemm<Q4, 64>(w, xq, N, Y, ldy, r0, r1);
    default: return qgemm<Q4, 128>(w, xq, N, Y, ldy, r0, r1);  // check_weight allowed only these
  }
}

}  // namespace

void qgemm_q8_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_any<false>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q4_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  if (N >= kPanelMinTokens) return qgemm_q4_panel_avx2(w, xq, N, Y, ldy, r0, r1);
  qgemm_any<true>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
