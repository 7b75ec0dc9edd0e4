// The amx level's attention over an f16 cache: the tiles of a work unit's key block (32 keys at
// canonical positions, as attention_tiles.h walks them) as BF16 pairs (the ones the cache keeps,
// kv.h, or staged by Bf16Pairs::stage, the avx512 level's, where a tile is partial), their scores
// and P.V multiplied on the AMX-BF16 tiles, 16 query rows at a time.
// The softmax runs on 16 rows at once in f32 (the weights rounded to BF16 and summed as rounded),
// and each 64 output dims of 16 rows stay in four C tiles over the whole block: a tile's P.V is
// added there, and only rows whose maximum moved are rescaled, through memory.
//
// Why every row takes the tiles, decode included: tdpbf16ps adds a row's pair products in an order
// of its own (a probe found 59-67% of its sums differ from any chain of vdpbf16ps), so a row scored
// on the tiles in a prefill and by vector loops in a decode would get other bits, and batch
// invariance would break. On the tiles each output row depends on its own query row, its weights
// and the keys only: the same bits whatever the rows around it, the batch, or a block's size.
//
// Why not the f32 lanes the level ran before (AVX2's bits): those spend an FMA chain of head_dim
// per score and one of the keys per output element; here the products cost a few tile
// instructions. An f32 cache keeps them (Lanes16).
#include "amx.h"
#include "attention_avx512.h"

