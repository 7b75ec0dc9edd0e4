// The forward pass, top to bottom: embed -> per layer (attention block, MLP block) -> final norm ->
// logits for the requested rows only. Every op comes from ops.h; this file only orders them and
// keeps the row bookkeeping of a batch of sequences.
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace seqshare {

// Kept by the model and refilled by every call: its vectors keep their capacity, so a decode step
// allocates nothing.
struct Model::Plan {
  const SeqRef* seqs = nullptr;
  int n_seqs = 0, N = 0;
  std::vector<int> row0;  // (n_seqs) first row of each sequence
  std::vector<int> past;  // (n_seqs) own KV length before this call
  std::vector<int> pre;   // (n_seqs) prefix length (0 without one)
  std::vector<const KVCache*> prefixes;     // distinct prefixes, in first-seen order
  std::vector<std::vector<int>> members;    // (>= prefixes) sequence indices of each group; the first
                                            // prefixes.size() are this call's

  void reset(const SeqRef* s, int n, int total) {
    seqs = s, n_seqs = n, N = total;
    row0.clear(), past.clear(), pre.clear(), prefixes.clear();
    for (auto& m : members) m.clear();
  }
};

namespace {
PageVector<float> scratch(int rows, int cols) {
  return PageVector<float>(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols));
}
std::string str(int v) { return std::to_string(v); }
}  // namespace

Model::Model(const ModelDims& dims, ModelWeights weights, int max_tokens)
    : d_(dims), w_(std::move(weights)), max_tokens_(max_tokens), plan_(std::make_unique<Plan>()) {
  if (max_tokens <= 0) throw std::invalid_argument("model: max_tokens must be positive");
  if (d_.n_kv_heads <= 0 || d_.n_heads % d_.n_kv_heads)
    throw std::invalid_argument("model: n_heads must be a multiple of n_kv_heads");
  if (static_cast<int>(w_.layers.size()) != d_.n_layers) throw std::invalid_argument("model: layer count mismatch");
  const int T = max_tokens;
  x_ = scratch(T, d_.hidden);
  xn_ = scratch(T, d_.hidden);
  q_ = scratch(T, d_.q_dim());
  k_ = scratch(T, d_.kv_dim());
  v_ = scratch(T, d_.kv_dim());
  att_ = scratch(T, d_.q_dim());
  lse_ = scratch(T, d_.n_heads);
  gq_ = scratch(T, d_.q_dim());
  gate_ = scratch(T, d_.intermediate);
  up_ = scratch(T, d_.intermediate);
  pos_.resize(T);
  gpos_.resize(T);
  grow_.resize(T);
  rows_.resize(T);
  for (int r = 0; r < T; ++r) rows_[r] = r;
}

void Model::check(const SeqRef* seqs, int n_seqs, int N, const std::int32_t* logit_rows, int n_logit_rows) const {
  if (n_seqs <= 0) throw std::invalid_argument("forward: no sequences");
  if (N > max_tokens_)
    throw std::invalid_argument("forward: " + str(N) + " rows exceed the scratch size of " + str(max_tokens_));
  if (n_logit_rows > max_tokens_) throw std::invalid_argument("forward: too many logit rows");
  for (int s = 0; s < n_seqs; ++s) {
    const SeqRef& q = seqs[s];
    if (!q.kv || q.n_tokens <= 0) throw std::invalid_argument("forward: sequence " + str(s) + " has no KV or no tokens");
    for (const KVCache* c : {static_cast<const KVCache*>(q.kv), q.prefix}) {
      if (c && (c->n_layers() != d_.n_layers || c->n_kv_heads() != d_.n_kv_heads || c->head_dim() != d_.head_dim))
        throw std::invalid_argument("forward: a KV of sequence " + str(s) + " does not match the model's shape");
    }
    if (q.prefix == q.kv) throw std::invalid_argument("forward: a sequence's prefix is its own KV");
    const int start = q.prefix ? q.prefix->length() : 0;  // absolute position of the KV's row 0
    if (q.prefix && q.prefix->phase() != 0) throw std::invalid_argument("forward: a prefix KV must start at position 0");
    if (q.kv->phase() != start % kKVTile)
      throw std::invalid_argument("forward: the KV of sequence " + str(s) + " has phase " + str(q.kv->phase()) +
                                  " but its rows start at position " + str(start) + ": create it with that start");
    if (q.kv->length() + q.n_tokens > q.kv->capacity())
      throw std::invalid_argument("forward: sequence " + str(s) + " needs " + str(q.kv->length() + q.n_tokens) +
                                  " KV rows, capacity is " + str(q.kv->capacity()));
    for (int t = 0; t < s; ++t)
      if (seqs[t].kv == q.kv || seqs[t].prefix == q.kv)
        throw std::invalid_argument("forward: a KV is written by two sequences of one call");
  }
  for (int i = 0; i < n_logit_rows; ++i)
    if (logit_rows[i] < 0 || logit_rows[i] >= N) throw std::invalid_argument("forward: logit row out of range");
}

