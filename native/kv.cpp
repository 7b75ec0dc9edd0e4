// KV cache storage. One allocation per cache; growing copies the valid rows only.
#include "kv.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "half.h"
#include "pages.h"
#include "threadpool.h"

namespace seqshare {

KVCache::KVCache(int n_layers, int n_kv_heads, int head_dim, int capacity, bool f16, int phase, bool slot,
                 bool pairs)
    : n_layers_(n_layers),
      n_kv_heads_(n_kv_heads),
      head_dim_(head_dim),
      capacity_(capacity),
      phase_(phase),
      slots_((capacity + (slot ? kKVTile - 1 : phase) + kKVTile - 1) / kKVTile * kKVTile),
      f16_(f16),
      paired_(n_layers > 0 ? n_layers : 0, 0) {
  if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || capacity < 0)
    throw std::invalid_argument("KV: n_layers, n_kv_heads and head_dim must be positive and capacity >= 0");
  if (phase < 0 || phase >= kKVTile) throw std::invalid_argument("KV: phase must be in 0..31");
  if (pairs && !f16) throw std::invalid_argument("KV: BF16 pair tiles are kept for an f16 cache only");
  if (pairs && !pair_head_dim(head_dim))
    throw std::invalid_argument("KV: BF16 pair tiles are kept for head_dim 32, 64 or 128 only, not " +
                                std::to_string(head_dim));
  base_ = static_cast<std::uint8_t*>(alloc_pages(rows_bytes(), !slot));
  try {
    if (pairs) pairs_ = static_cast<std::uint8_t*>(alloc_pages(rows_bytes(), !slot));
  } catch (...) {
    std::free(base_);  // a constructor that throws runs no destructor
    throw;
  }
}

KVCache::~KVCache() {
  std::free(base_);
  std::free(pairs_);
}

void KVCache::truncate(int length) {
  if (length < 0 || length > length_)
    throw std::invalid_argument("KV: cannot truncate to " + std::to_string(length) + " rows (has " +
                                std::to_string(length_) + ")");
  length_ = length;
  all_rows_changed(length);
}

void KVCache::advance(int n) {
  if (n < 0 || length_ + n > capacity_) throw std::invalid_argument("KV: advance past capacity");
  length_ += n;
}

void KVCache::reserve(int capacity) {
  if (capacity <= capacity_) return;
  KVCache bigger(n_layers_, n_kv_heads_, head_dim_, capacity, f16_, phase_, false, pairs_ != nullptr);
  bigger.append(*this);
  std::swap(base_, bigger.base_);
  std::swap(pairs_, bigger.pairs_);
  std::swap(paired_, bigger.paired_);
  std::swap(capacity_, bigger.capacity_);
  std::swap(slots_, bigger.slots_);
}

void KVCache::reset(int phase) {
  if (phase < 0 || phase >= kKVTile || capacity_ + phase > slots_)
    throw std::invalid_argument("KV: cannot reset to phase " + std::to_string(phase) + " (" + std::to_string(capacity_) +
                                " rows in " + std::to_string(slots_) + " slots)");
  phase_ = phase;
  length_ = 0;
  all_rows_changed(0);
}

std::unique_ptr<KVCache> KVCache::copy(int capacity) const {
  if (capacity < length_) throw std::invalid_argument("KV: copy capacity below the valid length");
  auto c = std::make_unique<KVCache>(n_layers_, n_kv_heads_, head_dim_, capacity, f16_, phase_, false,
                                     pairs_ != nullptr);
  c->append(*this);
  return c;
}

