// ops.h on top of the kernel table: argument checks, scratch buffers and the split of work over
// the pool. Kernels stay single-threaded; this file decides who computes what.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "half.h"
#include "pages.h"
#include "ops_impl.h"

namespace seqshare {

namespace {

// Grow-only, 64-byte aligned scratch owned by the calling thread (ops are called from one thread
// at a time per model; nothing is allocated per token once warmed up), on huge pages from 2 MiB.
struct Scratch {
  void* p = nullptr;
  std::size_t cap = 0;
  ~Scratch() { std::free(p); }
  void* get(std::size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~static_cast<std::size_t>(4095);
      p = alloc_pages(cap);
    }
    return p;
  }
};

thread_local Scratch qacts_scratch;

constexpr int kRowGrain = 16;    // rows per GEMM/GEMV work unit (the kernels' row tile)
constexpr int kQueryBlock = 16;  // queries per attention work unit

}  // namespace

void check_weight(const WeightView& w) {
  if (w.rows <= 0 || w.cols <= 0 || !w.data) throw std::invalid_argument("weight: empty view");
  if (w.fmt == WFmt::Q6) {
    if (w.group != kQ6Group)
      throw std::invalid_argument("weight: q6 groups are 16 columns, got " + std::to_string(w.group));
  } else if (w.fmt == WFmt::Q8 || is_panel(w.fmt)) {
    if (w.group != 32 && w.group != 64 && w.group != 128)
      throw std::invalid_argument("weight: group must be 32, 64 or 128, got " + std::to_string(w.group));
  }
  if (w.fmt == WFmt::Q8 || is_panel(w.fmt)) {
    if (w.cols % 32 || w.cols % w.group) throw std::invalid_argument("weight: cols not a multiple of 32 and the group");
    if (!w.scales && !w.kscales) throw std::invalid_argument("weight: missing scales");
    if (w.kscales && (w.scales || w.mins || !is_kscale_bits(panel_bits(w.fmt)) || w.cols % kSuperCols ||
                      w.group != kscale_group(panel_bits(w.fmt))))
      throw std::invalid_argument("weight: K scales need q4/q5 (group 32) or q6 panels of whole 256-column super-blocks");
    if (w.mins && (w.fmt == WFmt::Q8 || w.fmt == WFmt::Q6 || w.fmt == WFmt::Q8P))
      throw std::invalid_argument("weight: q8, q6 and q8p have no mins");
  }
}

namespace {

// Units [0, total) handed out in ranges that threads claim as they finish, "guided": a claim takes
// 1 / (2 x threads) of what is left, at least one unit. Each claim moves the counter's cache line
// between cores, and with one unit per claim 2% of a Qwen2.5-1.5B decode step's samples sat on that
// instruction (about 10,000 claims a step); guided, an op takes a few dozen, and the last ranges are
// still one unit, so no thread waits long for another at the end.
class GuidedClaims {
 public:
  GuidedClaims(int total, int threads) : total_(total), div_(2 * std::max(1, threads)) {}
  bool claim(int& begin, int& end) {
    int b = next_.load(std::memory_order_relaxed);
    for (;;) {
      if (b >= total_) return false;
      const int e = b + std::max(1, (total_ - b) / div_);
      if (next_.compare_exchange_weak(b, e, std::memory_order_relaxed)) {
        begin = b;
        end = e;
        return true;
      }
    }
  }

 private:
  std::atomic<int> next_{0};
  const int total_, div_;
};

}  // namespace

