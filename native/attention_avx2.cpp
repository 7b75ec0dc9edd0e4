// Tiled attention with AVX2: 32 keys per tile, converted from f16 once per tile into L1 (K
// transposed to (head_dim, 32) so 32 scores are four vectors of FMAs with q broadcast), then for
// every pair of query rows -- the query heads sharing this kv head, for each query -- an
// online-softmax update and P.V into the rows' running outputs. K/V are read once per (kv head,
// query block) and no score matrix exists beyond one 2 x 32 tile.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "avx2.h"
#include "kernels.h"

namespace seqshare {

namespace {

// 32 keys x 2 rows: 8 score accumulators + 4 key vectors fit the 16 registers, and the softmax
// bookkeeping per row (two horizontal reductions, one scalar exp) is paid once per 32 keys.
constexpr int kKeys = 32, kRows = 2;

inline __m256 load_kv(const void* base, bool f16, std::size_t i) {
  if (f16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(base) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + i);
}

struct Tile {
  float* kt;  // (D, kKeys) transposed keys
  float* v;   // (kKeys, D) values
};

// Keys/values [j, j + nk) of kv head `kvh` into the tile; missing keys are zero.
template <int D>
void load_tile(const AttnArgs& a, int kvh, int j, int nk, Tile& t) {
  const std::size_t stride = static_cast<std::size_t>(a.n_kv_heads) * D;
  const std::size_t base = (static_cast<std::size_t>(j) * a.n_kv_heads + kvh) * D;
  for (int h = 0; h < kKeys / 8; ++h) {
    for (int d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int key = 8 * h + i;
        r[i] = key < nk ? load_kv(a.span.k, a.span.f16, base + key * stride + d0) : _mm256_setzero_ps();
      }
      avx2::transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(t.kt + (d0 + i) * kKeys + 8 * h, r[i]);
    }
  }
  for (int key = 0; key < nk; ++key)
    for (int d0 = 0; d0 < D; d0 += 8)
      _mm256_store_ps(t.v + key * D + d0, load_kv(a.span.v, a.span.f16, base + key * stride + d0));
}

struct RowState {
  const float* q;
  float* o;  // running output (D), aligned scratch
  float m, l;
  int limit;  // keys before `limit` are visible
};

// One tile for NR rows: scores, online softmax, P.V.
template <int D, int NR>
void tile_rows(const AttnArgs& a, const Tile& t, int j, int nk, RowState* rs) {
  constexpr int KV = kKeys / 8;  // score vectors per row
  __m256 s[NR][KV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < KV; ++c) s[r][c] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m256 k[KV];
#pragma GCC unroll 16
    for (int c = 0; c < KV; ++c) k[c] = _mm256_load_ps(t.kt + d * kKeys + 8 * c);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m256 qb = _mm256_broadcast_ss(rs[r].q + d);
#pragma GCC unroll 16
      for (int c = 0; c < KV; ++c) s[r][c] = _mm256_fmadd_ps(qb, k[c], s[r][c]);
    }
  }
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 scale = _mm256_set1_ps(a.scale);
  alignas(32) float p[kKeys];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const int valid = std::min(rs[r].limit - j, nk);
    if (valid <= 0) continue;
    const __m256 vv = _mm256_set1_ps(static_cast<float>(valid));
    __m256 mask[KV], x[KV];
    __m256 mx = ninf;
