// The KV cache of one sequence (or of one shared prefix): per layer, K and V rows of
// (capacity, n_kv_heads * head_dim) stored as float16 bits (default) or float32, all allocated at
// construction. Rows [0, length) are valid; positions of the rows are decided by the model.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace seqshare {

class KVCache {
 public:
  KVCache(int n_layers, int kv_dim, int capacity, bool f16);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int n_layers() const { return n_layers_; }
  int kv_dim() const { return kv_dim_; }
  int capacity() const { return capacity_; }
  int length() const { return length_; }
  bool f16() const { return f16_; }
  std::size_t elem_bytes() const { return f16_ ? 2 : 4; }
  std::size_t row_bytes() const { return static_cast<std::size_t>(kv_dim_) * elem_bytes(); }
  std::size_t nbytes() const { return 2 * static_cast<std::size_t>(n_layers_) * capacity_ * row_bytes(); }
  std::size_t used_bytes() const { return 2 * static_cast<std::size_t>(n_layers_) * length_ * row_bytes(); }

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
  // Append the valid rows of `other` (same layers, width and dtype) after this cache's rows.
  void append(const KVCache& other);

  // Raw bytes of the valid rows, layer by layer: K rows then V rows (used_bytes() in total).
  void export_to(void* dst) const;
  // Replace the contents with `length` rows in export_to()'s layout (`bytes` must match).
  void import_from(const void* src, std::size_t bytes, int length);
  // Valid rows of one layer's K (which = 0) or V (which = 1) as float32: dst (length, kv_dim).
  void rows_f32(int layer, int which, float* dst) const;

 private:
  std::size_t plane_bytes() const { return static_cast<std::size_t>(capacity_) * row_bytes(); }
  int n_layers_, kv_dim_, capacity_, length_ = 0;
  bool f16_;
  std::uint8_t* base_ = nullptr;  // (n_layers, 2 [K, V], capacity, kv_dim) elements
};

}  // namespace seqshare
