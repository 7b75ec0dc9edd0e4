// Scalar reference attention (the spec): one key at a time, in position order, an online-softmax
// update of each (query, head) state, so no score matrix exists even here. Each update is done in
// double and its result stored as float, so a state resumed from memory continues exactly as one
// that was never stored. Also the exact merge of two partial results.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "half.h"
#include "kernels.h"

namespace seqshare {

static inline float kv_at(const void* base, bool f16, std::size_t i) {
  return f16 ? f16_to_f32(static_cast<const std::uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

void attention_ref(const AttnArgs& a, int n0, int n1, int b) {
  const AttnJob& job = *a.job;
  const int D = a.head_dim, hpg = a.n_heads / a.n_kv_heads;
  const BlockKeys bk = block_keys(job, b);
  for (int n = n0; n < n1; ++n) {
    const int limit = std::min(bk.hi, job.q_pos[n] + 1);  // causal: positions [lo, limit)
    for (int h = 0; h < a.n_heads; ++h) {
      const int kvh = h / hpg;
      const float* q = job.q + (static_cast<std::size_t>(n) * a.n_heads + h) * D;
      float* s = a.st.at(state_row(job, n), h, b);
      float& m = s[D];
      float& l = s[D + 1];
      if (!bk.resume) {
        std::fill(s, s + D, 0.0f);
        m = -std::numeric_limits<float>::infinity();
        l = 0.0f;
      }
      for (int p = bk.lo; p < limit; ++p) {
        int row;
        const KVSpan& sp = key_span(job.keys, p, row);
        const std::size_t slot = static_cast<std::size_t>(row + sp.phase);
        const std::size_t kbase = kvh * sp.head_stride + (slot / kAttnTile) * (static_cast<std::size_t>(D) * kAttnTile) +
                                  slot % kAttnTile;  // + i * kAttnTile: K tiles are transposed
        const std::size_t base = kvh * sp.head_stride + slot * D;
        double sc = 0.0;
        for (int i = 0; i < D; ++i) sc += static_cast<double>(q[i]) * kv_at(sp.k, sp.f16, kbase + i * kAttnTile);
        sc *= a.scale;
        const double m_new = std::max(static_cast<double>(m), sc);
        const double c = std::exp(static_cast<double>(m) - m_new);  // 0 while nothing was seen
        const double pk = std::exp(sc - m_new);
        for (int i = 0; i < D; ++i) s[i] = static_cast<float>(s[i] * c + pk * kv_at(sp.v, sp.f16, base + i));
        l = static_cast<float>(l * c + pk);
        m = static_cast<float>(m_new);
      }
    }
  }
}

void attention_merge(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int N, int n_heads,
                     int head_dim) {
  for (std::size_t i = 0; i < static_cast<std::size_t>(N) * n_heads; ++i) {
    const float la = lse_a[i], lb = lse_b[i];
    if (lb == -std::numeric_limits<float>::infinity()) continue;
    float* oa = out_a + i * head_dim;
    const float* ob = out_b + i * head_dim;
    if (la == -std::numeric_limits<float>::infinity()) {
      for (int d = 0; d < head_dim; ++d) oa[d] = ob[d];
      lse_a[i] = lb;
      continue;
    }
    const float mx = std::fmax(la, lb);
    const float wa = std::exp(la - mx), wb = std::exp(lb - mx);
    const float inv = 1.0f / (wa + wb);
    for (int d = 0; d < head_dim; ++d) oa[d] = (oa[d] * wa + ob[d] * wb) * inv;
    lse_a[i] = mx + std::log(wa + wb);
  }
}

}  // namespace seqshare
