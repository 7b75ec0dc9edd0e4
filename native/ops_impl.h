// The ops of ops.h with an explicit kernel table, so tests can run every ISA's variant through
// the same threaded code the model uses. ops.cpp implements ops.h as these with kernels().
#pragma once
#include "kernels.h"

namespace seqshare {

void linear_with(const KernelTable& kt, const WeightView& w, const float* X, int N, float* Y, ThreadPool& pool);
void linear_many_with(const KernelTable& kt, const WeightView* ws, float* const* Ys, int n_w, const float* X, int N,
                      ThreadPool& pool);
void attention_states_with(const KernelTable& kt, const AttnJob* jobs, int n_jobs, int n_kv_heads, float scale,
                           const AttnStates& st, ThreadPool& pool);
void attention_with(const KernelTable& kt, const float* q, int N, int n_heads, int n_kv_heads, int head_dim,
                    const std::int32_t* q_pos, const KVSpan& span, float scale, float* out, float* lse,
                    ThreadPool& pool);
void rmsnorm_with(const KernelTable& kt, const float* x, const float* weight, float eps, int N, int dim, float* y,
                  ThreadPool& pool);
void silu_mul_with(const KernelTable& kt, float* gate, const float* up, std::size_t n, ThreadPool& pool);
void add_with(const KernelTable& kt, float* y, const float* x, std::size_t n, ThreadPool& pool);
// Throws std::invalid_argument when the view is inconsistent (shape, group, missing planes).
void check_weight(const WeightView& w);

}  // namespace seqshare
