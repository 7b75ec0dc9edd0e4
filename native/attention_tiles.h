// Tiled attention for attention_avx2.cpp and attention_avx512.h (attention_amx.cpp shares its rows
// and tile addressing): 32 keys per tile, converted from f16 once per tile into L1 (K transposed to
// (head_dim, 32) so scores are vectors of FMAs with q broadcast), then for the query rows sharing
// this kv head -- the heads of its group, for each query -- scores six rows at a time, an
// online-softmax update per row, and P.V two rows at a time into the rows' running outputs. K/V are
// read once per (kv head, query block) and no score matrix exists beyond one rows x 32 tile. With
// up to 8 rows per kv head (decode, GQA groups of real models) the tile is read straight from the
// cache instead. The score, softmax and P.V loops take their vector width as a policy (Lanes8 here,
// Lanes16 in attention_avx512.h); staging is 8 lanes wide. A policy with kPairs (Bf16Pairs there)
// brings its own loops and staging over tiles of BF16 pairs; this file keeps the rows, the tile
// walk and the online-softmax bookkeeping for both. Included only by files compiled with at least
// -mavx2 -mfma -mf16c.
#pragma once
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

// The softmax bookkeeping per row (two horizontal reductions, at most one scalar exp) is paid
// once per 32 keys.
constexpr int kKeys = 32;
// Query rows scored together against one key tile, at most: 2 x 6 accumulators and two key vectors
// of AVX2's 16 registers (a policy's kScoreRows; AVX-512 has 32).
// Up to this many query rows per kv head read a tile straight from the cache: decode with the
// GQA groups of real models (Qwen2.5: 6-8 query heads per kv head), in at most two score groups.
constexpr int kDirectRows = 8;
static_assert(kKeys == kAttnTile, "tiles sit at the canonical absolute positions");

struct Tile {
  float* kt;  // (D, kKeys) transposed keys
  float* v;   // (kKeys, D) values
};

inline __m256 load8(const std::uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float load1(const std::uint16_t* p) { return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*p))); }
inline float load1(const float* p) { return *p; }

// The K tile block (head_dim x 32, kv head `kvh`) of a span's cache tile that holds the keys at
// absolute positions [t, t + 32): the cache's tiles sit at those positions (KVSpan::phase).
template <int D, typename E>
const E* k_block(const KVSpan& sp, int kvh, int t) {
  const std::size_t tile = static_cast<std::size_t>(t - sp.pos0 + sp.phase) / kKeys;
  return static_cast<const E*>(sp.k) + kvh * sp.head_stride + tile * (static_cast<std::size_t>(D) * kKeys);
}

// Row `row` of a span's V rows for kv head `kvh` (row 0 is the span's first position).
template <int D, typename E>
const E* v_row(const KVSpan& sp, int kvh, int row) {
  return static_cast<const E*>(sp.v) + sp.head_stride * kvh + static_cast<std::size_t>(row + sp.phase) * D;
}

// The BF16 pairs a span's cache keeps of the tile at absolute position t for kv head kvh (kv.h),
// or null: where the tile is not whole in the span (`whole`), or not kept, or not current.
template <int D>
const std::uint32_t* kept_pairs(const KVSpan& sp, int kvh, int t, bool whole) {
  if (!whole || !sp.pairs) return nullptr;
  const int tile = (t - sp.pos0 + sp.phase) / kKeys;
  return tile < *sp.paired ? sp.pairs + kvh * sp.head_stride + static_cast<std::size_t>(tile) * kKeys * D : nullptr;
}