namespace seqshare {
namespace {

constexpr int kBlockRows = 16;  // query rows per tile instruction (an A / C tile's rows)
constexpr int kLine = 64;       // bytes of a tile row: 16 BF16 pairs or 16 floats

// Every tile 16 rows of 64 bytes: 0-1 the scores (keys 0-15, 16-31), 0-1 and 5-6 the outputs, 2 the
// queries or the weights, 3-4 the keys, 3-4 and 7 the values.
void configure_attention_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = kLine, c.rows[t] = kBlockRows;
  load_tile_config(c);
}

// e^x to about 4e-5 relative (x <= 0; below -87, e^-87), for weights that are then rounded to
// BF16 (2^-9): a degree-4 polynomial and vscalefps, 10 instructions against avx512::exp's 17.
inline __m512 exp_for_bf16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 24), r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lane i = op over the 16 lanes of v[i], for 16 vectors at once: a tree of interleaving shuffles
// (45 instructions, against 16 horizontal reductions of about 8 dependent ones each). Each lane's
// order of operations is fixed by the tree, whatever the other vectors hold.
template <class Op>
inline __m512 reduce16(const __m512 (&v)[16], Op op) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: rows 2k, 2k + 1, 2k, 2k + 1
    t[k] = op(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: rows 4k .. 4k + 3
    const __m512d a = _mm512_castps_pd(t[2 * k]), b = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w0 = op(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 w1 = op(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return op(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xdd));  // 128-bit lane k: u[k]
}

struct AmxPairs : Bf16Pairs {
  // Bf16Pairs::stage, then the V pairs it leaves (outside the tile's keys [lo, hi)) zeroed: a B
  // tile reads all 16 pairs, and a weight of 0 times a previous tile's value must stay 0.
  template <int D>
  static void stage(const AttnArgs& a, int kvh, int t, int lo, int hi, const std::uint16_t* k16,
                    const std::uint16_t* v16, Tile& tile, std::uint32_t* kp) {
    Bf16Pairs::stage<D>(a, kvh, t, lo, hi, k16, v16, tile, kp);
    std::uint32_t* vp = kp + kKeys * D / 2;
    for (int j = 0; j < kKeys / 2; ++j)
      if (j < lo / 2 || j >= (hi + 1) / 2)
        for (int d = 0; d < D; d += 16) _mm512_store_si512(vp + j * D + d, _mm512_setzero_si512());
  }

  // The online softmax of n <= 16 rows (rs[0..n)) over key lanes [lo, min(hi, limit - t)) of
  // their scores (sb, 16 x 32 floats), all rows' maxima, factors and sums as vectors: each row's
  // weights rounded to BF16 and left as 16 key pairs at the start of its scores (zeros where it
  // sees no key), its running maximum and sum (of the rounded weights) updated, c[i] the factor
  // its output is to be scaled by before this tile's P.V. Returns the rows whose output must be
  // scaled (bit i): those whose maximum moved from a finite one. A row that saw nothing before
  // has an output of zeros, and one whose maximum stayed has the factor 1.
  static unsigned block_softmax(float scale, int t, int lo, int hi, RowState* rs, int n, float* sb, float* c) {
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 sv = _mm512_set1_ps(scale);
    alignas(64) float m_old[kBlockRows], l_old[kBlockRows], m_new[kBlockRows];
    __mmask16 mask[kBlockRows][2];
    for (int i = 0; i < kBlockRows; ++i) {
      const int rhi = i < n ? std::min(hi, rs[i].limit - t) : lo;  // key lanes before the row's limit
      const std::uint64_t seen = rhi > lo ? ((std::uint64_t{1} << rhi) - 1) & ~((std::uint64_t{1} << lo) - 1) : 0;
      mask[i][0] = static_cast<__mmask16>(seen), mask[i][1] = static_cast<__mmask16>(seen >> 16);
      m_old[i] = i < n ? rs[i].m : -std::numeric_limits<float>::infinity();
      l_old[i] = i < n ? rs[i].l : 0.0f;
    }
    // Rows past n (decode has 1-8 per kv head) are skipped: their weights are never read.
    __m512 v[kBlockRows];
    for (int i = 0; i < kBlockRows; ++i) {  // each row's maximum over its lanes, two halves
      if (i >= n) {
        v[i] = ninf;
        continue;
      }
      const __m512 x0 = _mm512_mask_mul_ps(ninf, mask[i][0], _mm512_load_ps(sb + i * kKeys), sv);
      const __m512 x1 = _mm512_mask_mul_ps(ninf, mask[i][1], _mm512_load_ps(sb + i * kKeys + 16), sv);
      v[i] = _mm512_max_ps(x0, x1);
    }
    const __m512 mo = _mm512_load_ps(m_old);
    const __m512 mn = _mm512_max_ps(mo, reduce16(v, [](__m512 x, __m512 y) { return _mm512_max_ps(x, y); }));
    _mm512_store_ps(m_new, mn);
    for (int i = 0; i < kBlockRows; ++i) {  // the weights, rounded, and their sum per row
      if (i >= n) {
        v[i] = _mm512_setzero_ps();
        continue;
      }
      const __m512 m = _mm512_set1_ps(m_new[i]);
      const __m512 x0 = _mm512_mul_ps(_mm512_load_ps(sb + i * kKeys), sv);
      const __m512 x1 = _mm512_mul_ps(_mm512_load_ps(sb + i * kKeys + 16), sv);
      const __m512 p0 = _mm512_maskz_mov_ps(mask[i][0], exp_for_bf16(_mm512_sub_ps(x0, m)));
      const __m512 p1 = _mm512_maskz_mov_ps(mask[i][1], exp_for_bf16(_mm512_sub_ps(x1, m)));
      const __m512i pairs = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0));
      _mm512_store_si512(sb + i * kKeys, pairs);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
      v[i] = _mm512_add_ps(even, odd);
    }
    const __m512 sum = reduce16(v, [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); });
    // The factor: exp(m_old - m_new), exactly 1 where the maximum stayed, 0 where it was -inf.
    const __mmask16 stayed = _mm512_cmp_ps_mask(mo, mn, _CMP_EQ_OQ), fresh = _mm512_cmp_ps_mask(mo, ninf, _CMP_EQ_OQ);
    __m512 cf = _mm512_mask_blend_ps(stayed, exp_for_bf16(_mm512_sub_ps(mo, mn)), _mm512_set1_ps(1.0f));
    cf = _mm512_mask_blend_ps(fresh, cf, _mm512_setzero_ps());
    _mm512_store_ps(c, cf);
    alignas(64) float l_new[kBlockRows];
    _mm512_store_ps(l_new, _mm512_fmadd_ps(_mm512_load_ps(l_old), cf, sum));
    for (int i = 0; i < n; ++i) rs[i].m = m_new[i], rs[i].l = l_new[i];
    return static_cast<unsigned>(~(stayed | fresh) & 0xffffu) & ((1u << n) - 1);
  }
};

struct TileKeys {
  int t, lo, hi;  // the tile's first position, and its key lanes present
};
constexpr int kMaxTiles = kAttnBlock / kKeys;  // a work unit's keys lie in one block
constexpr int kPairWords = kKeys;              // words of a staged tile per head_dim element (K, V)
constexpr int kOutDims = 64;                   // output dims held in C tiles at a time (four)

