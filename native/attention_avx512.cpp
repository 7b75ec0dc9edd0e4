// Tiled attention with AVX-512: 16 keys per tile, converted from f16 once per tile into L1
// (K transposed to (head_dim, 16) so 16 scores are one vector of FMAs with q broadcast), then
// for every group of 4 query rows -- the query heads sharing this kv head, for each query --
// an online-softmax update and P.V into the rows' running outputs. K/V are read once per
// (kv head, query block) and no score matrix exists beyond one 4 x 16 tile.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace seqshare {

namespace {

constexpr int kKeys = 16, kRows = 4;

inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// In place: r[i] lane j <- r[j] lane i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xDD);
  }
}

inline __m512 load_kv(const void* base, bool f16, std::size_t i) {
  if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(base) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + i);
}

struct Tile {
  float* kt;  // (D, 16) transposed keys
  float* v;   // (16, D) values
};

// Keys/values [j, j + nk) of kv head `kvh` into the tile; missing keys are zero.
void load_tile(const AttnArgs& a, int kvh, int j, int nk, Tile& t) {
  const int D = a.head_dim;
  const std::size_t stride = static_cast<std::size_t>(a.n_kv_heads) * D;
  const std::size_t base = (static_cast<std::size_t>(j) * a.n_kv_heads + kvh) * D;
  for (int d0 = 0; d0 < D; d0 += 16) {
    __m512 r[16];
    for (int i = 0; i < kKeys; ++i) {
      r[i] = i < nk ? load_kv(a.span.k, a.span.f16, base + i * stride + d0) : _mm512_setzero_ps();
      _mm512_store_ps(t.v + i * D + d0, i < nk ? load_kv(a.span.v, a.span.f16, base + i * stride + d0) : _mm512_setzero_ps());
    }
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_store_ps(t.kt + (d0 + i) * kKeys, r[i]);
  }
}

struct RowState {
  const float* q;
  float* o;     // running output (D), aligned scratch
  float m, l;
  int limit;    // keys [.., limit) are visible (tile-relative bound computed per tile)
};

// One tile for up to 4 rows: scores, online softmax, P.V.
template <int DV>  // head_dim / 16
void tile_rows(const AttnArgs& a, const Tile& t, int j, int nk, RowState* rs, int nr) {
  __m512 s[kRows];
  for (int r = 0; r < kRows; ++r) s[r] = _mm512_setzero_ps();
  for (int d = 0; d < DV * 16; ++d) {
    const __m512 kd = _mm512_load_ps(t.kt + d * kKeys);
    for (int r = 0; r < nr; ++r) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(rs[r].q[d]), kd, s[r]);
  }
  alignas(64) float p[kRows][kKeys];
  float c[kRows];
  int valid_max = 0;
  for (int r = 0; r < nr; ++r) {
    const int valid = std::min(rs[r].limit - j, nk);
    if (valid <= 0) {
      _mm512_store_ps(p[r], _mm512_setzero_ps());
      c[r] = 1.0f;
      continue;
    }
    valid_max = std::max(valid_max, valid);
    const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 sv = _mm512_mul_ps(s[r], _mm512_set1_ps(a.scale));
    const float mx = _mm512_mask_reduce_max_ps(m, sv);
    const float m_new = std::max(rs[r].m, mx);
    const __m512 pv = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
    _mm512_store_ps(p[r], pv);
    c[r] = std::exp(rs[r].m - m_new);  // 0 when nothing was seen before
    rs[r].l = rs[r].l * c[r] + _mm512_reduce_add_ps(pv);
    rs[r].m = m_new;
  }
  if (valid_max == 0) return;
  __m512 o[kRows][DV];
  for (int r = 0; r < nr; ++r)
    for (int v = 0; v < DV; ++v) o[r][v] = _mm512_mul_ps(_mm512_load_ps(rs[r].o + 16 * v), _mm512_set1_ps(c[r]));
  for (int k = 0; k < valid_max; ++k) {
    for (int v = 0; v < DV; ++v) {
      const __m512 vv = _mm512_load_ps(t.v + k * DV * 16 + 16 * v);
      for (int r = 0; r < nr; ++r) o[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][k]), vv, o[r][v]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int v = 0; v < DV; ++v) _mm512_store_ps(rs[r].o + 16 * v, o[r][v]);
}

template <int DV>
void attend(const AttnArgs& a, int kvh, int n0, int n1, int j0, int j1) {
  constexpr int D = DV * 16;
  const int hpg = a.n_heads / a.n_kv_heads;
  const int nrows = (n1 - n0) * hpg;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<std::size_t>(nrows) * D + 2 * kKeys * D + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 63) & ~std::uintptr_t(63));
  Tile t{base, base + kKeys * D};
  std::vector<RowState> rs(static_cast<std::size_t>(nrows));
  int jend = j0;
  for (int i = 0; i < nrows; ++i) {
    const int n = n0 + i / hpg, h = kvh * hpg + i % hpg;
    float* o = t.v + kKeys * D + static_cast<std::size_t>(i) * D;
    for (int d = 0; d < D; ++d) o[d] = 0.0f;
    const int limit = std::min(j1, a.q_pos[n] - a.span.pos0 + 1);
    rs[i] = RowState{a.q + (static_cast<std::size_t>(n) * a.n_heads + h) * D, o,
                     -std::numeric_limits<float>::infinity(), 0.0f, limit};
    jend = std::max(jend, limit);
  }
  for (int j = j0; j < jend; j += kKeys) {
    const int nk = std::min(kKeys, jend - j);
    load_tile(a, kvh, j, nk, t);
    for (int r = 0; r < nrows; r += kRows) {
      const int nr = std::min(kRows, nrows - r);
      bool any = false;
      for (int i = 0; i < nr; ++i) any |= rs[r + i].limit > j;
      if (any) tile_rows<DV>(a, t, j, nk, &rs[r], nr);
    }
  }
  for (int i = 0; i < nrows; ++i) {
    const int n = n0 + i / hpg, h = kvh * hpg + i % hpg;
    float* out = a.out + (static_cast<std::size_t>(n) * a.n_heads + h) * D;
    float* lse = a.lse + static_cast<std::size_t>(n) * a.n_heads + h;
    if (rs[i].l == 0.0f) {
      *lse = -std::numeric_limits<float>::infinity();
      for (int d = 0; d < D; ++d) out[d] = 0.0f;
      continue;
    }
    *lse = rs[i].m + std::log(rs[i].l);
    const __m512 inv = _mm512_set1_ps(1.0f / rs[i].l);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_load_ps(rs[i].o + d), inv));
  }
}

}  // namespace

void attention_avx512(const AttnArgs& a, int kvh, int n0, int n1, int j0, int j1) {
  switch (a.head_dim) {
    case 64: return attend<4>(a, kvh, n0, n1, j0, j1);
    case 128: return attend<8>(a, kvh, n0, n1, j0, j1);
    case 32: return attend<2>(a, kvh, n0, n1, j0, j1);
    default: return attention_ref(a, kvh, n0, n1, j0, j1);  // other head sizes: the reference
  }
}

}  // namespace seqshare