// Rows are claimed in chunks of kChunk rows (GuidedClaims' units) as threads finish: two threads
// that stream weights from memory do not run at the same speed, and a static half each would leave
// one waiting. A claimed range still runs one kernel call per chunk: a prefill's call passes its
// rows over each block of tokens in turn (for_panel_tiles), and a chunk's rows stay in L2 for that.
// Each row's result does not depend on how the rows were split.
void linear_many_with(const KernelTable& kt, const WeightView* ws, float* const* Ys, int n_w, const float* X, int N,
                      ThreadPool& pool) {
  if (N <= 0 || n_w <= 0) return;
  for (int i = 0; i < n_w; ++i) {
    check_weight(ws[i]);
    if (ws[i].cols != ws[0].cols || ws[i].fmt != ws[0].fmt || ws[i].group != ws[0].group)
      throw std::invalid_argument("linear: fused weights must share columns, format and group");
  }
  const WeightView& w0 = ws[0];
  const bool quantized = w0.fmt == WFmt::Q8 || is_panel(w0.fmt), q8 = w0.fmt == WFmt::Q8;
  const std::uint8_t* xq = nullptr;
  std::size_t rb = 0;
  if (quantized) {  // quantise the activations once per call; every thread reads them for its rows
    rb = kt.qacts_row_bytes(w0.cols, w0.group, q8);
    auto* buf = static_cast<std::uint8_t*>(qacts_scratch.get(rb * N));
    pool.parallel_for(N, 1, [&](int n0, int n1) {
      for (int n = n0; n < n1; ++n) kt.quantize_acts(X + static_cast<std::size_t>(n) * w0.cols, w0.cols, w0.group, q8, buf + rb * n);
    });
    xq = buf;
  }
  constexpr int kChunk = 4 * kRowGrain;
  const auto chunks = [](const WeightView& w) { return (w.rows + kChunk - 1) / kChunk; };
  int total = 0;
  for (int i = 0; i < n_w; ++i) total += chunks(ws[i]);
  GuidedClaims claims(total, pool.size());
  pool.parallel_for(pool.size(), 1, [&](int, int) {
    for (int u0, u1; claims.claim(u0, u1);) {
      int i = 0, u = u0;
      while (u >= chunks(ws[i])) u -= chunks(ws[i++]);
      for (int n = u0; n < u1; ++n, ++u) {
        if (u == chunks(ws[i])) {
          u = 0;
          ++i;
        }
        const WeightView& w = ws[i];
        const int r0 = u * kChunk, r1 = std::min(w.rows, r0 + kChunk);
        if (quantized)
          kt.qgemm[static_cast<int>(w.fmt) - static_cast<int>(WFmt::Q8)](w, xq, N, Ys[i], w.rows, r0, r1);
        else
          kt.gemm[static_cast<int>(w.fmt)](w, X, N, Ys[i], w.rows, r0, r1);
      }
    }
  });
}

void linear_with(const KernelTable& kt, const WeightView& w, const float* X, int N, float* Y, ThreadPool& pool) {
  linear_many_with(kt, &w, &Y, 1, X, N, pool);
}

void linear_many(const WeightView* ws, float* const* Ys, int n_w, const float* X, int N, ThreadPool& pool) {
  const KernelTable& kt = kernels();
  for (int i = 1; i < n_w; ++i)
    if (ws[i].cols != ws[0].cols || ws[i].fmt != ws[0].fmt || ws[i].group != ws[0].group) {
      for (int j = 0; j < n_w; ++j) linear_with(kt, ws[j], X, N, Ys[j], pool);  // not fusable: one by one
      return;
    }
  linear_many_with(kt, ws, Ys, n_w, X, N, pool);
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
        case WFmt::Q4:
        case WFmt::Q5:
        case WFmt::Q6:
        case WFmt::Q8P: {
          for (std::size_t c = 0; c < C; ++c) {
            const int ri = static_cast<int>(r), ci = static_cast<int>(c);
            const int g = ci / w.group;
            o[c] = panel_scale_at(w, ri, g) * static_cast<float>(panel_q_at(w, ri, ci)) + panel_min_at(w, ri, g);
          }
          break;
        }
      }
    }
  });
}

// Element-wise work is split among the threads only from kMinSplit elements up: a decode step's few
// thousand cost less than waking a helper (a split silu_mul made decode 8% slower, measured). Runs
// start at multiples of kEltUnit, a multiple of every kernel's vector width, so each run's vector
// part covers what the whole array's would.
constexpr std::size_t kMinSplit = 32768, kEltUnit = 16;

// fn over [0, n) items of `size` elements each: split in chunks of whole items from kMinSplit
// elements up, else whole on this thread.
static void split_items(int n, std::size_t size, ThreadPool& pool, const std::function<void(int, int)>& fn) {
  if (static_cast<std::size_t>(n) * size < kMinSplit)
    fn(0, n);
  else
    pool.parallel_for(n, 1, fn);
}