// Keys/values at absolute positions [t + lo, t + hi) into the tile (lanes lo..hi); the other lanes
// of K are zero (their scores are masked). E is the cache's element type (float16 bits or float).
// K needs no transposing: the cache stores it as the tile wants it. A tile straddling the end of
// a shared prefix takes its first lanes from the prefix's cache and the rest from the sequence's.
template <int D, typename E>
void load_tile(const AttnArgs& a, int kvh, int t, int lo, int hi, Tile& tile) {
  const KeySpans& ks = a.job->keys;
  int row0;
  const KVSpan& first = key_span(ks, t + lo, row0);
  const int split = std::min(hi, first.pos0 + first.len - t);  // lanes [lo, split) from `first`
  const E* kb[2] = {k_block<D, E>(first, kvh, t), nullptr};
  if (split < hi) kb[1] = k_block<D, E>(ks.span[1], kvh, t);
  for (int c = 0; c < kKeys / 8; ++c) {
    const int g0 = std::max(lo, 8 * c), g1 = std::min(hi, 8 * c + 8);
    if (g0 >= g1) {
      for (int d = 0; d < D; ++d) _mm256_store_ps(tile.kt + d * kKeys + 8 * c, _mm256_setzero_ps());
    } else if (g0 == 8 * c && g1 == 8 * c + 8 && (g1 <= split || g0 >= split)) {
      const E* src = kb[g0 >= split ? 1 : 0] + 8 * c;
#pragma GCC unroll 8
      for (int d = 0; d < D; ++d) _mm256_store_ps(tile.kt + d * kKeys + 8 * c, load8(src + d * kKeys));
    } else {  // a group the range or the prefix boundary cuts: lane by lane
      for (int d = 0; d < D; ++d)
        for (int l = 8 * c; l < 8 * c + 8; ++l)
          tile.kt[d * kKeys + l] = l >= g0 && l < g1 ? load1(kb[l >= split ? 1 : 0] + d * kKeys + l) : 0.0f;
    }
  }
  for (int l = lo; l < hi;) {  // V: runs of consecutive rows, one run per span
    int row;
    const KVSpan& sp = key_span(ks, t + l, row);
    const int end = std::min(hi, sp.pos0 + sp.len - t);
    const E* v = v_row<D, E>(sp, kvh, row);
    for (; l < end; ++l, v += D)
#pragma GCC unroll 16
      for (int d0 = 0; d0 < D; d0 += 8) _mm256_store_ps(tile.v + l * D + d0, load8(v + d0));
  }
}

struct RowState {
  const float* q;
  float* o;    // the state's running output (D), updated in place
  float m, l;  // copied in and out of the state around the block
  int limit;   // positions before `limit` are visible to this row
  const std::uint32_t* qp;  // q as BF16 pairs (D / 2 words), for a policy with kPairs only
};