// The output dims [g, g + nd) (nd: 64, or 32) of 16 rows as C tiles 0, 1, 5, 6, through `ob`
// (16 x 64 floats): in (to_tiles) or out.
inline void outputs_to_tiles(const float* ob, int nd) {
  _tile_loadd(0, ob, kOutDims * 4);
  _tile_loadd(1, ob + 16, kOutDims * 4);
  if (nd > 32) {
    _tile_loadd(5, ob + 32, kOutDims * 4);
    _tile_loadd(6, ob + 48, kOutDims * 4);
  }
}
inline void outputs_from_tiles(float* ob, int nd) {
  _tile_stored(0, ob, kOutDims * 4);
  _tile_stored(1, ob + 16, kOutDims * 4);
  if (nd > 32) {
    _tile_stored(5, ob + 32, kOutDims * 4);
    _tile_stored(6, ob + 48, kOutDims * 4);
  }
}

// Rows rs[0..n) (n <= 16, of one kv head, q pairs contiguous) over the block's tiles as pairs (tile i
// at pairs[i]: K pairs (D/2, 32), then V pairs (16, D)). First every tile's scores
// and softmax (weights w, 16 x 32 floats per tile; factors c and rows to rescale per tile), then
// per 64 output dims the P.V of every tile added to the outputs in C tiles, in tile order.
template <int D>
void block_rows(const AttnArgs& a, const std::uint32_t* const* pairs, const TileKeys* tk, int ntiles, RowState* rs,
                int n, float* w, float* c) {
  unsigned rescale[kMaxTiles], fresh = 0;
  for (int i = 0; i < n; ++i) fresh |= (rs[i].m == -std::numeric_limits<float>::infinity()) << i;
  for (int i = 0; i < ntiles; ++i) {
    const std::uint32_t* kp = pairs[i];
    float* sb = w + i * kBlockRows * kKeys;
    _tile_zero(0);  // keys 0-15
    _tile_zero(1);  // keys 16-31
#pragma GCC unroll 4
    for (int s = 0; s < D / 32; ++s) {  // 16 head_dim pairs a step
      _tile_loadd(2, rs[0].qp + 16 * s, D * 2);
      _tile_loadd(3, kp + 16 * s * kKeys, kKeys * 4);
      _tile_loadd(4, kp + 16 * s * kKeys + 16, kKeys * 4);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, sb, kKeys * 4);
    _tile_stored(1, sb + 16, kKeys * 4);
    rescale[i] = AmxPairs::block_softmax(a.scale, tk[i].t, tk[i].lo, tk[i].hi, rs, n, sb, c + i * kBlockRows);
  }
  alignas(64) float ob[kBlockRows * kOutDims];
  for (int g = 0; g < D; g += kOutDims) {
    const int nd = D - g < kOutDims ? D - g : kOutDims;
    for (int r = 0; r < kBlockRows; ++r)  // a new row's output starts at zero (it is not stored yet)
      for (int d = 0; d < nd; d += 16)
        _mm512_store_ps(ob + r * kOutDims + d, r < n && !(fresh >> r & 1) ? _mm512_loadu_ps(rs[r].o + g + d)
                                                                           : _mm512_setzero_ps());
    outputs_to_tiles(ob, nd);
    for (int i = 0; i < ntiles; ++i) {
      if (rescale[i]) {
        outputs_from_tiles(ob, nd);
        for (unsigned m = rescale[i]; m; m &= m - 1) {
          const int r = __builtin_ctz(m);
          const __m512 f = _mm512_set1_ps(c[i * kBlockRows + r]);
          for (int d = 0; d < nd; d += 16)
            _mm512_store_ps(ob + r * kOutDims + d, _mm512_mul_ps(_mm512_load_ps(ob + r * kOutDims + d), f));
        }
        outputs_to_tiles(ob, nd);
      }
      const std::uint32_t* vp = pairs[i] + kKeys * D / 2 + g;
      _tile_loadd(2, w + i * kBlockRows * kKeys, kKeys * 4);  // the weights: 16 key pairs per row
      _tile_loadd(3, vp, D * 4);
      _tile_dpbf16ps(0, 2, 3);
      _tile_loadd(4, vp + 16, D * 4);
      _tile_dpbf16ps(1, 2, 4);
      if (nd > 32) {
        _tile_loadd(7, vp + 32, D * 4);
        _tile_dpbf16ps(5, 2, 7);
        _tile_loadd(3, vp + 48, D * 4);
        _tile_dpbf16ps(6, 2, 3);
      }
    }
    outputs_from_tiles(ob, nd);
    for (int r = 0; r < n; ++r)
      for (int d = 0; d < nd; d += 16) _mm512_storeu_ps(rs[r].o + g + d, _mm512_load_ps(ob + r * kOutDims + d));
  }
}

