// The transformer forward pass (Llama / Qwen2 / Qwen3 family) over weights owned elsewhere.
//
// One call runs a batch of token rows that belong to one or more sequences. Sequence s owns a
// contiguous run of rows, attends to an optional shared prefix KV (read-only) and then to its own
// KV, into which its new rows are appended. Sequences that name the same prefix are grouped: per
// layer that prefix is read once for all their query rows; the canonical blocking of ops.h makes
// the result the same, bit for bit, as one KV holding the prefix and the sequence's rows.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kv.h"
#include "ops.h"
#include "pages.h"

namespace seqshare {

struct ModelDims {
  int vocab = 0, hidden = 0, intermediate = 0, n_layers = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float rope_theta = 10000.0f, norm_eps = 1e-5f;
  bool qkv_bias = false, qk_norm = false;
  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
};

struct LayerWeights {
  const float* attn_norm = nullptr;                    // (hidden)
  WeightView wq, wk, wv;                               // (q_dim | kv_dim, hidden)
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr;  // (q_dim | kv_dim), qkv_bias only
  const float *q_norm = nullptr, *k_norm = nullptr;    // (head_dim), qk_norm only
  WeightView wo;                                       // (hidden, q_dim)
  const float* ffn_norm = nullptr;                     // (hidden)
  WeightView w_gate, w_up, w_down;                     // (inter, hidden) x2, (hidden, inter)
};

struct ModelWeights {
  WeightView tok_embeddings;  // (vocab, hidden)
  std::vector<LayerWeights> layers;
  const float* norm = nullptr;  // (hidden)
  WeightView output;            // (vocab, hidden); tok_embeddings when tied
};

struct SeqRef {
  const KVCache* prefix = nullptr;  // shared, read-only; nullptr = none
  KVCache* kv = nullptr;            // own rows; the new rows are appended here
  int n_tokens = 0;                 // rows of this call that belong to the sequence
};

class Model {
 public:
  // Scratch is sized for `max_tokens` rows per call (the prefill chunk or the decode batch).
  Model(const ModelDims& dims, ModelWeights weights, int max_tokens);
  ~Model();  // where Plan is complete

  const ModelDims& dims() const { return d_; }
  int max_tokens() const { return max_tokens_; }

  // tokens (N = sum of n_tokens); logits (n_logit_rows, vocab) for the listed rows, after the final
  // norm; dump_hidden (n_layers, N, hidden) receives each layer's output when not null. Throws
  // std::invalid_argument (before touching any KV) when the arguments do not fit.
  void forward(const std::int32_t* tokens, const SeqRef* seqs, int n_seqs, const std::int32_t* logit_rows,
               int n_logit_rows, float* logits, float* dump_hidden);

 private:
  struct Plan;  // per-call row bookkeeping
  void check(const SeqRef* seqs, int n_seqs, int N, const std::int32_t* logit_rows, int n_logit_rows) const;
  void attention_block(int layer, const Plan& p, ThreadPool& pool);
  void attend(int layer, const Plan& p, ThreadPool& pool);
  void mlp_block(int layer, int N, ThreadPool& pool);

  ModelDims d_;
  ModelWeights w_;
  int max_tokens_;
  std::mutex mu_;  // one forward at a time: the scratch below is shared
  std::unique_ptr<Plan> plan_;  // the row bookkeeping, refilled by every call

  // Scratch, allocated once; T = max_tokens_. On huge pages (pages.h): a prefill chunk's gate and
  // up rows are 10 MB each at Qwen2.5-0.5B's shapes.
  PageVector<float> x_;      // (T, hidden) residual stream
  PageVector<float> xn_;     // (T, hidden) normed input of a block
  PageVector<float> q_;      // (T, q_dim)
  PageVector<float> k_;      // (T, kv_dim)
  PageVector<float> v_;      // (T, kv_dim)
  PageVector<float> att_;    // (T, q_dim) attention output
  PageVector<float> lse_;    // (T, n_heads)
  PageVector<float> gq_;     // (T, q_dim) query rows of the prefix groups, gathered
  PageVector<float> gate_;   // (T, intermediate)
  PageVector<float> up_;     // (T, intermediate)
  std::vector<std::int32_t> pos_;   // (T) absolute positions
  std::vector<std::int32_t> gpos_;  // (T) positions of the gathered rows
  std::vector<std::int32_t> grow_;  // (T) row of each gathered row
  std::vector<std::int32_t> rows_;  // (T) 0, 1, ..., T-1
  PageVector<float> states_;  // attention states, (T, n_heads, blocks, head_dim + 8), grown with the context
  std::vector<AttnJob> jobs_;
};

}  // namespace seqshare