// Scores of NR rows against the tile's 32 keys, two vectors of keys at a time: per head_dim element
// two key vectors and NR broadcasts feed 2 NR FMAs, so with NR = 6 the loads no longer outnumber the
// FMAs. Each score is one FMA chain over head_dim in order, whatever NR or V: never a different bit.
template <class V, int D, int NR, typename E>
void tile_scores(const E* kt, const RowState* rs, float* sc, const char* ahead = nullptr) {
  using F = typename V::F;
  constexpr int kLinesPerDim = static_cast<int>(sizeof(E)) / 2;  // of a 32-row tile (Ahead)
  for (int half = 0; half < kKeys; half += 2 * V::kLanes) {
    F acc[NR][2];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = V::zero();
    for (int d = 0; d < D; ++d) {
      if (ahead && half == 0)
        for (int l = 0; l < kLinesPerDim; ++l) _mm_prefetch(ahead + 64 * (kLinesPerDim * d + l), _MM_HINT_T0);
      const F k0 = V::load(kt + d * kKeys + half), k1 = V::load(kt + d * kKeys + half + V::kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const F qb = V::bcast(rs[r].q + d);
        acc[r][0] = V::fmadd(qb, k0, acc[r][0]);
        acc[r][1] = V::fmadd(qb, k1, acc[r][1]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      V::store(sc + r * kKeys + half, acc[r][0]);
      V::store(sc + r * kKeys + half + V::kLanes, acc[r][1]);
    }
  }
}

// The row's running maximum and sum after a tile whose maximum (with the row's) is m_new and whose
// weights sum to tile_sum; returns the factor the running output must be scaled by (exactly 1 when
// the maximum did not move, so the caller can skip the rescale).
inline float row_fold(RowState& row, float m_new, float tile_sum) {
  // Once the running maximum settles most tiles leave it unchanged: the factor is then 1.
  const float c = m_new == row.m ? 1.0f : std::exp(row.m - m_new);  // 0 when nothing was seen before
  row.l = row.l * c + tile_sum;
  row.m = m_new;
  return c;
}

// Online softmax of one row over key lanes [lo, rhi) of its scores `sc`, turned into weights in
// place; returns row_fold's factor. The sum of the weights is ordered by 8-lane vector (((p0 + p1)
// + p2) + p3, then avx2::hsum): a wider policy's softmax keeps that order and so these bits.
inline float row_softmax(float scale, int lo, int rhi, float* sc, RowState& row) {
  constexpr int KV = kKeys / 8;
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  // A tile every lane of which this row sees (all but the diagonal and the block edges) skips the
  // masks; the arithmetic is the same, so the result is bit for bit the masked one.
  const bool full = lo == 0 && rhi == kKeys;
  const __m256 lov = _mm256_set1_ps(static_cast<float>(lo)), hiv = _mm256_set1_ps(static_cast<float>(rhi));
  __m256 mask[KV], x[KV];
  __m256 mx = ninf;
#pragma GCC unroll 16
  for (int c = 0; c < KV; ++c) {
    x[c] = _mm256_mul_ps(_mm256_load_ps(sc + 8 * c), _mm256_set1_ps(scale));
    if (!full) {
      const __m256 idx = _mm256_add_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(8.0f * c));
      mask[c] = _mm256_and_ps(_mm256_cmp_ps(idx, lov, _CMP_GE_OQ), _mm256_cmp_ps(idx, hiv, _CMP_LT_OQ));
      x[c] = _mm256_blendv_ps(ninf, x[c], mask[c]);
    }
    mx = _mm256_max_ps(mx, x[c]);
  }
  const float m_new = std::max(row.m, avx2::hmax(mx));
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 sum = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int c = 0; c < KV; ++c) {
    __m256 pc = avx2::exp(_mm256_sub_ps(x[c], mv));
    if (!full) pc = _mm256_and_ps(pc, mask[c]);
    _mm256_store_ps(sc + 8 * c, pc);
    sum = _mm256_add_ps(sum, pc);
  }
  return row_fold(row, m_new, avx2::hsum(sum));
}