// V rows are contiguous per head; K rows are strided inside tiles, and whole tiles can be copied
// when both caches put the rows at the same lane (the common case: a copy of a cache). A first
// tile the rows enter mid-way goes row by row: its lanes before them hold the destination's rows.
// Each (layer, kv head) is its own range of both caches, so they run on the pool as export does:
// a copy of 6000 rows of the default model took 17.5-22.1 ms on one thread, 12.6-13.5 on two
// (Zen 4, best of 8 per round, three rounds).
void KVCache::copy_rows(const KVCache& src, int s0, KVCache& dst, int d0, int n) {
  if (n <= 0) return;
  dst.all_rows_changed(d0);
  const std::size_t eb = src.elem_bytes(), D = static_cast<std::size_t>(src.head_dim_);
  const int lane = (d0 + dst.phase_) % kKVTile;
  const bool same_lanes = (s0 + src.phase_) % kKVTile == lane;
  const int by_row = same_lanes ? (lane ? std::min(n, kKVTile - lane) : 0) : n;  // rows copied one by one
  const int H = src.n_kv_heads_;
  global_pool().parallel_for(src.n_layers_ * H, 1, [&](int b0, int b1) {
    for (int b = b0; b < b1; ++b) {
      const int l = b / H, h = b % H;
      const auto* sk = static_cast<const std::uint8_t*>(src.k(l));
      const auto* sv = static_cast<const std::uint8_t*>(src.v(l));
      auto* dk = static_cast<std::uint8_t*>(dst.k(l));
      auto* dv = static_cast<std::uint8_t*>(dst.v(l));
      std::memcpy(dv + dst.elem_offset(1, d0, h, 0), sv + src.elem_offset(1, s0, h, 0), n * D * eb);
      for (int r = 0; r < by_row; ++r)
        for (int d = 0; d < src.head_dim_; ++d)
          std::memcpy(dk + dst.elem_offset(0, d0 + r, h, d), sk + src.elem_offset(0, s0 + r, h, d), eb);
      if (by_row < n) {  // the tiles holding the other rows, lanes past the last row included
        const int first = (s0 + by_row + src.phase_) / kKVTile, last = (s0 + n - 1 + src.phase_) / kKVTile;
        const std::size_t tile = D * kKVTile * eb;
        const std::size_t sfirst = h * src.head_stride() * eb + first * tile;
        const std::size_t dfirst = h * dst.head_stride() * eb + ((d0 + by_row + dst.phase_) / kKVTile) * tile;
        std::memcpy(dk + dfirst, sk + sfirst, (last - first + 1) * tile);
      }
    }
  });
}

void KVCache::append(const KVCache& other) {
  if (other.n_layers_ != n_layers_ || other.n_kv_heads_ != n_kv_heads_ || other.head_dim_ != head_dim_ ||
      other.f16_ != f16_)
    throw std::invalid_argument("KV: append needs the same layers, heads, width and dtype");
  if (&other == this) throw std::invalid_argument("KV: cannot append a cache to itself");
  if (length_ + other.length_ > capacity_)
    throw std::invalid_argument("KV: append of " + std::to_string(other.length_) + " rows exceeds capacity " +
                                std::to_string(capacity_) + " (has " + std::to_string(length_) + ")");
  copy_rows(other, 0, *this, length_, other.length_);
  length_ += other.length_;
}

namespace {

// K rows [0, n) of one kv head, between rows (n x D, the export layout) and the cache's transposed
// 32-row tiles, a tile at a time: a tile and its rows are 4-8 KiB each, so both stay in L1 while
// one is scattered into the other. Copying element by element through k_index ran at 0.2-0.3 GB/s,
// and a document restored from the spill directory waited on it. Tiles and Rows: the element's
// bits (uint16_t or uint32_t), const on the side that is read.
template <bool ToTiles, class Tiles, class Rows>
void k_head_rows(Tiles* tiles, Rows* rows, int phase, int n, int D) {
  for (int r0 = 0; r0 < n;) {
    const int lane0 = (r0 + phase) % kKVTile, count = std::min(kKVTile - lane0, n - r0);
    Tiles* tile = tiles + static_cast<std::size_t>((r0 + phase) / kKVTile) * D * kKVTile + lane0;
    Rows* row = rows + static_cast<std::size_t>(r0) * D;
    for (int d = 0; d < D; ++d)
      for (int i = 0; i < count; ++i) {
        if constexpr (ToTiles)
          tile[d * kKVTile + i] = row[static_cast<std::size_t>(i) * D + d];
        else
          row[static_cast<std::size_t>(i) * D + d] = tile[d * kKVTile + i];
      }
    r0 += count;
  }
}

template <class E, class Bytes>
auto as(Bytes* p) {
  if constexpr (std::is_const_v<Bytes>)
    return reinterpret_cast<const E*>(p);
  else
    return reinterpret_cast<E*>(p);
}

}  // namespace