static void for_runs(std::size_t n, ThreadPool& pool, const std::function<void(std::size_t, std::size_t)>& fn) {
  const int units = static_cast<int>((n + kEltUnit - 1) / kEltUnit);
  split_items(units, kEltUnit, pool, [&](int u0, int u1) { fn(u0 * kEltUnit, std::min(n, u1 * kEltUnit)); });
}

void rmsnorm_with(const KernelTable& kt, const float* x, const float* weight, float eps, int N, int dim, float* y,
                  ThreadPool& pool) {
  split_items(N, static_cast<std::size_t>(dim), pool, [&](int n0, int n1) {
    for (int n = n0; n < n1; ++n) {
      const std::size_t off = static_cast<std::size_t>(n) * dim;
      kt.rmsnorm(x + off, weight, eps, dim, y + off);
    }
  });
}

void rmsnorm(const float* x, const float* weight, float eps, int N, int dim, float* y, ThreadPool& pool) {
  rmsnorm_with(kernels(), x, weight, eps, N, dim, y, pool);
}

// One token's heads: v (n_heads, head_dim) rotated by the angles' cosines and sines.
static void rotate_heads(float* v, int n_heads, int head_dim, const float* cs, const float* sn) {
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h, v += head_dim) {
    for (int i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cs[i] - b * sn[i];
      v[i + half] = b * cs[i] + a * sn[i];
    }
  }
}

