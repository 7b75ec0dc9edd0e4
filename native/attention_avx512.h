// The 16-lane attention policies for attention_tiles.h, shared by attention_avx512.cpp and
// attention_amx.cpp: Lanes16 (f32 products, AVX2's bits) and Bf16Pairs (BF16 pair products over an
// f16 cache, with the staging of a tile as pairs that the AMX tiles read too). Internal linkage,
// as in attention_tiles.h; include it only where AVX-512 (with BF16) is compiled in.
#pragma once
#include "attention_tiles.h"
#include "avx512.h"

namespace seqshare {
namespace {

inline __m512 f16x16(const std::uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The softmax weights of a 32-key tile's scores `sc` (two vectors) against the row's new maximum,
// which it returns: the masked lanes become -inf, then weight 0, as in row_softmax; the maximum
// is exact in any order.
inline float tile_weights16(float scale, int lo, int rhi, const float* sc, float m_old, __m512 (&p)[2]) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const bool full = lo == 0 && rhi == kKeys;
  const std::uint64_t seen = ((std::uint64_t{1} << rhi) - 1) & ~((std::uint64_t{1} << lo) - 1);
  const __mmask16 mask[2] = {static_cast<__mmask16>(seen), static_cast<__mmask16>(seen >> 16)};
  __m512 x[2];
  for (int c = 0; c < 2; ++c) {
    x[c] = _mm512_mul_ps(_mm512_loadu_ps(sc + 16 * c), _mm512_set1_ps(scale));
    if (!full) x[c] = _mm512_mask_blend_ps(mask[c], ninf, x[c]);
  }
  const float m_new = std::max(m_old, _mm512_reduce_max_ps(_mm512_max_ps(x[0], x[1])));
  const __m512 mv = _mm512_set1_ps(m_new);
  for (int c = 0; c < 2; ++c) {
    p[c] = avx512::exp(_mm512_sub_ps(x[c], mv));
    if (!full) p[c] = _mm512_maskz_mov_ps(mask[c], p[c]);
  }
  return m_new;
}

struct Lanes16 {
  using F = __m512;
  static constexpr bool kPairs = false;
  static constexpr int kLanes = 16, kScoreRows = 12, kPvRows = 4;
  static F load(const std::uint16_t* p) { return f16x16(p); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F zero() { return _mm512_setzero_ps(); }
  static F scale(F x, float c) { return _mm512_mul_ps(x, _mm512_set1_ps(c)); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }

  // row_softmax on two vectors (tile_weights16), the weights added as 8-lane halves in
  // row_softmax's order.
  static float softmax(float scale, int lo, int rhi, float* sc, RowState& row) {
    static_assert(kKeys == 2 * kLanes);
    __m512 p[2];
    const float m_new = tile_weights16(scale, lo, rhi, sc, row.m, p);
    __m256 half[4];
    for (int c = 0; c < 2; ++c) {
      _mm512_storeu_ps(sc + 16 * c, p[c]);
      half[2 * c] = _mm512_castps512_ps256(p[c]);
      half[2 * c + 1] = _mm512_extractf32x8_ps(p[c], 1);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(half[0], half[1]), half[2]), half[3]);
    return row_fold(row, m_new, avx2::hsum(sum));
  }
};

// Two f32 vectors (16 lanes each) as one vector of BF16 pairs, lane i = (a[i], b[i]) with a in the low
// half: the operand order of vdpbf16ps, whose lane i adds x[2i] y[2i] + x[2i+1] y[2i+1]. Rounded to
// nearest even.
inline __m512i bf16_pairs(__m512 a, __m512 b) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
}
inline __m512 dot_pairs(__m512 acc, __m512i x, __m512i y) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(y));
}

// Keys c..c+15 of head_dim pair j: from a (D, 32) f16 K block of the cache, or a staged pair tile.
inline __m512i key_pairs(const std::uint16_t* k, int j, int c) {
  return bf16_pairs(f16x16(k + 2 * j * kKeys + c), f16x16(k + (2 * j + 1) * kKeys + c));
}
inline __m512i key_pairs(const std::uint32_t* kp, int j, int c) { return _mm512_load_si512(kp + j * kKeys + c); }
// Dims d..d+15 of key pair j: from the cache's f16 V rows (row 0 = the tile's lane 0), or staged pairs.
template <int D>
__m512i value_pairs(const std::uint16_t* v, int j, int d) {
  return bf16_pairs(f16x16(v + 2 * j * D + d), f16x16(v + (2 * j + 1) * D + d));
}
template <int D>
__m512i value_pairs(const std::uint32_t* vp, int j, int d) { return _mm512_load_si512(vp + j * D + d); }