// Export and import run every (layer, plane, kv head) block on the pool: each is its own range of
// the export layout, so the blocks are independent. Bytes: const std::uint8_t (import: read into
// the storage) or std::uint8_t (export).
template <class Bytes>
void KVCache::move_rows(Bytes* bytes, int length) const {
  constexpr bool kImport = std::is_const_v<Bytes>;
  const std::size_t eb = elem_bytes(), n = static_cast<std::size_t>(length) * head_dim_ * eb;
  global_pool().parallel_for(2 * n_layers_ * n_kv_heads_, 1, [&](int b0, int b1) {
    for (int b = b0; b < b1; ++b) {
      const int which = (b / n_kv_heads_) % 2, h = b % n_kv_heads_;
      // base_ points at writable storage even here: only an import (a non-const caller) writes.
      std::uint8_t* plane = base_ + static_cast<std::size_t>(b / n_kv_heads_) * plane_bytes();
      Bytes* rows = bytes + b * n;
      if (which) {  // V rows are stored as exported
        std::uint8_t* stored = plane + elem_offset(1, 0, h, 0);
        if constexpr (kImport)
          std::memcpy(stored, rows, n);
        else
          std::memcpy(rows, stored, n);
      } else if (f16_) {
        k_head_rows<kImport>(reinterpret_cast<std::uint16_t*>(plane) + h * head_stride(), as<std::uint16_t>(rows),
                             phase_, length, head_dim_);
      } else {
        k_head_rows<kImport>(reinterpret_cast<std::uint32_t*>(plane) + h * head_stride(), as<std::uint32_t>(rows),
                             phase_, length, head_dim_);
      }
    }
  });
}

void KVCache::export_to(void* dst) const { move_rows(static_cast<std::uint8_t*>(dst), length_); }

void KVCache::import_from(const void* src, std::size_t bytes, int length) {
  if (length < 0 || length > capacity_)
    throw std::invalid_argument("KV: import of " + std::to_string(length) + " rows exceeds capacity " +
                                std::to_string(capacity_));
  const std::size_t want = 2 * static_cast<std::size_t>(length) * head_dim_ * elem_bytes() * n_kv_heads_ * n_layers_;
  if (bytes != want)
    throw std::invalid_argument("KV: import expects " + std::to_string(want) + " bytes, got " + std::to_string(bytes));
  move_rows(static_cast<const std::uint8_t*>(src), length);
  length_ = length;
  all_rows_changed(0);
}

void KVCache::rows_f32(int layer, int which, float* dst) const {
  if (layer < 0 || layer >= n_layers_) throw std::invalid_argument("KV: layer out of range");
  const void* plane = which == 0 ? k(layer) : v(layer);
  const int D = head_dim_, kvd = kv_dim();
  for (int h = 0; h < n_kv_heads_; ++h)
    for (int r = 0; r < length_; ++r)
      for (int d = 0; d < D; ++d) {
        const std::size_t i = which ? v_index(r, h, d) : k_index(r, h, d);
        dst[static_cast<std::size_t>(r) * kvd + h * D + d] =
            f16_ ? f16_to_f32(static_cast<const std::uint16_t*>(plane)[i]) : static_cast<const float*>(plane)[i];
      }
}

}  // namespace seqshare
