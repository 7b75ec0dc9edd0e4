// The KV cache of one sequence (or of one shared prefix): per layer, K and V as (n_kv_heads,
// capacity, head_dim) -- the rows of one kv head contiguous, so attention reads each head's keys
// as one stream -- stored as float16 bits (default) or float32, all allocated at construction.
// Rows [0, length) are valid; positions of the rows are decided by the model.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace seqshare {

class KVCache {
 public:
  KVCache(int n_layers, int n_kv_heads, int head_dim, int capacity, bool f16);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int kv_dim() const { return n_kv_heads_ * head_dim_; }
  int capacity() const { return capacity_; }
  int length() const { return length_; }
  bool f16() const { return f16_; }
  std::size_t elem_bytes() const { return f16_ ? 2 : 4; }
  // Elements between the same row of consecutive kv heads of one plane.
  std::size_t head_stride() const { return static_cast<std::size_t>(capacity_) * head_dim_; }
  std::size_t nbytes() const { return 2 * static_cast<std::size_t>(n_layers_) * plane_bytes(); }
  std::size_t used_bytes() const { return 2 * static_cast<std::size_t>(n_layers_) * length_ * kv_dim() * elem_bytes(); }

  void* k(int layer) { return base_ + (2 * static_cast<std::size_t>(layer)) * plane_bytes(); }
  void* v(int layer) { return base_ + (2 * static_cast<std::size_t>(layer) + 1) * plane_bytes(); }
  const void* k(int layer) const { return base_ + (2 * static_cast<std::size_t>(layer)) * plane_bytes(); }
  const void* v(int layer) const { return base_ + (2 * static_cast<std::size_t>(layer) + 1) * plane_bytes(); }

  // Forget rows from `length` on (length <= current length).
  void truncate(int length);
  // Mark `n` more rows valid after the model wrote them.
  void advance(int n);
  // Grow the allocation to `capacity` rows, keeping the valid rows.
  void reserve(int capacity);
  // A new cache with this one's valid rows and room for `capacity` rows (>= length).
  std::unique_ptr<KVCache> copy(int capacity) const;
  // Append the valid rows of `other` (same layers, heads, width and dtype) after this cache's rows.
  void append(const KVCache& other);

  // Raw bytes of the valid rows: per layer, K then V, each kv head's rows in turn (used_bytes()).
  void export_to(void* dst) const;
  // Replace the contents with `length` rows in export_to()'s layout (`bytes` must match).
  void import_from(const void* src, std::size_t bytes, int length);
  // Valid rows of one layer's K (which = 0) or V (which = 1) as float32: dst (length, kv_dim).
  void rows_f32(int layer, int which, float* dst) const;

 private:
  std::size_t plane_bytes() const { return head_stride() * n_kv_heads_ * elem_bytes(); }
  // Copy `n` rows of every layer, plane and head from `src` (row s0) to `dst` (row d0).
  static void copy_rows(const KVCache& src, int s0, KVCache& dst, int d0, int n);
  int n_layers_, n_kv_heads_, head_dim_, capacity_, length_ = 0;
  bool f16_;
  std::uint8_t* base_ = nullptr;  // (n_layers, 2 [K, V], n_kv_heads, capacity, head_dim) elements
};

}  // namespace seqshare