// All heads of queries [n0, n1) over block b: kv head by kv head, the block's tiles as pairs (kept
// by the cache, or staged here), then its rows 16 at a time (block_rows).
template <int D>
void attend_amx(const AttnArgs& a, int n0, int n1, int b) {
  const AttnJob& job = *a.job;
  const int per_kvh = (n1 - n0) * (a.n_heads / a.n_kv_heads);
  const BlockKeys bk = block_keys(job, b);
  thread_local std::vector<RowState> rs;
  thread_local std::vector<std::uint32_t> qpairs;
  thread_local std::vector<float> buf;
  const int end = unit_rows<AmxPairs, D>(a, n0, n1, b, bk, rs, qpairs);
  const int t0 = bk.lo - bk.lo % kKeys, ntiles = end > t0 ? (end - t0 + kKeys - 1) / kKeys : 0;
  // The f32 tile a partial tile is staged through, the pair tiles, the weights and the factors.
  buf.resize(static_cast<std::size_t>(2 * kKeys * D) + static_cast<std::size_t>(ntiles) * kPairWords * D +
             static_cast<std::size_t>(ntiles) * kBlockRows * (kKeys + 1) + 16);
  float* base = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 63) & ~std::uintptr_t(63));
  Tile tile{base, base + kKeys * D};
  auto* pairs = reinterpret_cast<std::uint32_t*>(base + 2 * kKeys * D);
  float* w = base + 2 * kKeys * D + static_cast<std::size_t>(ntiles) * kPairWords * D;
  float* c = w + ntiles * kBlockRows * kKeys;
  TileKeys tk[kMaxTiles];
  const std::uint32_t* tp[kMaxTiles];
  for (int kvh = 0; kvh < a.n_kv_heads; ++kvh) {
    for (int i = 0; i < ntiles; ++i) {
      const int t = t0 + i * kKeys, lo = std::max(0, bk.lo - t), hi = std::min(kKeys, end - t);
      int row0;
      const KVSpan& sp = key_span(job.keys, t + lo, row0);
      const bool whole = sp.pos0 + sp.len >= t + hi && lo == 0 && hi == kKeys;
      tk[i] = TileKeys{t, lo, hi};
      // A whole tile the cache keeps as pairs is read there (ops.cpp converted it before the units).
      if ((tp[i] = kept_pairs<D>(sp, kvh, t, whole))) continue;
      tp[i] = pairs + static_cast<std::size_t>(i) * kPairWords * D;
      AmxPairs::stage<D>(a, kvh, t, lo, hi, whole ? k_block<D, std::uint16_t>(sp, kvh, t) : nullptr,
                         whole ? v_row<D, std::uint16_t>(sp, kvh, row0) : nullptr, tile,
                         pairs + static_cast<std::size_t>(i) * kPairWords * D);
    }
    for (int r = kvh * per_kvh; r < (kvh + 1) * per_kvh; r += kBlockRows)
      block_rows<D>(a, tp, tk, ntiles, rs.data() + r, std::min(kBlockRows, (kvh + 1) * per_kvh - r), w, c);
  }
  save_rows<D>(rs);
}

}  // namespace

void attention_amx(const AttnArgs& a, int n0, int n1, int b) {
  const KeySpans& ks = a.job->keys;
  if (!ks.span[0].f16 || (ks.n == 2 && !ks.span[1].f16)) return attention_tiles<Lanes16>(a, n0, n1, b);
  configure_attention_tiles();
  switch (a.head_dim) {
    case 64: attend_amx<64>(a, n0, n1, b); break;
    case 128: attend_amx<128>(a, n0, n1, b); break;
    case 32: attend_amx<32>(a, n0, n1, b); break;
    default: attention_ref(a, n0, n1, b);  // other head sizes: the reference
  }
  _tile_release();
}

}  // namespace seqshare
