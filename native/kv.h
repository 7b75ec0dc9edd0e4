// The KV cache of one sequence (or of one shared prefix), per layer and kv head, all allocated at
// construction, float16 bits (default) or float32:
//   V  (n_kv_heads, slots, head_dim)               a kv head's rows contiguous
//   K  (n_kv_heads, slots / 32, head_dim, 32)      tiles of 32 rows, transposed
// K is stored the way attention reads it -- 32 keys of one dimension side by side -- so a tile of
// keys is one contiguous 4 KiB block and needs no transposing. Row j of the cache sits in slot
// j + phase, with phase = (absolute position of row 0) % 32, so that tiles are the canonical
// attention tiles at absolute positions that are multiples of 32 (ops.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace seqshare {

constexpr int kKVTile = 32;  // rows per K tile; equals kAttnTile

class KVCache {
 public:
  // `slot`: a KV arena slot, reused for sequence after sequence (reset()). It gets room for row 0 at
  // any phase, and small pages only: a question's few rows touch every plane once, and with 2 MiB
  // pages each touch would cost 2 MiB. Other caches (a document's rows, read whole by every decode
  // step) ask for transparent huge pages.
  KVCache(int n_layers, int n_kv_heads, int head_dim, int capacity, bool f16, int phase = 0, bool slot = false);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int kv_dim() const { return n_kv_heads_ * head_dim_; }
  int capacity() const { return capacity_; }
  int length() const { return length_; }
  int phase() const { return phase_; }
  bool f16() const { return f16_; }
  std::size_t elem_bytes() const { return f16_ ? 2 : 4; }
  // Elements between consecutive kv heads of one plane (K or V).
  std::size_t head_stride() const { return static_cast<std::size_t>(slots_) * head_dim_; }
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
  // Empty the cache for a new sequence whose row 0 sits at `phase` in its K tile, without
  // reallocating (the KV arena's slots): needs capacity + phase <= the allocated slots. Old rows
  // stay in memory but are never read: attention reads rows [0, length) only.
  void reset(int phase);
  // A new cache with this one's valid rows and phase and room for `capacity` rows (>= length).
  std::unique_ptr<KVCache> copy(int capacity) const;
  // Append the valid rows of `other` (same layers, heads, width and dtype) after this cache's rows.
  void append(const KVCache& other);

  // Raw bytes of the valid rows: per layer, K then V, each kv head's rows in turn, row by row
  // (head_dim elements each), whatever the storage: used_bytes() in total.
  void export_to(void* dst) const;
  // Replace the contents with `length` rows in export_to()'s layout (`bytes` must match).
  void import_from(const void* src, std::size_t bytes, int length);
  // Valid rows of one layer's K (which = 0) or V (which = 1) as float32: dst (length, kv_dim).
  void rows_f32(int layer, int which, float* dst) const;

  // Element index of (row, kv head, d) in a K or V plane.
  std::size_t k_index(int row, int h, int d) const {
    const std::size_t s = static_cast<std::size_t>(row + phase_);
    return h * head_stride() + (s / kKVTile) * (static_cast<std::size_t>(head_dim_) * kKVTile) + d * kKVTile + s % kKVTile;
  }
  std::size_t v_index(int row, int h, int d) const {
    return h * head_stride() + static_cast<std::size_t>(row + phase_) * head_dim_ + d;
  }

 private:
  std::size_t plane_bytes() const { return head_stride() * n_kv_heads_ * elem_bytes(); }
  // Rows [0, length) between the export layout in `bytes` and the storage: into the storage when
  // `bytes` is const (import_from), out of it otherwise (export_to).
  template <class Bytes>
  void move_rows(Bytes* bytes, int length) const;
  // Copy `n` rows of every layer and plane from `src` (row s0) to `dst` (row d0).
  static void copy_rows(const KVCache& src, int s0, KVCache& dst, int d0, int n);
  // One element of row `row` of a K (which = 0) or V plane as raw bytes.
  std::size_t elem_offset(int which, int row, int h, int d) const {
    return (which ? v_index(row, h, d) : k_index(row, h, d)) * elem_bytes();
  }
  int n_layers_, n_kv_heads_, head_dim_, capacity_, phase_, slots_, length_ = 0;
  bool f16_;
  std::uint8_t* base_ = nullptr;  // (n_layers, 2 [K, V], n_kv_heads, slots, head_dim) elements
};

}  // namespace seqshare