#pragma GCC unroll 16
    for (int c = 0; c < KV; ++c) {
      const __m256 idx = _mm256_add_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(8.0f * c));
      mask[c] = _mm256_cmp_ps(idx, vv, _CMP_LT_OQ);
      x[c] = _mm256_blendv_ps(ninf, _mm256_mul_ps(s[r][c], scale), mask[c]);
      mx = _mm256_max_ps(mx, x[c]);
    }
    const float m_new = std::max(rs[r].m, avx2::hmax(mx));
    const __m256 mv = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int c = 0; c < KV; ++c) {
      const __m256 pc = _mm256_and_ps(avx2::exp(_mm256_sub_ps(x[c], mv)), mask[c]);
      _mm256_store_ps(p + 8 * c, pc);
      sum = _mm256_add_ps(sum, pc);
    }
    const float c = std::exp(rs[r].m - m_new);  // 0 when nothing was seen before
    rs[r].l = rs[r].l * c + avx2::hsum(sum);
    rs[r].m = m_new;
    // P.V, 64 output dims (8 registers) at a time.
    const __m256 cv = _mm256_set1_ps(c);
    for (int dc = 0; dc < D; dc += 64) {
      constexpr int W = D < 64 ? D / 8 : 8;
      __m256 o[W];
#pragma GCC unroll 16
      for (int v = 0; v < W; ++v) o[v] = _mm256_mul_ps(_mm256_load_ps(rs[r].o + dc + 8 * v), cv);
      for (int k = 0; k < valid; ++k) {
        const __m256 pb = _mm256_broadcast_ss(p + k);
        const float* vr = t.v + k * D + dc;
#pragma GCC unroll 16
        for (int v = 0; v < W; ++v) o[v] = _mm256_fmadd_ps(pb, _mm256_load_ps(vr + 8 * v), o[v]);
      }
#pragma GCC unroll 16
      for (int v = 0; v < W; ++v) _mm256_store_ps(rs[r].o + dc + 8 * v, o[v]);
    }
  }
}

template <int D>
void attend(const AttnArgs& a, int kvh, int n0, int n1, int j0, int j1) {
  const int hpg = a.n_heads / a.n_kv_heads;
  const int nrows = (n1 - n0) * hpg;
  thread_local std::vector<float> buf;
  thread_local std::vector<RowState> rs;
  buf.resize(static_cast<std::size_t>(nrows) * D + 2 * kKeys * D + 8);
  rs.resize(static_cast<std::size_t>(nrows));
  float* base = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 31) & ~std::uintptr_t(31));
  Tile t{base, base + kKeys * D};
  float* obuf = t.v + kKeys * D;
  int jend = j0;
  for (int i = 0; i < nrows; ++i) {
    const int n = n0 + i / hpg, h = kvh * hpg + i % hpg;
    float* o = obuf + static_cast<std::size_t>(i) * D;
    for (int d = 0; d < D; ++d) o[d] = 0.0f;
    const int limit = std::min(j1, a.q_pos[n] - a.span.pos0 + 1);
    rs[i] = RowState{a.q + (static_cast<std::size_t>(n) * a.n_heads + h) * D, o,
                     -std::numeric_limits<float>::infinity(), 0.0f, limit};
    jend = std::max(jend, limit);
  }
  for (int j = j0; j < jend; j += kKeys) {
    const int nk = std::min(kKeys, jend - j);
    load_tile<D>(a, kvh, j, nk, t);
    for (int r = 0; r < nrows; r += kRows) {
      const int nr = std::min(kRows, nrows - r);
      bool any = false;
      for (int i = 0; i < nr; ++i) any |= rs[r + i].limit > j;
      if (!any) continue;
      switch (nr) {
        case 2: tile_rows<D, 2>(a, t, j, nk, &rs[r]); break;
        default: tile_rows<D, 1>(a, t, j, nk, &rs[r]); break;
      }
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
    const __m256 inv = _mm256_set1_ps(1.0f / rs[i].l);
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_load_ps(rs[i].o + d), inv));
  }
}

}  // namespace

void attention_avx2(const AttnArgs& a, int kvh, int n0, int n1, int j0, int j1) {
  switch (a.head_dim) {
    case 64: return attend<64>(a, kvh, n0, n1, j0, j1);
    case 128: return attend<128>(a, kvh, n0, n1, j0, j1);
    case 32: return attend<32>(a, kvh, n0, n1, j0, j1);
    default: return attention_ref(a, kvh, n0, n1, j0, j1);  // other head sizes: the reference
  }
}

}  // namespace seqshare
