// The KV cache of one sequence (or of one shared prefix), per layer and kv head, all allocated at
// construction, float16 bits (default) or float32:
//   V  (n_kv_heads, slots, head_dim)               a kv head's rows contiguous
//   K  (n_kv_heads, slots / 32, head_dim, 32)      tiles of 32 rows, transposed
// K is stored the way attention reads it -- 32 keys of one dimension side by side -- so a tile of
// keys is one contiguous 4 KiB block and needs no transposing. Row j of the cache sits in slot
// j + phase, with phase = (absolute position of row 0) % 32, so that tiles are the canonical
// attention tiles at absolute positions that are multiples of 32 (ops.h).
//
// An f16 cache may also keep its tiles as BF16 pairs, the operands the amx level's attention
// multiplies (attention_amx.cpp): without them every decode step converted every tile of a long
// document again. Per layer, kv head and 32-row tile: K pairs (D/2, 32) then V pairs (16, D),
// 32 D words, the same bytes as the tile's f16 rows, so such a cache takes twice the memory. Only
// tiles all of whose rows are valid are kept, and every write of rows forgets the tiles it
// touches (rows_changed()).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace seqshare {

constexpr int kKVTile = 32;  // rows per K tile; equals kAttnTile
// The head sizes the avx512 and amx attention multiplies as pair tiles (the others take the
// reference), and so the only ones a cache keeps pairs for.
inline bool pair_head_dim(int head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

class KVCache {
 public:
  // `slot`: a KV arena slot, reused for sequence after sequence (reset()). It gets room for row 0 at
  // any phase, and small pages only: a question's few rows touch every plane once, and with 2 MiB
  // pages each touch would cost 2 MiB. Other caches (a document's rows, read whole by every decode
  // step) ask for transparent huge pages.
  // `pairs`: keep the BF16 pair tiles too (f16 only).
  KVCache(int n_layers, int n_kv_heads, int head_dim, int capacity, bool f16, int phase = 0, bool slot = false,
          bool pairs = false);
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
  // Bytes allocated: the rows' and, where kept, the pair tiles'.
  std::size_t nbytes() const { return rows_bytes() * (pairs_ ? 2 : 1); }
  std::size_t used_bytes() const { return 2 * static_cast<std::size_t>(n_layers_) * length_ * kv_dim() * elem_bytes(); }

  void* k(int layer) { return base_ + (2 * static_cast<std::size_t>(layer)) * plane_bytes(); }
  void* v(int layer) { return base_ + (2 * static_cast<std::size_t>(layer) + 1) * plane_bytes(); }
  const void* k(int layer) const { return base_ + (2 * static_cast<std::size_t>(layer)) * plane_bytes(); }
  const void* v(int layer) const { return base_ + (2 * static_cast<std::size_t>(layer) + 1) * plane_bytes(); }

  // The pair tiles of one layer (null where not kept): kv head h's tile i at
  // pairs(layer) + (h * slots / 32 + i) * 32 * head_dim words. Those before paired(layer) hold the
  // current rows; the ones from there on are filled by stage_pairs() (ops.h) before attention
  // reads them. Logically part of the rows, hence writable through a const cache.
  std::uint32_t* pairs(int layer) const {
    return pairs_ ? reinterpret_cast<std::uint32_t*>(pairs_ + static_cast<std::size_t>(layer) * 2 * plane_bytes())
                  : nullptr;
  }
  int& paired(int layer) const { return paired_[layer]; }
  // Rows from `row` on of one layer were (re)written: their tiles' pairs are no longer current.
  void rows_changed(int layer, int row) const {
    paired_[layer] = std::min(paired_[layer], (row + phase_) / kKVTile);
  }

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
  std::size_t rows_bytes() const { return 2 * static_cast<std::size_t>(n_layers_) * plane_bytes(); }
  void all_rows_changed(int row) const {
    for (int l = 0; l < n_layers_; ++l) rows_changed(l, row);
  }
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
  std::uint8_t* pairs_ = nullptr;  // (n_layers, n_kv_heads, slots / 32, 32 head_dim) words, or null
  mutable std::vector<int> paired_;  // per layer: its pair tiles [0, paired) are current
};

}  // namespace seqshare