// Angles are computed in float32 the way transformers does (inv_freq in float, pos * inv_freq in
// float), so positions thousands deep round to the same angle as the reference. q and k share a
// token's cosines and sines.
void rope(float* q, int n_q_heads, float* k, int n_k_heads, int N, int head_dim, const std::int32_t* positions,
          float theta, ThreadPool& pool) {
  const int half = head_dim / 2;
  float inv_freq[512];
  if (half > 512) throw std::invalid_argument("rope: head_dim too large");
  for (int i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  const std::size_t q_row = static_cast<std::size_t>(n_q_heads) * head_dim;
  const std::size_t k_row = static_cast<std::size_t>(n_k_heads) * head_dim;
  split_items(N, q_row + k_row, pool, [&](int n0, int n1) {
    float cs[512], sn[512];
    for (int n = n0; n < n1; ++n) {
      for (int i = 0; i < half; ++i) {
        const float ang = static_cast<float>(positions[n]) * inv_freq[i];
        cs[i] = static_cast<float>(std::cos(static_cast<double>(ang)));
        sn[i] = static_cast<float>(std::sin(static_cast<double>(ang)));
      }
      rotate_heads(q + n * q_row, n_q_heads, head_dim, cs, sn);
      if (n_k_heads > 0) rotate_heads(k + n * k_row, n_k_heads, head_dim, cs, sn);
    }
  });
}

void silu_mul_with(const KernelTable& kt, float* gate, const float* up, std::size_t n, ThreadPool& pool) {
  for_runs(n, pool, [&](std::size_t i0, std::size_t i1) { kt.silu_mul(gate + i0, up + i0, i1 - i0); });
}

void silu_mul(float* gate, const float* up, std::size_t n, ThreadPool& pool) {
  silu_mul_with(kernels(), gate, up, n, pool);
}

void add_with(const KernelTable& kt, float* y, const float* x, std::size_t n, ThreadPool& pool) {
  for_runs(n, pool, [&](std::size_t i0, std::size_t i1) { kt.add(y + i0, x + i0, i1 - i0); });
}

void add_inplace(float* y, const float* x, std::size_t n, ThreadPool& pool) { add_with(kernels(), y, x, n, pool); }

void add_rows(float* y, const float* b, int N, int dim, ThreadPool& pool) {
  const KernelTable& kt = kernels();
  split_items(N, static_cast<std::size_t>(dim), pool, [&](int n0, int n1) {
    for (int n = n0; n < n1; ++n) kt.add(y + static_cast<std::size_t>(n) * dim, b, dim);
  });
}

// Blocks a query at position `pos` folds: those holding positions 0..pos (none for pos < 0).
static int folded_blocks(int pos) { return pos < 0 ? 0 : pos / kAttnBlock + 1; }

namespace {

// The whole tiles of a span's cache not yet kept as pairs, converted (kv.h), where the attention
// reads pairs: before the work units, so that every unit finds them and none converts a tile
// another unit converts too. A decode step finds at most one new tile; the first step over a
// document, restored or prefilled, converts all of them once.
void stage_pairs(const KernelTable& kt, const KVSpan& sp, int n_kv_heads, int head_dim, ThreadPool& pool) {
  if (!kt.stage_pairs || !sp.pairs || !sp.f16 || !pair_head_dim(head_dim)) return;
  const int first = std::max(*sp.paired, sp.phase ? 1 : 0), end = (sp.len + sp.phase) / kAttnTile;
  const int n = end - first;
  if (n <= 0) return;
  const std::size_t tile = static_cast<std::size_t>(head_dim) * kAttnTile;
  pool.parallel_for(n_kv_heads * n, 1, [&](int i0, int i1) {
    for (int i = i0; i < i1; ++i) {
      const std::size_t at = (i / n) * sp.head_stride + (first + i % n) * tile;
      kt.stage_pairs(static_cast<const std::uint16_t*>(sp.k) + at, static_cast<const std::uint16_t*>(sp.v) + at,
                     head_dim, sp.pairs + at);
    }
  });
  *sp.paired = end;
}

}  // namespace

bool kv_keeps_pairs(bool f16, int head_dim) {
  return f16 && kernels().stage_pairs && pair_head_dim(head_dim);
}

// Work units are (job, block of kQueryBlock queries, key block), claimed dynamically so
// that the costly ones (late queries, long prefixes) do not pile up on one thread. Each unit owns
// the states it writes: a (state row, head, block) belongs to one query of one job.
void attention_states_with(const KernelTable& kt, const AttnJob* jobs, int n_jobs, int n_kv_heads, float scale,
                           const AttnStates& st, ThreadPool& pool) {
  if (n_kv_heads <= 0 || st.n_heads % n_kv_heads) throw std::invalid_argument("attention: n_heads % n_kv_heads != 0");
  for (int j = 0; j < n_jobs; ++j)
    for (int s = 0; s < jobs[j].keys.n; ++s) stage_pairs(kt, jobs[j].keys.span[s], n_kv_heads, st.head_dim, pool);
  struct Unit {
    int job, n0, n1, b;
  };
  thread_local std::vector<Unit> unit_list;
  std::vector<Unit>& units = unit_list;  // the pool's threads must see this thread's list
  units.clear();
  for (int j = 0; j < n_jobs; ++j) {
    const AttnJob& job = jobs[j];
    for (int n0 = 0; n0 < job.N; n0 += kQueryBlock) {
      const int n1 = std::min(job.N, n0 + kQueryBlock);
      // Every block a query of this unit will fold gets a state, empty where it sees no key.
      int last_block = -1;
      for (int n = n0; n < n1; ++n) last_block = std::max(last_block, folded_blocks(job.q_pos[n]) - 1);
      for (int b = job.p_begin / kAttnBlock; b <= last_block; ++b) {
        if (b >= st.n_blocks) throw std::invalid_argument("attention: a query position beyond the state blocks");
        units.push_back(Unit{j, n0, n1, b});
      }
    }
  }
  std::atomic<int> next{0};
  const int n_units = static_cast<int>(units.size());
  pool.parallel_for(pool.size(), 1, [&](int, int) {
    for (int u; (u = next.fetch_add(1, std::memory_order_relaxed)) < n_units;) {
      const Unit& x = units[u];
      const AttnArgs a{&jobs[x.job], st.n_heads, n_kv_heads, st.head_dim, scale, st};
      kt.attention(a, x.n0, x.n1, x.b);
    }
  });
}

void attention_states(const AttnJob* jobs, int n_jobs, int n_kv_heads, float scale, const AttnStates& st,
                      ThreadPool& pool) {
  attention_states_with(kernels(), jobs, n_jobs, n_kv_heads, scale, st, pool);
}

// A left fold, block by block in position order, with the same arithmetic for every ISA: this is
// what makes a result independent of how its blocks were computed.
void attention_fold(const AttnStates& st, const std::int32_t* q_pos, int N, int first_block, float* out, float* lse,
                    ThreadPool& pool) {
  const int H = st.n_heads, D = st.head_dim;
  pool.parallel_for(N * H, 1, [&](int i0, int i1) {
    for (int i = i0; i < i1; ++i) {
      const int n = i / H, h = i % H;
      float* o = out + static_cast<std::size_t>(i) * D;
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      const int nb = std::min(st.n_blocks, folded_blocks(q_pos[n]));
      for (int b = first_block; b < nb; ++b) {
        const float* s = st.at(n, h, b);
        const float mb = s[D], lb = s[D + 1];
        if (lb == 0.0f) continue;
        if (l == 0.0f) {
          for (int d = 0; d < D; ++d) o[d] = s[d];
          m = mb;
          l = lb;
          continue;
        }
        const float mn = std::max(m, mb), ca = std::exp(m - mn), cb = std::exp(mb - mn);
        for (int d = 0; d < D; ++d) o[d] = o[d] * ca + s[d] * cb;
        l = l * ca + lb * cb;
        m = mn;
      }
      if (l == 0.0f) {
        for (int d = 0; d < D; ++d) o[d] = 0.0f;
        lse[i] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const float inv = 1.0f / l;
      for (int d = 0; d < D; ++d) o[d] *= inv;
      lse[i] = m + std::log(l);
    }
  });
}

void attention_with(const KernelTable& kt, const float* q, int N, int n_heads, int n_kv_heads, int head_dim,
                    const std::int32_t* q_pos, const KVSpan& span, float scale, float* out, float* lse,
                    ThreadPool& pool) {
  if (N <= 0) return;
  int max_pos = span.pos0;
  for (int n = 0; n < N; ++n) max_pos = std::max(max_pos, q_pos[n]);
  AttnStates st{nullptr, n_heads, head_dim, max_pos / kAttnBlock + 1};
  thread_local std::vector<float> buf;
  buf.resize(st.floats(N) + 8);
  st.data = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.data()) + 31) & ~std::uintptr_t(31));
  AttnJob job;
  job.q = q;
  job.q_pos = q_pos;
  job.N = N;
  job.keys.span[0] = span;
  job.p_begin = span.pos0;
  job.p_end = span.pos0 + span.len;
  attention_states_with(kt, &job, 1, n_kv_heads, scale, st, pool);
  attention_fold(st, q_pos, N, span.pos0 / kAttnBlock, out, lse, pool);
}

