// Tiled attention with Advanced SIMD, the structure of attention_avx2.cpp in 4-lane vectors: per
// tile of 32 keys at an absolute position, K (transposed, (head_dim, 32)) and V staged as f32 in
// L1 once per kv head, then for the query rows of that kv head: scores up to four rows at a time
// (16 keys x 4 rows of FMA accumulators), the online-softmax update per row, and P.V per row.
// Each score is one FMA chain over head_dim and each output element one FMA chain over the keys,
// whatever the number of rows: a row's result does not depend on the batch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "neon.h"

namespace seqshare {

namespace {

constexpr int kKeys = 32;
constexpr int kScoreRows = 4;
static_assert(kKeys == kAttnTile, "tiles sit at the canonical absolute positions");

struct RowState {
  const float* q;
  float* o;    // the state's running output (D), updated in place
  float m, l;  // copied in and out of the state around the block
  int limit;   // positions before `limit` are visible to this row
};

template <typename E>
const E* k_block(const KVSpan& sp, int kvh, int t, int D) {
  const std::size_t tile = static_cast<std::size_t>(t - sp.pos0 + sp.phase) / kKeys;
  return static_cast<const E*>(sp.k) + kvh * sp.head_stride + tile * (static_cast<std::size_t>(D) * kKeys);
}

// Keys/values at absolute positions [t + lo, t + hi) into the staged tile; other key lanes zero.
// K is converted four lanes at a time wherever the four are present and in one span (all but the
// range's edges and the prefix boundary), lane by lane elsewhere.
template <typename E>
void load_tile(const KeySpans& ks, int kvh, int t, int lo, int hi, int D, float* kt, float* v) {
  for (int c = 0; c < kKeys; c += 4) {
    int row;
    const KVSpan* sp = c >= lo && c + 4 <= hi ? &key_span(ks, t + c, row) : nullptr;
    if (sp != nullptr && sp->pos0 + sp->len >= t + c + 4) {
      const E* kb = k_block<E>(*sp, kvh, t, D) + c;
      for (int d = 0; d < D; ++d) vst1q_f32(kt + d * kKeys + c, neon::load4(kb + d * kKeys));
      continue;
    }
    for (int l = c; l < c + 4; ++l) {
      if (l < lo || l >= hi) {
        for (int d = 0; d < D; ++d) kt[d * kKeys + l] = 0.0f;
        continue;
      }
      const E* kb = k_block<E>(key_span(ks, t + l, row), kvh, t, D) + l;
      for (int d = 0; d < D; ++d) kt[d * kKeys + l] = neon::load1(kb + d * kKeys);
    }
  }
  for (int l = lo; l < hi; ++l) {
    int row;
    const KVSpan& sp = key_span(ks, t + l, row);
    const E* vr = static_cast<const E*>(sp.v) + kvh * sp.head_stride + static_cast<std::size_t>(row + sp.phase) * D;
    for (int d = 0; d < D; d += 4) vst1q_f32(v + l * D + d, neon::load4(vr + d));
  }
}

template <int NR>
void tile_scores(const float* kt, int D, const RowState* rs, float* sc) {
  for (int half = 0; half < kKeys; half += 16) {
    float32x4_t acc[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = vdupq_n_f32(0.0f);
    for (int d = 0; d < D; ++d) {
      const float* k = kt + d * kKeys + half;
      const float32x4_t k0 = vld1q_f32(k), k1 = vld1q_f32(k + 4), k2 = vld1q_f32(k + 8), k3 = vld1q_f32(k + 12);
      for (int r = 0; r < NR; ++r) {
        const float qd = rs[r].q[d];
        acc[r][0] = vfmaq_n_f32(acc[r][0], k0, qd);
        acc[r][1] = vfmaq_n_f32(acc[r][1], k1, qd);
        acc[r][2] = vfmaq_n_f32(acc[r][2], k2, qd);
        acc[r][3] = vfmaq_n_f32(acc[r][3], k3, qd);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < 4; ++c) vst1q_f32(sc + r * kKeys + half + 4 * c, acc[r][c]);
  }
}

// Online softmax of one row over key lanes [lo, rhi): scores become weights in place; returns the
// factor the running output is scaled by (exactly 1 when the maximum did not move).
float row_softmax(float scale, int lo, int rhi, float* sc, RowState& row) {
  constexpr int KV = kKeys / 4;
  const float32x4_t ninf = vdupq_n_f32(-std::numeric_limits<float>::infinity());
  const int32x4_t lane = {0, 1, 2, 3};
  uint32x4_t mask[KV];
  float32x4_t x[KV];
  float32x4_t mx = ninf;
  for (int c = 0; c < KV; ++c) {
    const int32x4_t idx = vaddq_s32(lane, vdupq_n_s32(4 * c));
    mask[c] = vandq_u32(vcgeq_s32(idx, vdupq_n_s32(lo)), vcltq_s32(idx, vdupq_n_s32(rhi)));
    x[c] = vbslq_f32(mask[c], vmulq_n_f32(vld1q_f32(sc + 4 * c), scale), ninf);
    mx = vmaxq_f32(mx, x[c]);
  }
  const float m_new = std::max(row.m, vmaxvq_f32(mx));
  float32x4_t sum = vdupq_n_f32(0.0f);
  for (int c = 0; c < KV; ++c) {
    const float32x4_t p = vreinterpretq_f32_u32(
        vandq_u32(vreinterpretq_u32_f32(neon::exp(vsubq_f32(x[c], vdupq_n_f32(m_new)))), mask[c]));
    vst1q_f32(sc + 4 * c, p);
    sum = vaddq_f32(sum, p);
  }
  const float c = m_new == row.m ? 1.0f : std::exp(row.m - m_new);  // 0 when nothing was seen before
  row.l = row.l * c + vaddvq_f32(sum);
  row.m = m_new;
  return c;
}

// out <- out * c + sum over keys [lo, rhi) of p[k] V[k], 16 output dims at a time.
void tile_pv(const float* v, int D, int lo, int rhi, RowState& row, const float* p, float c) {
  for (int dc = 0; dc < D; dc += 16) {
    float32x4_t o[4];
    for (int i = 0; i < 4; ++i) {
      o[i] = vld1q_f32(row.o + dc + 4 * i);
      if (c != 1.0f) o[i] = vmulq_n_f32(o[i], c);
    }
    for (int k = lo; k < rhi; ++k) {
      const float* vr = v + k * D + dc;
      for (int i = 0; i < 4; ++i) o[i] = vfmaq_n_f32(o[i], vld1q_f32(vr + 4 * i), p[k]);
    }
    for (int i = 0; i < 4; ++i) vst1q_f32(row.o + dc + 4 * i, o[i]);
  }
}

template <typename E>
void attend(const AttnArgs& a, int n0, int n1, int b) {
  const AttnJob& job = *a.job;
  const int D = a.head_dim, hpg = a.n_heads / a.n_kv_heads, per_kvh = (n1 - n0) * hpg;
  const int nrows = per_kvh * a.n_kv_heads;
  const BlockKeys bk = block_keys(job, b);
  thread_local std::vector<float> buf;
  thread_local std::vector<RowState> rs;
  buf.resize(2 * static_cast<std::size_t>(kKeys) * D + static_cast<std::size_t>(per_kvh) * kKeys);
  rs.resize(static_cast<std::size_t>(nrows));
  float* kt = buf.data();
  float* v = kt + kKeys * D;
  float* sc = v + kKeys * D;
  int end = bk.lo;
  for (int i = 0; i < nrows; ++i) {  // rows kv head by kv head: (kvh, query, head in group)
    const int kvh = i / per_kvh, n = n0 + (i % per_kvh) / hpg, h = kvh * hpg + i % hpg;
    float* st = a.st.at(state_row(job, n), h, b);
    if (!bk.resume) {
      std::fill(st, st + D, 0.0f);
      st[D] = -std::numeric_limits<float>::infinity();
      st[D + 1] = 0.0f;
    }
    const int limit = std::min(bk.hi, job.q_pos[n] + 1);
    rs[i] = RowState{job.q + (static_cast<std::size_t>(n) * a.n_heads + h) * D, st, st[D], st[D + 1], limit};
    end = std::max(end, limit);
  }
  for (int t = bk.lo - bk.lo % kKeys; t < end; t += kKeys) {
    const int lo = std::max(0, bk.lo - t), hi = std::min(kKeys, end - t);
    for (int kvh = 0; kvh < a.n_kv_heads; ++kvh) {
      load_tile<E>(job.keys, kvh, t, lo, hi, D, kt, v);
      RowState* rows = rs.data() + kvh * per_kvh;
      for (int r = 0; r < per_kvh; r += kScoreRows) {
        switch (std::min(kScoreRows, per_kvh - r)) {
          case 4: tile_scores<4>(kt, D, rows + r, sc + r * kKeys); break;
          case 3: tile_scores<3>(kt, D, rows + r, sc + r * kKeys); break;
          case 2: tile_scores<2>(kt, D, rows + r, sc + r * kKeys); break;
          default: tile_scores<1>(kt, D, rows + r, sc + r * kKeys); break;
        }
      }
      for (int r = 0; r < per_kvh; ++r) {
        const int rhi = std::min(hi, rows[r].limit - t);
        if (rhi <= lo) continue;
        float* p = sc + r * kKeys;
        const float c = row_softmax(a.scale, lo, rhi, p, rows[r]);
        tile_pv(v, D, lo, rhi, rows[r], p, c);
      }
    }
  }
  for (int i = 0; i < nrows; ++i) {
    rs[i].o[D] = rs[i].m;
    rs[i].o[D + 1] = rs[i].l;
  }
}

}  // namespace

void attention_neon(const AttnArgs& a, int n0, int n1, int b) {
  const KeySpans& ks = a.job->keys;
  if (a.head_dim % 16 != 0 || (ks.n == 2 && ks.span[0].f16 != ks.span[1].f16)) return attention_ref(a, n0, n1, b);
  if (ks.span[0].f16) return attend<std::uint16_t>(a, n0, n1, b);
  attend<float>(a, n0, n1, b);
}

}  // namespace seqshare
