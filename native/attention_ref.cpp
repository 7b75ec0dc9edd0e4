// Scalar reference attention (the spec): one query at a time, online softmax over the keys it may
// see, so no score matrix exists even here. Also the exact merge of two partial results.
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

void attention_ref(const AttnArgs& a, int kvh, int n0, int n1, int j0, int j1) {
  const int D = a.head_dim, hpg = a.n_heads / a.n_kv_heads;
  const KVSpan& sp = a.span;
  std::vector<double> acc(static_cast<std::size_t>(D));
  for (int n = n0; n < n1; ++n) {
    const int jmax = std::min(j1, a.q_pos[n] - sp.pos0 + 1);  // causal: rows [j0, jmax)
    for (int h = kvh * hpg; h < (kvh + 1) * hpg; ++h) {
      const float* q = a.q + (static_cast<std::size_t>(n) * a.n_heads + h) * D;
      float* o = a.out + (static_cast<std::size_t>(n) * a.n_heads + h) * D;
      double m = -std::numeric_limits<double>::infinity(), l = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int j = j0; j < jmax; ++j) {
        const std::size_t row = (static_cast<std::size_t>(j) * a.n_kv_heads + kvh) * D;
        double sc = 0.0;
        for (int i = 0; i < D; ++i) sc += static_cast<double>(q[i]) * kv_at(sp.k, sp.f16, row + i);
        sc *= a.scale;
        if (sc > m) {  // rescale what was accumulated under the old maximum
          const double c = std::exp(m - sc);
          l *= c;
          for (double& v : acc) v *= c;
          m = sc;
        }
        const double p = std::exp(sc - m);
        l += p;
        for (int i = 0; i < D; ++i) acc[i] += p * kv_at(sp.v, sp.f16, row + i);
      }
      float* lse = a.lse + static_cast<std::size_t>(n) * a.n_heads + h;
      if (l == 0.0) {
        *lse = -std::numeric_limits<float>::infinity();
        for (int i = 0; i < D; ++i) o[i] = 0.0f;
      } else {
        *lse = static_cast<float>(m + std::log(l));
        for (int i = 0; i < D; ++i) o[i] = static_cast<float>(acc[i] / l);
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