void attention(const float* q, int N, int n_heads, int n_kv_heads, int head_dim, const std::int32_t* q_pos,
               const KVSpan& span, float scale, float* out, float* lse, ThreadPool& pool) {
  attention_with(kernels(), q, N, n_heads, n_kv_heads, head_dim, q_pos, span, scale, out, lse, pool);
}

void kv_store(KVCache& kv, int layer, int row0, const float* k, const float* v, int N) {
  if (row0 < 0 || row0 + N > kv.capacity()) throw std::invalid_argument("kv_store: rows past the capacity");
  const KernelTable& kt = kernels();
  const int H = kv.n_kv_heads(), D = kv.head_dim();
  kv.rows_changed(layer, row0);
  std::uint16_t half[512];
  if (D > 512) throw std::invalid_argument("kv_store: head_dim too large");
  for (int n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h) {
      const std::size_t src = (static_cast<std::size_t>(n) * H + h) * D;
      const std::size_t vi = kv.v_index(row0 + n, h, 0);
      if (kv.f16()) {
        kt.f32_to_f16(v + src, static_cast<std::uint16_t*>(kv.v(layer)) + vi, D);
        kt.f32_to_f16(k + src, half, D);
        auto* kp = static_cast<std::uint16_t*>(kv.k(layer));
        for (int d = 0; d < D; ++d) kp[kv.k_index(row0 + n, h, d)] = half[d];
      } else {
        std::memcpy(static_cast<float*>(kv.v(layer)) + vi, v + src, D * sizeof(float));
        auto* kp = static_cast<float*>(kv.k(layer));
        for (int d = 0; d < D; ++d) kp[kv.k_index(row0 + n, h, d)] = k[src + d];
      }
    }
}

}  // namespace seqshare
