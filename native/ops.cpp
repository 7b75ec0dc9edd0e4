// ops.h on top of the kernel table: argument checks, scratch buffers and the split of work over
// the pool. Kernels stay single-threaded; this file decides who computes what.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "half.h"
#include "ops_impl.h"

namespace seqshare {

namespace {

// Grow-only, 64-byte aligned scratch owned by the calling thread (ops are called from one
// thread at a time per model; nothing is allocated per token once warmed up).
struct Scratch {
  void* p = nullptr;
  std::size_t cap = 0;
  ~Scratch() { std::free(p); }
  void* get(std::size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~static_cast<std::size_t>(4095);
      p = std::aligned_alloc(64, cap);
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
};

thread_local Scratch qacts_scratch;
thread_local Scratch attn_scratch;

constexpr int kRowGrain = 16;    // rows per GEMM/GEMV work unit (the kernels' row tile)
constexpr int kQueryBlock = 16;  // queries per attention work unit

}  // namespace

void check_weight(const WeightView& w) {
  if (w.rows <= 0 || w.cols <= 0 || !w.data) throw std::invalid_argument("weight: empty view");
  if (w.fmt == WFmt::Q8 || w.fmt == WFmt::Q4) {
    if (w.group != 32 && w.group != 64 && w.group != 128)
      throw std::invalid_argument("weight: group must be 32, 64 or 128, got " + std::to_string(w.group));
    if (w.cols % w.group) throw std::invalid_argument("weight: cols not a multiple of the group");
    if (!w.scales || (w.fmt == WFmt::Q4 && !w.mins)) throw std::invalid_argument("weight: missing scales/mins");
  }
}

void linear_with(const KernelTable& kt, const WeightView& w, const float* X, int N, float* Y, ThreadPool& pool) {
  check_weight(w);
  if (N <= 0) return;
  const int fmt = static_cast<int>(w.fmt);
  if (fmt <= static_cast<int>(WFmt::BF16)) {
    GemmFn gemm = kt.gemm[fmt];
    pool.parallel_for(w.rows, kRowGrain, [&](int r0, int r1) { gemm(w, X, N, Y, w.rows, r0, r1); });
    return;
  }
  // Quantise the activations once per call; every thread reads them for its rows.
  const bool q8 = w.fmt == WFmt::Q8;
  const std::size_t rb = kt.qacts_row_bytes(w.cols, w.group);
  auto* xq = static_cast<std::uint8_t*>(qacts_scratch.get(rb * N));
  pool.parallel_for(N, 1, [&](int n0, int n1) {
    for (int n = n0; n < n1; ++n) kt.quantize_acts(X + static_cast<std::size_t>(n) * w.cols, w.cols, w.group, q8, xq + rb * n);
  });
  QGemmFn qgemm = kt.qgemm[q8 ? 0 : 1];
  pool.parallel_for(w.rows, kRowGrain, [&](int r0, int r1) { qgemm(w, xq, N, Y, w.rows, r0, r1); });
}

void linear(const WeightView& w, const float* X, int N, float* Y, ThreadPool& pool) {
  linear_with(kernels(), w, X, N, Y, pool);
}

void embedding(const WeightView& w, const std::int32_t* tokens, int N, float* out, ThreadPool& pool) {
  check_weight(w);
  const std::size_t C = static_cast<std::size_t>(w.cols);
  for (int n = 0; n < N; ++n) {
    const int t = tokens[n];
    if (t < 0 || t >= w.rows) throw std::invalid_argument("embedding: token id " + std::to_string(t) + " out of range");
  }
  const KernelTable& kt = kernels();
  pool.parallel_for(N, 1, [&](int n0, int n1) {
    for (int n = n0; n < n1; ++n) {
      const std::size_t r = static_cast<std::size_t>(tokens[n]);
      float* o = out + n * C;
      switch (w.fmt) {
        case WFmt::F32: std::memcpy(o, static_cast<const float*>(w.data) + r * C, C * 4); break;
        case WFmt::F16: kt.f16_to_f32(static_cast<const std::uint16_t*>(w.data) + r * C, o, C); break;
        case WFmt::BF16: {
          const auto* b = static_cast<const std::uint16_t*>(w.data) + r * C;
          for (std::size_t i = 0; i < C; ++i) o[i] = bf16_to_f32(b[i]);
          break;
        }
        case WFmt::Q8: {
          const auto* q = static_cast<const std::int8_t*>(w.data) + r * C;
          const std::uint16_t* s = w.scales + r * (C / w.group);
          for (std::size_t i = 0; i < C; ++i) o[i] = f16_to_f32(s[i / w.group]) * q[i];
          break;
        }
        case WFmt::Q4: {
          const auto* q = static_cast<const std::uint8_t*>(w.data) + r * (C / 2);
          const std::size_t ng = C / w.group, half = w.group / 2;
          for (std::size_t g = 0; g < ng; ++g) {
            const float d = f16_to_f32(w.scales[r * ng + g]), m = f16_to_f32(w.mins[r * ng + g]);
            for (std::size_t i = 0; i < half; ++i) {
              const std::uint8_t b = q[g * half + i];
              o[g * w.group + i] = d * static_cast<float>(b & 0x0F) + m;
              o[g * w.group + half + i] = d * static_cast<float>(b >> 4) + m;
            }
          }
          break;
        }
      }
    }
  });
}

void rmsnorm_with(const KernelTable& kt, const float* x, const float* weight, float eps, int N, int dim, float* y) {
  for (int n = 0; n < N; ++n) {
    const std::size_t off = static_cast<std::size_t>(n) * dim;
    kt.rmsnorm(x + off, weight, eps, dim, y + off);
  }
}

void rmsnorm(const float* x, const float* weight, float eps, int N, int dim, float* y) {
  rmsnorm_with(kernels(), x, weight, eps, N, dim, y);
}

// Angles are computed in float32 the way transformers does (inv_freq in float, pos * inv_freq in
// float), so positions thousands deep round to the same angle as the reference.
void rope(float* x, int N, int n_heads, int head_dim, const std::int32_t* positions, float theta) {
  const int half = head_dim / 2;
  float inv_freq[512];
  if (half > 512) throw std::invalid_argument("rope: head_dim too large");
  for (int i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  float cs[512], sn[512];
  for (int n = 0; n < N; ++n) {
    for (int i = 0; i < half; ++i) {
      const float ang = static_cast<float>(positions[n]) * inv_freq[i];
      cs[i] = static_cast<float>(std::cos(static_cast<double>(ang)));
      sn[i] = static_cast<float>(std::sin(static_cast<double>(ang)));
    }
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (static_cast<std::size_t>(n) * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void silu_mul(float* gate, const float* up, std::size_t n) { kernels().silu_mul(gate, up, n); }

void add_inplace(float* y, const float* x, std::size_t n) { kernels().add(y, x, n); }

// Work units: (kv head, query block) for prefill, in an order that interleaves cheap early
// blocks with expensive late ones so contiguous per-thread ranges balance under causality. When
// there are fewer units than threads (decode), the span is also cut into key ranges whose partial
// results are merged through their log-sum-exp.
void attention_with(const KernelTable& kt, const AttnArgs& a, ThreadPool& pool) {
  if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads) throw std::invalid_argument("attention: n_heads % n_kv_heads != 0");
  if (a.N <= 0) return;
  const int nqb = (a.N + kQueryBlock - 1) / kQueryBlock;
  const int units = a.n_kv_heads * nqb;
  const int T = pool.size();
  const int min_keys_per_split = 256;
  int splits = 1;
  if (units < 2 * T && a.span.len >= 2 * min_keys_per_split)
    splits = std::min((2 * T + units - 1) / units, a.span.len / min_keys_per_split);
  if (splits <= 1) {
    pool.parallel_for(units, 1, [&](int u0, int u1) {
      for (int u = u0; u < u1; ++u) {
        const int kvh = u % a.n_kv_heads, i = u / a.n_kv_heads;
        const int qb = (i % 2 == 0) ? i / 2 : nqb - 1 - i / 2;
        kt.attention(a, kvh, qb * kQueryBlock, std::min(a.N, (qb + 1) * kQueryBlock), 0, a.span.len);
      }
    });
    return;
  }
  // Split-K: split s writes its partial (out, lse) into scratch, merged afterwards.
  const std::size_t out_n = static_cast<std::size_t>(a.N) * a.n_heads * a.head_dim;
  const std::size_t lse_n = static_cast<std::size_t>(a.N) * a.n_heads;
  auto* buf = static_cast<float*>(attn_scratch.get((out_n + lse_n) * (splits - 1) * sizeof(float)));
  const int per = (a.span.len + splits - 1) / splits;
  pool.parallel_for(units * splits, 1, [&](int u0, int u1) {
    for (int u = u0; u < u1; ++u) {
      const int s = u / units, rest = u % units;
      const int kvh = rest % a.n_kv_heads, qb = rest / a.n_kv_heads;
      AttnArgs part = a;
      if (s > 0) {
        part.out = buf + (s - 1) * (out_n + lse_n);
        part.lse = part.out + out_n;
      }
      kt.attention(part, kvh, qb * kQueryBlock, std::min(a.N, (qb + 1) * kQueryBlock), s * per,
                   std::min(a.span.len, (s + 1) * per));
    }
  });
  for (int s = 1; s < splits; ++s) {
    const float* o = buf + (s - 1) * (out_n + lse_n);
    attention_merge(a.out, a.lse, o, o + out_n, a.N, a.n_heads, a.head_dim);
  }
}

void attention(const float* q, int N, int n_heads, int n_kv_heads, int head_dim, const std::int32_t* q_pos,
               const KVSpan& span, float scale, float* out, float* lse, ThreadPool& pool) {
  AttnArgs a{q, N, n_heads, n_kv_heads, head_dim, q_pos, span, scale, out, lse};
  attention_with(kernels(), a, pool);
}

void kv_store(void* cache, bool f16, int row0, const float* src, int N, int kv_dim) {
  const std::size_t off = static_cast<std::size_t>(row0) * kv_dim, n = static_cast<std::size_t>(N) * kv_dim;
  if (f16)
    kernels().f32_to_f16(src, static_cast<std::uint16_t*>(cache) + off, n);
  else
    std::memcpy(static_cast<float*>(cache) + off, src, n * sizeof(float));
}

}  // namespace seqshare
