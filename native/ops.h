// The operations the model's forward pass calls. This header is the contract between the kernels
// (kernels_*.cpp, attention*.cpp, ops.cpp) and the model (model.cpp). Every op is multi-threaded
// through the pool it is given and picks its kernels from the active ISA's table.
//
// Shapes are written as (dim0, dim1, ...) in row-major order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "half.h"
#include "kv.h"
#include "threadpool.h"

namespace seqshare {

// ---- weights, exactly as stored in a bundle (see bundle/quant.py for the layouts) ------------
enum class WFmt : int { F32 = 0, F16 = 1, BF16 = 2, Q8 = 3, Q4 = 4, Q5 = 5, Q6 = 6, Q8P = 7 };

// q4, q5, q6 and q8p are stored in 8-row panels (bundle/quant.py): one block of 32 columns of a panel is
// the 128 nibble bytes, then 32 bytes per further bit of the values (q5: the fifth; q6: the fifth and
// sixth, side by side). q8p (GGUF Q8_0 for the int8-activation kernels) has whole bytes instead: 256
// per block. A panel without a mins plane is symmetric (GGUF Q4_0, Q5_0, Q6_K, Q8_0; q6 and q8p
// always are): its minimum is -2^(bits - 1) x its scale.
inline bool is_panel(WFmt f) { return f == WFmt::Q4 || f == WFmt::Q5 || f == WFmt::Q6 || f == WFmt::Q8P; }
inline int panel_bits(WFmt f) { return f == WFmt::Q8P ? 8 : f == WFmt::Q6 ? 6 : f == WFmt::Q5 ? 5 : 4; }
constexpr int panel_block_bytes(int bits) { return 128 + 32 * (bits - 4); }
inline int panel_block_bytes(WFmt f) { return panel_block_bytes(panel_bits(f)); }
// q6's 16-column groups are GGUF Q6_K's sub-blocks; the other panels group 32, 64 or 128 columns.
constexpr int kQ6Group = 16;

// K-scale panels (q4k, q5k, q6k: GGUF Q4_K, Q5_K, Q6_K with their scales as stored) keep, instead of
// float16 scale (and min) planes, one plane `kscales` of kscale_bytes per 256-column super-block of a
// panel: float16 d of the 8 rows (q4k/q5k: then dmin), then for each group of the super-block one
// byte per row, its multiple sc of d (q4k/q5k: 0..63, then m of dmin the same way; q6k: int8). A
// group's scale is d x sc and its minimum -dmin x m (q6k: -32 x its scale), both exact in float.
constexpr int kSuperCols = 256;
constexpr bool is_kscale_bits(int bits) { return bits == 4 || bits == 5 || bits == 6; }
constexpr int kscale_group(int bits) { return bits == 6 ? kQ6Group : 32; }  // GGUF's sub-block
constexpr int kscale_bytes(int bits) { return bits == 6 ? 16 + 16 * 8 : 32 + 2 * 8 * 8; }

struct WeightView {
  WFmt fmt = WFmt::F32;
  int rows = 0, cols = 0;     // logical matrix (rows = out_features, cols = in_features)
  int group = 0;              // q8/q4/q5/q8p group size (32, 64, 128), q6: 16; 0 for float formats
  const void* data = nullptr; // f32/f16/bf16: the matrix; q8: int8 qs; q4/q5/q6/q8p: panel bytes
  // q8: float16 (rows, cols/group). Panels: float16 (panels, cols/group, 8), the 8 rows of a panel
  // side by side. Panel bytes are (panels, cols/32, 128, 160 or 192): byte 32j + 4i + c of block b
  // holds column 32b + 4j + c of row 8p + i (low nibble) and column 32b + 16 + 4j + c (high nibble);
  // for q5, bit 2j + h of byte 128 + 4i + c holds the fifth bit (16) of the value in nibble h of that
  // byte; for q6, bits 2 (2 (j % 2) + h) and up of byte 128 + 32 (j / 2) + 4i + c its two high bits.
  // q8p blocks are (panels, cols/32, 256): byte 32j + 4i + c (j < 8) is column 32b + 4j + c of row
  // 8p + i, its value + 128.
  const std::uint16_t* scales = nullptr;
  const std::uint16_t* mins = nullptr;    // asymmetric q4/q5 only
  const std::uint8_t* kscales = nullptr;  // K-scale panels: (panels, cols/256, kscale_bytes), no scales or mins
  int panels() const { return (rows + 7) / 8; }
};

// Value q (q4: 0..15, q5: 0..31, q6: 0..63, q8p: 0..255) of row r, column c of a panel weight, where
// the float16 bits of its scale (and min) are, and its min.
inline int panel_q_at(const WeightView& w, int r, int c) {
  const auto* p = static_cast<const std::uint8_t*>(w.data) +
                  (static_cast<std::size_t>(r / 8) * (w.cols / 32) + c / 32) * panel_block_bytes(w.fmt);
  const int k = c % 32, h = k / 16, j = (k % 16) / 4, lane = 4 * (r % 8) + k % 4;
  if (w.fmt == WFmt::Q8P) return p[32 * (k / 4) + lane];
  int q = h ? (p[32 * j + lane] >> 4) : (p[32 * j + lane] & 0x0F);
  if (w.fmt == WFmt::Q5) q |= ((p[128 + lane] >> (2 * j + h)) & 1) << 4;
  if (w.fmt == WFmt::Q6) q |= ((p[128 + 32 * (j / 2) + lane] >> (2 * (2 * (j % 2) + h))) & 3) << 4;
  return q;
}
inline std::size_t panel_group_at(const WeightView& w, int r, int g) {
  return (static_cast<std::size_t>(r / 8) * (w.cols / w.group) + g) * 8 + r % 8;
}
// The K-scale bytes of the super-block holding group g of the panel of row r.
inline const std::uint8_t* kscales_at(const WeightView& w, int r, int g) {
  const int per_super = kSuperCols / w.group, supers = w.cols / kSuperCols;
  return w.kscales + (static_cast<std::size_t>(r / 8) * supers + g / per_super) * kscale_bytes(panel_bits(w.fmt));
}
// Where a panel's minimums come from, as the kernels read them: min = factor x plane[group], the
// mins plane times 1, or for a symmetric panel the scales plane times -2^(bits - 1) (exact in float).
struct PanelMins {
  const std::uint16_t* plane;
  float factor;
};
inline PanelMins panel_mins(const WeightView& w) {
  if (w.mins) return {w.mins, 1.0f};
  return {w.scales, -static_cast<float>(1 << (panel_bits(w.fmt) - 1))};
}
// Scale and minimum of group g of row r, as the kernels compute them.
inline float panel_scale_at(const WeightView& w, int r, int g) {
  if (!w.kscales) return f16_to_f32(w.scales[panel_group_at(w, r, g)]);
  const std::uint8_t* k = kscales_at(w, r, g);
  const int sc = k[(panel_bits(w.fmt) == 6 ? 16 : 32) + 8 * (g % (kSuperCols / w.group)) + r % 8];
  std::uint16_t d;
  std::memcpy(&d, k + 2 * (r % 8), 2);
  return f16_to_f32(d) * static_cast<float>(panel_bits(w.fmt) == 6 ? static_cast<std::int8_t>(sc) : sc);
}
inline float panel_min_at(const WeightView& w, int r, int g) {
  if (w.kscales && panel_bits(w.fmt) != 6) {
    const std::uint8_t* k = kscales_at(w, r, g);
    std::uint16_t dmin;
    std::memcpy(&dmin, k + 16 + 2 * (r % 8), 2);
    return -(f16_to_f32(dmin) * static_cast<float>(k[96 + 8 * (g % (kSuperCols / w.group)) + r % 8]));
  }
  if (w.kscales) return -32.0f * panel_scale_at(w, r, g);
  const PanelMins m = panel_mins(w);
  return m.factor * f16_to_f32(m.plane[panel_group_at(w, r, g)]);
}

// Y (N, w.rows) = X (N, w.cols) @ W^T.  N == 1 is the decode GEMV (memory-bound: stream the
// packed weights once); N > 1 is prefill (compute-bound: tiled, int8 dot products where faster).
void linear(const WeightView& w, const float* X, int N, float* Y, ThreadPool& pool);

// Several weights applied to the same X (q/k/v, gate/up) in one parallel region: Ys[i] (N,
// ws[i].rows). Weights of different formats, groups or widths are applied one by one.
void linear_many(const WeightView* ws, float* const* Ys, int n_w, const float* X, int N, ThreadPool& pool);

// Row `token` of an embedding matrix in any format, dequantized: out (N, w.cols).
void embedding(const WeightView& w, const std::int32_t* tokens, int N, float* out, ThreadPool& pool);

// The element-wise ops below split their rows (or runs of whole vectors) among the pool's threads
// from 32K elements up (ops.cpp's kMinSplit); each element is computed as one thread would compute
// it, so the results do not depend on the pool.

// y (N, dim) = x / rms(x) * weight ; x and y may alias.
void rmsnorm(const float* x, const float* weight, float eps, int N, int dim, float* y, ThreadPool& pool);

// In place on q (N, n_q_heads, head_dim) and k (N, n_k_heads, head_dim; null when n_k_heads is 0):
// rotate dimension i with i + head_dim/2 ("rotate_half") by angle positions[n] * theta^(-2i/head_dim).
void rope(float* q, int n_q_heads, float* k, int n_k_heads, int N, int head_dim, const std::int32_t* positions,
          float theta, ThreadPool& pool);

// gate (n) = silu(gate) * up
void silu_mul(float* gate, const float* up, std::size_t n, ThreadPool& pool);

// y (n) += x
void add_inplace(float* y, const float* x, std::size_t n, ThreadPool& pool);

// y (N, dim) += b (dim), every row
void add_rows(float* y, const float* b, int N, int dim, ThreadPool& pool);

// ---- attention ------------------------------------------------------------------------------
// A run of cached keys/values of one layer of a KVCache (kv.h): rows [0, len) at absolute positions
// [pos0, pos0 + len), float16 bits or float32; K in transposed tiles of 32 slots, V in rows, row j
// in slot j + phase with pos0 % 32 == phase (so the cache's tiles are the canonical ones).
struct KVSpan {
  const void* k = nullptr;
  const void* v = nullptr;
  int len = 0;
  int pos0 = 0;
  bool f16 = true;
  int phase = 0;
  std::size_t head_stride = 0;  // elements between kv heads (slots * head_dim)
  // The cache's BF16 pair tiles of this layer (kv.h), or null: kv head h's slot tile i at
  // pairs + h * head_stride + i * 32 * head_dim words, current for the whole tiles below *paired.
  std::uint32_t* pairs = nullptr;
  int* paired = nullptr;
};

// Layer `layer` of a cache as a span of `len` rows (its own length, or more where this step's rows
// are stored but not yet counted) from absolute position `pos0`.
inline KVSpan kv_span(const KVCache& kv, int layer, int len, int pos0) {
  KVSpan s{kv.k(layer), kv.v(layer), len, pos0, kv.f16(), kv.phase(), kv.head_stride()};
  s.pairs = kv.pairs(layer);
  s.paired = &kv.paired(layer);
  return s;
}

// The keys one query set may attend to, by absolute position: span[0], then (n == 2) span[1],
// which starts where span[0] ends -- a shared prefix, then a sequence's own rows.
struct KeySpans {
  KVSpan span[2];
  int n = 1;
};

// Canonical blocking. Attention is computed as a left fold, in position order, over blocks of
// kAttnBlock keys at absolute positions [b * kAttnBlock, (b + 1) * kAttnBlock); inside a block, an
// online softmax runs over tiles of kAttnTile keys at absolute positions. Because neither depends
// on where the keys are stored or how queries are batched, a question attending to a shared
// prefix and then to its own rows gets bit for bit what it gets from one KV holding both.
constexpr int kAttnBlock = 256;
constexpr int kAttnTile = 32;

// Per (state row, head, block): the online-softmax state o[head_dim] (unnormalised), m (running
// max of the scaled scores), l (sum of exp(score - m)); l == 0 means no key seen.
struct AttnStates {
  float* data = nullptr;
  int n_heads = 0, head_dim = 0, n_blocks = 0;
  int stride() const { return head_dim + 8; }  // floats per state, 32-byte aligned for head_dim % 8 == 0
  float* at(int row, int h, int b) const {
    return data + ((static_cast<std::size_t>(row) * n_heads + h) * n_blocks + b) * stride();
  }
  std::size_t floats(int rows) const { return static_cast<std::size_t>(rows) * n_heads * n_blocks * stride(); }
};

// One query set against one key source, over the key positions [p_begin, p_end): each query n
// (q (N, n_heads, head_dim) at q_pos[n], causal: it sees positions <= q_pos[n]) advances the
// states of state row state_row[n] for every block the range touches. A block the range enters
// after its start is resumed from its state when `continues` (an earlier job did its first part)
// and started empty otherwise.
struct AttnJob {
  const float* q = nullptr;
  const std::int32_t* q_pos = nullptr;
  const std::int32_t* state_row = nullptr;
  int N = 0;
  KeySpans keys;
  int p_begin = 0, p_end = 0;
  bool continues = false;
};

// Run the jobs (all at once, over the pool). Jobs must not share state rows.
void attention_states(const AttnJob* jobs, int n_jobs, int n_kv_heads, float scale, const AttnStates& st,
                      ThreadPool& pool);

// Fold the block states [first_block, q_pos[n] / kAttnBlock] of each row in order: out (N,
// n_heads, head_dim) normalised and lse (N, n_heads) (-inf and zeros where no key was seen).
void attention_fold(const AttnStates& st, const std::int32_t* q_pos, int N, int first_block, float* out, float* lse,
                    ThreadPool& pool);

// The whole attention of queries q (N, n_heads, head_dim) at q_pos over one span (for tests and
// benchmarks; the model drives attention_states itself). Grouped-query: head h reads kv head
// h / (n_heads / n_kv_heads). Writes out and lse = log-sum-exp of the scaled scores seen.
void attention(const float* q, int N, int n_heads, int n_kv_heads, int head_dim,
               const std::int32_t* q_pos, const KVSpan& span, float scale,
               float* out, float* lse, ThreadPool& pool);

// Merge a second partial attention (out_b, lse_b) into (out_a, lse_a), both (N, n_heads, ...).
void attention_merge(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                     int N, int n_heads, int head_dim);

// Store the K and V rows (N, n_kv_heads * head_dim) float32 of one layer into a cache at row
// `row0`, as its dtype: V into its rows, K into its transposed tiles. Their tiles' pairs (if the
// cache keeps them) are no longer current.
void kv_store(KVCache& kv, int layer, int row0, const float* k, const float* v, int N);

// Whether new f16 caches of this head_dim keep BF16 pair tiles: where the dispatched attention
// reads them (the avx512 and amx levels).
bool kv_keeps_pairs(bool f16, int head_dim);

}  // namespace seqshare