// BF16 dot products for f16 caches (AVX512-BF16): q, K, the softmax weights and V are rounded to
// BF16 (8 significant bits; the f16 cache holds 11) and vdpbf16ps multiplies pairs of them into f32
// sums, so a score or an output element takes half the instructions of an f32 FMA chain. Scores
// run over head_dim pairs (d, d + 1), P.V over key pairs (k, k + 1) at even lanes of the tile's
// absolute positions, so a row's pairs, and its bits, do not depend on the batch around it. Many
// rows share a tile staged once as pairs in L1 (K: (D/2, 32), V: (16, D)); up to 8 rows (decode)
// convert a whole tile in registers instead, into the same pairs. The softmax weights are summed
// as rounded, so the output is the weighted mean of V under exactly the weights used. An f32 cache
// keeps Lanes16.
struct Bf16Pairs {
  static constexpr bool kPairs = true;
  // P.V takes all the heads of a query (Qwen2.5: 6-8) in one group, so a key pair's values are
  // loaded, or in decode converted from the cache, once per tile rather than once per 4 rows.
  static constexpr int kScoreRows = 12, kPvRows = 8;

  // q as D / 2 pairs: in memory order bf16(q[d]) then bf16(q[d + 1]), which is the pair order.
  template <int D>
  static const std::uint32_t* pack_q(const float* q, std::uint32_t* out) {
    static_assert(D % 32 == 0);
    for (int d = 0; d < D; d += 32)
      _mm512_storeu_si512(out + d / 2, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + d + 16),
                                                                                     _mm512_loadu_ps(q + d))));
    return out;
  }

  // The tile's keys [lo, hi) as pairs: K's lanes outside are zero (their scores are masked), and so
  // are V's, since a pair of keys may straddle the edge and a weight of 0 times a stale value must
  // stay 0. A full tile of one span (lo = 0, hi = 32) comes as its K block `k16` and first V row
  // `v16` in the cache and converts straight from there; any other tile (both null) is staged as
  // f32 by load_tile first (exact, so the same pairs).
  template <int D>
  static void stage(const AttnArgs& a, int kvh, int t, int lo, int hi, const std::uint16_t* k16,
                    const std::uint16_t* v16, Tile& tile, std::uint32_t* kp) {
    if (k16) return stage_whole<D>(k16, v16, kp);
    std::uint32_t* vp = kp + kKeys * D / 2;
    load_tile<D, std::uint16_t>(a, kvh, t, lo, hi, tile);
    for (int j = 0; j < D / 2; ++j)
      for (int c = 0; c < kKeys; c += 16) {
        const std::size_t e = static_cast<std::size_t>(2 * j) * kKeys + c;
        _mm512_store_si512(kp + j * kKeys + c,
                           bf16_pairs(_mm512_load_ps(tile.kt + e), _mm512_load_ps(tile.kt + e + kKeys)));
      }
    for (int j = lo / 2; j < (hi + 1) / 2; ++j) {
      const bool even = 2 * j >= lo, odd = 2 * j + 1 < hi;
      for (int d = 0; d < D; d += 16) {
        const std::size_t e = static_cast<std::size_t>(2 * j) * D + d;
        const __m512 zero = _mm512_setzero_ps();
        _mm512_store_si512(vp + j * D + d, bf16_pairs(even ? _mm512_load_ps(tile.v + e) : zero,
                                                      odd ? _mm512_load_ps(tile.v + e + D) : zero));
      }
    }
  }

  // A whole tile straight from the cache (its K block and first V row) as pairs: what `stage`
  // gives it, and what an f16 cache keeps as its pair tiles (kv.h). kp: 64-byte aligned.
  template <int D>
  static void stage_whole(const std::uint16_t* k16, const std::uint16_t* v16, std::uint32_t* kp) {
    std::uint32_t* vp = kp + kKeys * D / 2;
    for (int j = 0; j < D / 2; ++j)
      for (int c = 0; c < kKeys; c += 16) _mm512_store_si512(kp + j * kKeys + c, key_pairs(k16, j, c));
    for (int j = 0; j < kKeys / 2; ++j)
      for (int d = 0; d < D; d += 16) _mm512_store_si512(vp + j * D + d, value_pairs<D>(v16, j, d));
  }

  // tile_scores over head_dim pairs: per pair two key vectors and NR broadcast q pairs feed 2 NR
  // dot products. Each score is one chain over the pairs in order, whatever NR.
  // `ahead` (Ahead::scores): 64 D bytes, two lines per pair j.
  template <int D, int NR, typename E>
  static void scores(const E* kt, const RowState* rs, float* sc, const char* ahead) {
    __m512 acc[NR][2];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int j = 0; j < D / 2; ++j) {
      if (ahead) {
        _mm_prefetch(ahead + 128 * j, _MM_HINT_T0);
        _mm_prefetch(ahead + 128 * j + 64, _MM_HINT_T0);
      }
      const __m512i k0 = key_pairs(kt, j, 0), k1 = key_pairs(kt, j, 16);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(rs[r].qp[j]));
        acc[r][0] = dot_pairs(acc[r][0], qb, k0);
        acc[r][1] = dot_pairs(acc[r][1], qb, k1);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      _mm512_storeu_ps(sc + r * kKeys, acc[r][0]);
      _mm512_storeu_ps(sc + r * kKeys + 16, acc[r][1]);
    }
  }

  // Lanes16's softmax, then the weights rounded to BF16 and left in the row's first 16 words as
  // key pairs (keys in order are already pairs); the row's sum is of the rounded weights.
  static float softmax(float scale, int lo, int rhi, float* sc, RowState& row) {
    __m512 p[2];
    const float m_new = tile_weights16(scale, lo, rhi, sc, row.m, p);
    const __m512i pairs = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p[1], p[0]));
    _mm512_storeu_si512(sc, pairs);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    // row_fold, but with avx512::exp for std::exp: a call into libm made the compiler save every live
    // vector around it, which cost more than the softmax's arithmetic. The sum stays one scalar
    // per tile (not lanes folded at the block's end), so a block resumed at any tile adds the same
    // numbers in the same order as one attended whole.
    const float c = m_new == row.m ? 1.0f
                    : row.m == -std::numeric_limits<float>::infinity() ? 0.0f  // nothing seen before
                                    : _mm512_cvtss_f32(avx512::exp(_mm512_set1_ps(row.m - m_new)));
    row.l = row.l * c + _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
    row.m = m_new;
    return c;
  }

  // tile_pv over key pairs: out_r <- out_r * c_r + the pairs of [lo, rhi) (a pair's key outside has
  // weight 0 and a zero value). kVecs value vectors of 16 output dims serve NR rows: four up to
  // 4 rows, two beyond (at most 16 accumulators of the 32 registers).
  // `ahead` (Ahead::pv, whole tiles only): 64 D bytes, kVecs lines per pair j of each pass over dc.
  template <int D, int NR, typename E>
  static void pv(const E* vt, int lo, int rhi, RowState* const* rows, const float* const* p, const float* c,
                 const char* ahead) {
    constexpr int kWant = NR <= 4 ? 4 : 2, kVecs = D / 16 < kWant ? D / 16 : kWant;
    const std::uint32_t* w[NR];
    for (int r = 0; r < NR; ++r) w[r] = reinterpret_cast<const std::uint32_t*>(p[r]);
    for (int dc = 0; dc < D; dc += kVecs * 16) {
      __m512 o[NR][kVecs];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) {
          if (c[r] == 0.0f) {
            o[r][v] = _mm512_setzero_ps();
            continue;
          }
          o[r][v] = _mm512_loadu_ps(rows[r]->o + dc + 16 * v);
          if (c[r] != 1.0f) o[r][v] = _mm512_mul_ps(o[r][v], _mm512_set1_ps(c[r]));
        }
      for (int j = lo / 2; j < (rhi + 1) / 2; ++j) {
        if (ahead) {
          const char* line = ahead + 64 * kVecs * (dc / (kVecs * 16) * (kKeys / 2) + j);
#pragma GCC unroll 4
          for (int l = 0; l < kVecs; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T0);
        }
        __m512i vv[kVecs];
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) vv[v] = value_pairs<D>(vt, j, dc + 16 * v);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          const __m512i pb = _mm512_set1_epi32(static_cast<int>(w[r][j]));
#pragma GCC unroll 16
          for (int v = 0; v < kVecs; ++v) o[r][v] = dot_pairs(o[r][v], pb, vv[v]);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(rows[r]->o + dc + 16 * v, o[r][v]);
    }
  }
};

}  // namespace
}  // namespace seqshare