Model::~Model() = default;

void Model::forward(const std::int32_t* tokens, const SeqRef* seqs, int n_seqs, const std::int32_t* logit_rows,
                    int n_logit_rows, float* logits, float* dump_hidden) {
  std::lock_guard<std::mutex> lock(mu_);
  int N = 0;
  for (int s = 0; s < n_seqs; ++s) N += seqs[s].n_tokens;
  check(seqs, n_seqs, N, logit_rows, n_logit_rows);
  ThreadPool& pool = global_pool();

  Plan& p = *plan_;
  p.reset(seqs, n_seqs, N);
  for (int s = 0, r = 0; s < n_seqs; r += seqs[s].n_tokens, ++s) {
    const KVCache* pre = seqs[s].prefix;
    p.row0.push_back(r);
    p.past.push_back(seqs[s].kv->length());
    p.pre.push_back(pre ? pre->length() : 0);
    for (int i = 0; i < seqs[s].n_tokens; ++i) pos_[r + i] = p.pre[s] + p.past[s] + i;
    if (!pre || pre->length() == 0) continue;
    std::size_t g = 0;
    while (g < p.prefixes.size() && p.prefixes[g] != pre) ++g;
    if (g == p.prefixes.size()) {
      p.prefixes.push_back(pre);
      if (p.members.size() < p.prefixes.size()) p.members.emplace_back();
    }
    p.members[g].push_back(s);
  }

  const std::size_t H = static_cast<std::size_t>(d_.hidden);
  embedding(w_.tok_embeddings, tokens, N, x_.data(), pool);
  for (int l = 0; l < d_.n_layers; ++l) {
    attention_block(l, p, pool);
    mlp_block(l, N, pool);
    if (dump_hidden) std::memcpy(dump_hidden + l * N * H, x_.data(), N * H * sizeof(float));
  }
  for (int s = 0; s < n_seqs; ++s) seqs[s].kv->advance(seqs[s].n_tokens);
  if (n_logit_rows == 0) return;

  // Logits only where asked: the final norm and the vocabulary projection of those rows.
  for (int i = 0; i < n_logit_rows; ++i)
    std::memcpy(xn_.data() + i * H, x_.data() + logit_rows[i] * H, H * sizeof(float));
  rmsnorm(xn_.data(), w_.norm, d_.norm_eps, n_logit_rows, d_.hidden, xn_.data(), pool);
  linear(w_.output, xn_.data(), n_logit_rows, logits, pool);
}

void Model::attention_block(int layer, const Plan& p, ThreadPool& pool) {
  const LayerWeights& L = w_.layers[layer];
  const int N = p.N, qd = d_.q_dim(), kvd = d_.kv_dim();
  rmsnorm(x_.data(), L.attn_norm, d_.norm_eps, N, d_.hidden, xn_.data(), pool);
  const WeightView qkv[3] = {L.wq, L.wk, L.wv};
  float* const qkv_out[3] = {q_.data(), k_.data(), v_.data()};
  linear_many(qkv, qkv_out, 3, xn_.data(), N, pool);
  if (d_.qkv_bias) {
    add_rows(q_.data(), L.bq, N, qd, pool);
    add_rows(k_.data(), L.bk, N, kvd, pool);
    add_rows(v_.data(), L.bv, N, kvd, pool);
  }
  if (d_.qk_norm) {  // Qwen3: RMSNorm of every head's vector before the rotation
    rmsnorm(q_.data(), L.q_norm, d_.norm_eps, N * d_.n_heads, d_.head_dim, q_.data(), pool);
    rmsnorm(k_.data(), L.k_norm, d_.norm_eps, N * d_.n_kv_heads, d_.head_dim, k_.data(), pool);
  }
  rope(q_.data(), d_.n_heads, k_.data(), d_.n_kv_heads, N, d_.head_dim, pos_.data(), d_.rope_theta, pool);
  for (int s = 0; s < p.n_seqs; ++s) {
    KVCache* kv = p.seqs[s].kv;
    const std::size_t r = static_cast<std::size_t>(p.row0[s]) * kvd;
    kv_store(*kv, layer, p.past[s], k_.data() + r, v_.data() + r, p.seqs[s].n_tokens);
  }
  attend(layer, p, pool);
  linear(L.wo, att_.data(), N, xn_.data(), pool);
  add_inplace(x_.data(), xn_.data(), static_cast<std::size_t>(N) * d_.hidden, pool);
}

