// The operations the model's forward pass calls. This header is the contract between the kernels
// (kernels_*.cpp, attention*.cpp, ops.cpp) and the model (model.cpp). Every op is multi-threaded
// through the pool it is given and picks its kernels from the active ISA's table.
//
// Shapes are written as (dim0, dim1, ...) in row-major order.
#pragma once
#include <cstddef>
#include <cstdint>

#include "threadpool.h"

namespace seqshare {

// ---- weights, exactly as stored in a bundle (see worker/quant.py for the layouts) ------------
enum class WFmt : int { F32 = 0, F16 = 1, BF16 = 2, Q8 = 3, Q4 = 4 };

struct WeightView {
  WFmt fmt = WFmt::F32;
  int rows = 0, cols = 0;     // logical matrix (rows = out_features, cols = in_features)
  int group = 0;              // q8/q4 group size (32, 64, 128); 0 for float formats
  const void* data = nullptr; // f32/f16/bf16: the matrix; q8: int8 qs; q4: packed uint8 qs
  const std::uint16_t* scales = nullptr;  // q8/q4: float16 (rows, cols/group)
  const std::uint16_t* mins = nullptr;    // q4: float16 (rows, cols/group)
};

// Y (N, w.rows) = X (N, w.cols) @ W^T.  N == 1 is the decode GEMV (memory-bound: stream the
// packed weights once); N > 1 is prefill (compute-bound: tiled, int8 dot products where faster).
void linear(const WeightView& w, const float* X, int N, float* Y, ThreadPool& pool);

// Row `token` of an embedding matrix in any format, dequantized: out (N, w.cols).
void embedding(const WeightView& w, const std::int32_t* tokens, int N, float* out, ThreadPool& pool);

// y (N, dim) = x / rms(x) * weight ; x and y may alias.
void rmsnorm(const float* x, const float* weight, float eps, int N, int dim, float* y);

// In place on x (N, n_heads, head_dim): rotate dimension i with i + head_dim/2 ("rotate_half")
// by angle positions[n] * theta^(-2i/head_dim).
void rope(float* x, int N, int n_heads, int head_dim, const std::int32_t* positions, float theta);

// gate (n) = silu(gate) * up
void silu_mul(float* gate, const float* up, std::size_t n);

// y += x
void add_inplace(float* y, const float* x, std::size_t n);

// ---- attention ------------------------------------------------------------------------------
// A run of cached keys/values for one layer: rows [0, len) of (len, n_kv_heads, head_dim),
// stored as float16 bits or float32, `pos0` the absolute position of row 0.
struct KVSpan {
  const void* k = nullptr;
  const void* v = nullptr;
  int len = 0;
  int pos0 = 0;
  bool f16 = true;
};

// Attention of queries q (N, n_heads, head_dim) at absolute positions q_pos[n] over one span.
// Causal: query n sees span row j only if pos0 + j <= q_pos[n]. Grouped-query: head h reads
// kv head h / (n_heads / n_kv_heads). Never materialises the (N, len) score matrix (tiled, online
// softmax). Writes out (N, n_heads, head_dim) normalised, and lse (N, n_heads) = log-sum-exp of the
// scaled scores it saw (-inf where it saw none), so partial results over spans merge exactly.
void attention(const float* q, int N, int n_heads, int n_kv_heads, int head_dim,
               const std::int32_t* q_pos, const KVSpan& span, float scale,
               float* out, float* lse, ThreadPool& pool);

// Merge a second partial attention (out_b, lse_b) into (out_a, lse_a), both (N, n_heads, ...).
void attention_merge(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                     int N, int n_heads, int head_dim);

// Store K or V rows (N, n_kv_heads * head_dim) float32 into a cache at row `row0`, as f16 or f32.
void kv_store(void* cache, bool f16, int row0, const float* src, int N, int kv_dim);

}  // namespace seqshare