// The vector width of the score and P.V loops, whose lanes never meet (a score is one FMA chain
// over head_dim, an output element one over the keys), so any width gives the same bits, and the
// policy's softmax: row_softmax, or a wider one with its bits.
struct Lanes8 {
  using F = __m256;
  static constexpr bool kPairs = false;  // f32 products (a pair policy: attention_avx512.h's Bf16Pairs)
  static constexpr int kLanes = 8, kScoreRows = 6, kPvRows = 2;
  static F load(const std::uint16_t* p) { return load8(p); }
  static F load(const float* p) { return load8(p); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F zero() { return _mm256_setzero_ps(); }
  static F scale(F x, float c) { return _mm256_mul_ps(x, _mm256_set1_ps(c)); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static float softmax(float scale, int lo, int rhi, float* sc, RowState& row) {
    return row_softmax(scale, lo, rhi, sc, row);
  }
};

// out_r <- out_r * c_r + sum over keys [lo, rhi) of p_r[k] V[k] for NR rows (out_r read only when
// c_r is not 0: a new state's is not yet written), kVecs vectors of
// output dims at a time: four value vectors serve NR rows, so NR = 2 keeps the FMAs ahead of the
// loads (NR = 4 where AVX-512's 32 registers hold 16 accumulators). Per output element the
// arithmetic is the same for any NR or V.
template <class V, int D, int NR, typename E>
void tile_pv(const E* vlo, int lo, int rhi, RowState* const* rows, const float* const* p, const float* c,
             const char* ahead = nullptr) {
  using F = typename V::F;
  constexpr int kVecs = D / V::kLanes < 4 ? D / V::kLanes : 4;
  // Ahead's lines per key of each pass over dc: all of them over a whole tile's passes.
  constexpr int kLinesPerKey = static_cast<int>(sizeof(E)) * kVecs * V::kLanes / 64;
  for (int dc = 0; dc < D; dc += kVecs * V::kLanes) {
    F o[NR][kVecs];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) {
        if (c[r] == 0.0f) {  // the row's first keys (or an old maximum far below): out of nothing
          o[r][v] = V::zero();
          continue;
        }
        o[r][v] = V::load(rows[r]->o + dc + V::kLanes * v);
        if (c[r] != 1.0f) o[r][v] = V::scale(o[r][v], c[r]);
      }
    for (int k = lo; k < rhi; ++k) {
      if (ahead) {
        const char* line = ahead + 64 * kLinesPerKey * (dc / (kVecs * V::kLanes) * kKeys + k);
        for (int l = 0; l < kLinesPerKey; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T0);
      }
      const E* vr = vlo + (k - lo) * D + dc;
      F vv[kVecs];
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) vv[v] = V::load(vr + V::kLanes * v);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const F pb = V::bcast(p[r] + k);
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) o[r][v] = V::fmadd(pb, vv[v], o[r][v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) V::store(rows[r]->o + dc + V::kLanes * v, o[r][v]);
  }
}

// What a tile read straight from the cache asks memory for while it works, so that decode's loads
// overlap its arithmetic: the next tile's (the next kv head's, or the next 32 keys') K block
// during the scores and its V rows during P.V, a few lines per iteration of each loop. Without it
// a decode row read a long cache at 13-18 GB/s from memory against 33-37 GB/s from the caches
// (BENCHMARKS.md): each tile's loads waited on memory, phase after phase. Asking two tiles ahead,
// or for this tile's V during its scores, measured no better. Every score group and P.V run of
// the tile asks (AVX2's P.V takes a GQA group's rows in runs of two): the repeats hit L1, and
// asking from the first run alone was slower at AVX2.
struct Ahead {
  const char* scores = nullptr;
  const char* pv = nullptr;
};

// A policy with kPairs brings its own score and P.V loops, over the f16 cache itself (E =
// std::uint16_t, whole tiles only) or over a tile staged as BF16 pairs (E = std::uint32_t).
template <class V, int D, int NR, typename E>
void group_scores(const E* kt, const RowState* rs, float* sc, const Ahead& ah) {
  if constexpr (V::kPairs) V::template scores<D, NR, E>(kt, rs, sc, ah.scores);
  else tile_scores<V, D, NR>(kt, rs, sc, ah.scores);
}
template <class V, int D, int NR, typename E>
void group_pv(const E* vlo, int lo, int rhi, RowState* const* rows, const float* const* p, const float* c,
              const Ahead& ah) {
  if constexpr (V::kPairs) V::template pv<D, NR, E>(vlo, lo, rhi, rows, p, c, ah.pv);
  else tile_pv<V, D, NR>(vlo, lo, rhi, rows, p, c, ah.pv);
}

// One tile (absolute positions [t, t + kKeys), key lanes [lo, hi) present) for the rows [r0, r1)
// of one kv head: scores of all of them, then per row the online softmax, then P.V by runs of
// rows that see the same keys. K is a (D, kKeys) block, `vlo` the value row of lane lo (then one
// row per lane), either in the cache's own type or staged as f32. `sc` holds (r1 - r0) x kKeys
// floats.
template <class V, int D, typename E>
void tile_rows(const AttnArgs& a, const E* kt, const E* vlo, int t, int lo, int hi, RowState* rs, int r0, int r1,
               float* sc, const Ahead& ah = {}) {
  // Score groups as even as the register budget allows (7 rows: 4 + 3, not 6 + 1): each group
  // reads the key tile once, and a group of one would read it for a single row.
  constexpr int kScoreRows = V::kScoreRows;
  const int groups = (r1 - r0 + kScoreRows - 1) / kScoreRows;
  for (int gi = 0, r = r0; gi < groups; ++gi) {
    const int left = groups - gi, size = (r1 - r + left - 1) / left;  // rows left, split evenly
    float* out = sc + (r - r0) * kKeys;
    switch (size) {
      case 12: if constexpr (kScoreRows >= 12) group_scores<V, D, 12>(kt, rs + r, out, ah); break;
      case 11: if constexpr (kScoreRows >= 11) group_scores<V, D, 11>(kt, rs + r, out, ah); break;
      case 10: if constexpr (kScoreRows >= 10) group_scores<V, D, 10>(kt, rs + r, out, ah); break;
      case 9: if constexpr (kScoreRows >= 9) group_scores<V, D, 9>(kt, rs + r, out, ah); break;
      case 8: if constexpr (kScoreRows >= 8) group_scores<V, D, 8>(kt, rs + r, out, ah); break;
      case 7: if constexpr (kScoreRows >= 7) group_scores<V, D, 7>(kt, rs + r, out, ah); break;
      case 6: group_scores<V, D, 6>(kt, rs + r, out, ah); break;
      case 5: group_scores<V, D, 5>(kt, rs + r, out, ah); break;
      case 4: group_scores<V, D, 4>(kt, rs + r, out, ah); break;
      case 3: group_scores<V, D, 3>(kt, rs + r, out, ah); break;
      case 2: group_scores<V, D, 2>(kt, rs + r, out, ah); break;
      default: group_scores<V, D, 1>(kt, rs + r, out, ah); break;
    }
    r += size;
  }
  // Then by runs of rows that see the same keys (the heads of one query), V::kPvRows at a time:
  // each row's softmax, and P.V for the run.
  constexpr int kPvRows = V::kPvRows;
  const auto seen = [&](int r) { return std::min(hi, rs[r].limit - t); };  // key lanes before it
  for (int r = r0; r < r1;) {
    const int rhi = seen(r);
    int e = r + 1;
    while (e < r1 && e - r < kPvRows && seen(e) == rhi) ++e;
    if (rhi > lo) {
      RowState* rows[kPvRows];
      float* p[kPvRows];
      float c[kPvRows];
      for (int i = 0; i < e - r; ++i) {
        rows[i] = &rs[r + i], p[i] = sc + (r + i - r0) * kKeys;
        c[i] = V::softmax(a.scale, lo, rhi, p[i], rs[r + i]);
      }
      switch (e - r) {
        case 8: if constexpr (kPvRows >= 8) group_pv<V, D, 8>(vlo, lo, rhi, rows, p, c, ah); break;
        case 7: if constexpr (kPvRows >= 7) group_pv<V, D, 7>(vlo, lo, rhi, rows, p, c, ah); break;
        case 6: if constexpr (kPvRows >= 6) group_pv<V, D, 6>(vlo, lo, rhi, rows, p, c, ah); break;
        case 5: if constexpr (kPvRows >= 5) group_pv<V, D, 5>(vlo, lo, rhi, rows, p, c, ah); break;
        case 4: if constexpr (kPvRows >= 4) group_pv<V, D, 4>(vlo, lo, rhi, rows, p, c, ah); break;
        case 3: if constexpr (kPvRows >= 3) group_pv<V, D, 3>(vlo, lo, rhi, rows, p, c, ah); break;
        case 2: group_pv<V, D, 2>(vlo, lo, rhi, rows, p, c, ah); break;
        default: group_pv<V, D, 1>(vlo, lo, rhi, rows, p, c, ah); break;
      }
    }
    r = e;
  }
}

// The rows of queries [n0, n1) over block b (all heads, kv head by kv head: (kvh, query, head in
// group)) into rs, each with its state resumed or new, and with a pair policy q as BF16 pairs in
// `qpairs` (room for 16 rows more: attention_amx.cpp's tiles load whole 16-row blocks, and what the
// rows past the last hold only reaches outputs nobody reads). Returns the last visible position of
// any row, plus one.
template <class V, int D>
int unit_rows(const AttnArgs& a, int n0, int n1, int b, const BlockKeys& bk, std::vector<RowState>& rs,
              std::vector<std::uint32_t>& qpairs) {
  const AttnJob& job = *a.job;
  const int hpg = a.n_heads / a.n_kv_heads, per_kvh = (n1 - n0) * hpg, nrows = per_kvh * a.n_kv_heads;
  rs.resize(static_cast<std::size_t>(nrows));
  if constexpr (V::kPairs) qpairs.resize(static_cast<std::size_t>(nrows + 16) * D / 2);
  int end = bk.lo;
  for (int i = 0; i < nrows; ++i) {
    const int kvh = i / per_kvh, n = n0 + (i % per_kvh) / hpg, h = kvh * hpg + i % hpg;
    float* st = a.st.at(state_row(job, n), h, b);
    // A new state's output is not zeroed here: its first tile's factor is 0 and tile_pv starts it
    // from zero, and a state that sees no key keeps l = 0, which the fold skips. Zeroing every
    // state first stalled on the stores (the states of a long prefill fill tens of MB).
    const float m = bk.resume ? st[D] : -std::numeric_limits<float>::infinity(), l = bk.resume ? st[D + 1] : 0.0f;
    const int limit = std::min(bk.hi, job.q_pos[n] + 1);
    rs[i] = RowState{job.q + (static_cast<std::size_t>(n) * a.n_heads + h) * D, st, m, l, limit, nullptr};
    if constexpr (V::kPairs) rs[i].qp = V::template pack_q<D>(rs[i].q, qpairs.data() + static_cast<std::size_t>(i) * D / 2);
    end = std::max(end, limit);
  }
  return end;
}

// Each row's running maximum and sum after its output, where the fold reads them.
template <int D>
void save_rows(const std::vector<RowState>& rs) {
  for (const RowState& r : rs) {
    r.o[D] = r.m;
    r.o[D + 1] = r.l;
  }
}

// All heads of queries [n0, n1) over block b, tile by tile; inside a tile, kv head by kv head, so
// each tile's rows are read whole (all kv heads) while they are in cache.
template <class V, int D, typename E>
void attend(const AttnArgs& a, int n0, int n1, int b) {
  const AttnJob& job = *a.job;
  const int hpg = a.n_heads / a.n_kv_heads, per_kvh = (n1 - n0) * hpg;
  const BlockKeys bk = block_keys(job, b);
  thread_local std::vector<float> buf;
  thread_local std::vector<RowState> rs;
  thread_local std::vector<std::uint32_t> qpairs;
  constexpr std::size_t kPairTile = V::kPairs ? kKeys * D : 0;  // a BF16 pair tile: K and V, kKeys * D / 2 words each
  buf.resize(2 * kKeys * D + kPairTile + static_cast<std::size_t>(per_kvh) * kKeys + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 63) & ~std::uintptr_t(63));
  Tile tile{base, base + kKeys * D};
  std::uint32_t* pairs = reinterpret_cast<std::uint32_t*>(base + 2 * kKeys * D);
  float* sc = base + 2 * kKeys * D + kPairTile;  // scores, then weights, of one kv head's rows
  const KeySpans& ks = job.keys;
  const int end = unit_rows<V, D>(a, n0, n1, b, bk, rs, qpairs);  // the last visible position of any row, plus one
  for (int t = bk.lo - bk.lo % kKeys; t < end; t += kKeys) {  // tiles at absolute multiples of kKeys
    const int lo = std::max(0, bk.lo - t), hi = std::min(kKeys, end - t);
    for (int kvh = 0; kvh < a.n_kv_heads; ++kvh) {
      const int r0 = kvh * per_kvh, r1 = r0 + per_kvh;
      int row0;
      const KVSpan& sp = key_span(ks, t + lo, row0);
      const bool one_span = sp.pos0 + sp.len >= t + hi, whole = one_span && lo == 0 && hi == kKeys;
      // The tile's K block and lane lo's V row in the cache, where one span holds its keys.
      const E* k = k_block<D, E>(sp, kvh, t);
      const E* v = v_row<D, E>(sp, kvh, row0);
      // The tile read after this one, and whether it is whole and in this span: decode asks for it ahead.
      const int next_t = kvh + 1 < a.n_kv_heads ? t : t + kKeys, next_kvh = kvh + 1 < a.n_kv_heads ? kvh + 1 : 0;
      const bool ask_ahead = per_kvh <= kDirectRows && next_t + kKeys <= std::min(end, sp.pos0 + sp.len);
      Ahead ah;
      if constexpr (V::kPairs) {  // a tile the cache keeps as pairs is read there: staging's bits
        if (const std::uint32_t* kp = kept_pairs<D>(sp, kvh, t, whole)) {
          if (const std::uint32_t* next = ask_ahead ? kept_pairs<D>(sp, next_kvh, next_t, true) : nullptr) {
            ah.scores = reinterpret_cast<const char*>(next);
            ah.pv = reinterpret_cast<const char*>(next + kKeys * D / 2);
          }
          tile_rows<V, D, std::uint32_t>(a, kp, kp + kKeys * D / 2, t, lo, hi, rs.data(), r0, r1, sc, ah);
          continue;
        }
      }
      // A pair policy reads pairs of V rows, so it goes direct only where every row is present.
      if (per_kvh <= kDirectRows && (V::kPairs ? whole : one_span)) {
        // Few rows per key (decode): converting in registers beats staging the tile. Same
        // arithmetic either way, so a row's result does not depend on which path ran.
        if (ask_ahead) {
          ah.scores = reinterpret_cast<const char*>(k_block<D, E>(sp, next_kvh, next_t));
          ah.pv = reinterpret_cast<const char*>(v_row<D, E>(sp, next_kvh, next_t - sp.pos0));
        }
        tile_rows<V, D, E>(a, k, v, t, lo, hi, rs.data(), r0, r1, sc, ah);
      } else if constexpr (V::kPairs) {
        V::template stage<D>(a, kvh, t, lo, hi, whole ? k : nullptr, whole ? v : nullptr, tile, pairs);
        tile_rows<V, D, std::uint32_t>(a, pairs, pairs + kKeys * D / 2, t, lo, hi, rs.data(), r0, r1, sc);
      } else {
        load_tile<D, E>(a, kvh, t, lo, hi, tile);
        tile_rows<V, D, float>(a, tile.kt, tile.v + lo * D, t, lo, hi, rs.data(), r0, r1, sc);
      }
    }
  }
  save_rows<D>(rs);
}

template <class V, typename E>
void attend_dim(const AttnArgs& a, int n0, int n1, int b) {
  switch (a.head_dim) {
    case 64: return attend<V, 64, E>(a, n0, n1, b);
    case 128: return attend<V, 128, E>(a, n0, n1, b);
    case 32: return attend<V, 32, E>(a, n0, n1, b);
    default: return attention_ref(a, n0, n1, b);  // other head sizes: the reference
  }
}

}  // namespace

// The tiled attention at vector width V (Lanes8, or attention_avx512.h's Lanes16): f16 or f32 caches.
template <class V>
void attention_tiles(const AttnArgs& a, int n0, int n1, int b) {
  const KeySpans& ks = a.job->keys;
  if (ks.n == 2 && ks.span[0].f16 != ks.span[1].f16) return attention_ref(a, n0, n1, b);  // never in a model
  if (ks.span[0].f16) return attend_dim<V, std::uint16_t>(a, n0, n1, b);
  attend_dim<V, float>(a, n0, n1, b);
}

}  // namespace seqshare