// Attention of every row, in two phases over the canonical blocks (ops.h):
//   group phase     the rows of all sequences sharing a prefix, gathered, over the prefix's keys up
//                   to its last whole tile: the prefix is read once per layer for all of them
//   sequence phase  each sequence over the rest: the prefix's last partial tile, then its own rows,
//                   resuming the block the group phase left half done
// then one fold per row. The result is bit for bit the one of a single KV holding prefix and rows.
void Model::attend(int layer, const Plan& p, ThreadPool& pool) {
  const int H = d_.n_heads, D = d_.head_dim, qd = d_.q_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int max_pos = 0;
  for (int r = 0; r < p.N; ++r) max_pos = std::max(max_pos, pos_[r]);
  AttnStates st{nullptr, H, D, max_pos / kAttnBlock + 1};
  states_.resize(st.floats(p.N) + 8);
  st.data = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(states_.data()) + 31) & ~std::uintptr_t(31));
  auto own_span = [&](int s) { return kv_span(*p.seqs[s].kv, layer, p.past[s] + p.seqs[s].n_tokens, p.pre[s]); };
  auto prefix_span = [&](const KVCache* pre) { return kv_span(*pre, layer, pre->length(), 0); };
  auto split_of = [](int prefix_len) { return prefix_len - prefix_len % kAttnTile; };

  std::vector<AttnJob>& jobs = jobs_;
  jobs.clear();
  int G = 0;  // gathered rows so far
  for (std::size_t g = 0; g < p.prefixes.size(); ++g) {
    const KVCache* pre = p.prefixes[g];
    AttnJob job;
    job.q = gq_.data() + static_cast<std::size_t>(G) * qd;
    job.q_pos = gpos_.data() + G;
    job.state_row = grow_.data() + G;
    for (int s : p.members[g]) {
      const int r = p.row0[s], n = p.seqs[s].n_tokens;
      std::memcpy(gq_.data() + static_cast<std::size_t>(G) * qd, q_.data() + static_cast<std::size_t>(r) * qd,
                  static_cast<std::size_t>(n) * qd * sizeof(float));
      for (int i = 0; i < n; ++i) {
        gpos_[G + i] = pos_[r + i];
        grow_[G + i] = r + i;
      }
      G += n;
      job.N += n;
    }
    job.keys.span[0] = prefix_span(pre);
    job.p_end = split_of(pre->length());
    if (job.p_end > 0) jobs.push_back(job);
  }
  if (!jobs.empty()) attention_states(jobs.data(), static_cast<int>(jobs.size()), d_.n_kv_heads, scale, st, pool);

  jobs.clear();
  for (int s = 0; s < p.n_seqs; ++s) {
    const int r = p.row0[s];
    AttnJob job;
    job.q = q_.data() + static_cast<std::size_t>(r) * qd;
    job.q_pos = pos_.data() + r;
    job.state_row = rows_.data() + r;
    job.N = p.seqs[s].n_tokens;
    const KVCache* pre = p.seqs[s].prefix;
    if (pre && pre->length() > 0) {
      job.keys.span[0] = prefix_span(pre);
      job.keys.span[1] = own_span(s);
      job.keys.n = 2;
      job.p_begin = split_of(pre->length());
      job.continues = true;  // block_keys() resumes only a block the range enters after its start
    } else {
      job.keys.span[0] = own_span(s);
    }
    job.p_end = p.pre[s] + p.past[s] + p.seqs[s].n_tokens;
    jobs.push_back(job);
  }
  attention_states(jobs.data(), static_cast<int>(jobs.size()), d_.n_kv_heads, scale, st, pool);
  attention_fold(st, pos_.data(), p.N, 0, att_.data(), lse_.data(), pool);
}

void Model::mlp_block(int layer, int N, ThreadPool& pool) {
  const LayerWeights& L = w_.layers[layer];
  rmsnorm(x_.data(), L.ffn_norm, d_.norm_eps, N, d_.hidden, xn_.data(), pool);
  const WeightView gate_up[2] = {L.w_gate, L.w_up};
  float* const gate_up_out[2] = {gate_.data(), up_.data()};
  linear_many(gate_up, gate_up_out, 2, xn_.data(), N, pool);
  silu_mul(gate_.data(), up_.data(), static_cast<std::size_t>(N) * d_.intermediate, pool);
  linear(L.w_down, gate_.data(), N, xn_.data(), pool);
  add_inplace(x_.data(), xn_.data(), static_cast<std::size_t>(N) * d_.hidden, pool);
}

}  // namespace seqshare
