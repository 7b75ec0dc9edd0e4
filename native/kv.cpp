// KV cache storage. One allocation per cache; growing copies the valid rows only.
#include "kv.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "half.h"

namespace seqshare {

namespace {
std::uint8_t* alloc_bytes(std::size_t n) {
  // Untouched pages stay unbacked, so a large capacity costs address space, not memory. A cache of
  // 2 MiB or more asks for transparent huge pages: decode attention reads every row of a long
  // context once per token, and with 4 KiB pages the TLB misses (nested paging in a VM) halve the
  // bandwidth it gets.
  constexpr std::size_t kHuge = 2u << 20;
  if (n >= kHuge) {
    const std::size_t rounded = (n + kHuge - 1) & ~(kHuge - 1);
    void* p = std::aligned_alloc(kHuge, rounded);
    if (!p) throw std::bad_alloc();
    madvise(p, rounded, MADV_HUGEPAGE);
    return static_cast<std::uint8_t*>(p);
  }
  const std::size_t rounded = (n + 63) & ~static_cast<std::size_t>(63);
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  return static_cast<std::uint8_t*>(p);
}
}  // namespace

KVCache::KVCache(int n_layers, int kv_dim, int capacity, bool f16)
    : n_layers_(n_layers), kv_dim_(kv_dim), capacity_(capacity), f16_(f16) {
  if (n_layers <= 0 || kv_dim <= 0 || capacity < 0)
    throw std::invalid_argument("KV: n_layers and kv_dim must be positive and capacity >= 0");
  base_ = alloc_bytes(nbytes());
}

KVCache::~KVCache() { std::free(base_); }

void KVCache::truncate(int length) {
  if (length < 0 || length > length_)
    throw std::invalid_argument("KV: cannot truncate to " + std::to_string(length) + " rows (has " +
                                std::to_string(length_) + ")");
  length_ = length;
}

void KVCache::advance(int n) {
  if (n < 0 || length_ + n > capacity_) throw std::invalid_argument("KV: advance past capacity");
  length_ += n;
}

void KVCache::reserve(int capacity) {
  if (capacity <= capacity_) return;
  KVCache bigger(n_layers_, kv_dim_, capacity, f16_);
  bigger.append(*this);
  std::swap(base_, bigger.base_);
  std::swap(capacity_, bigger.capacity_);
}

std::unique_ptr<KVCache> KVCache::copy(int capacity) const {
  if (capacity < length_) throw std::invalid_argument("KV: copy capacity below the valid length");
  auto c = std::make_unique<KVCache>(n_layers_, kv_dim_, capacity, f16_);
  c->append(*this);
  return c;
}

void KVCache::append(const KVCache& other) {
  if (other.n_layers_ != n_layers_ || other.kv_dim_ != kv_dim_ || other.f16_ != f16_)
    throw std::invalid_argument("KV: append needs the same layers, width and dtype");
  if (&other == this) throw std::invalid_argument("KV: cannot append a cache to itself");
  if (length_ + other.length_ > capacity_)
    throw std::invalid_argument("KV: append of " + std::to_string(other.length_) + " rows exceeds capacity " +
                                std::to_string(capacity_) + " (has " + std::to_string(length_) + ")");
  const std::size_t off = static_cast<std::size_t>(length_) * row_bytes();
  const std::size_t n = static_cast<std::size_t>(other.length_) * row_bytes();
  for (int l = 0; l < n_layers_; ++l) {
    std::memcpy(static_cast<std::uint8_t*>(k(l)) + off, other.k(l), n);
    std::memcpy(static_cast<std::uint8_t*>(v(l)) + off, other.v(l), n);
  }
  length_ += other.length_;
}

void KVCache::export_to(void* dst) const {
  auto* out = static_cast<std::uint8_t*>(dst);
  const std::size_t n = static_cast<std::size_t>(length_) * row_bytes();
  for (int l = 0; l < n_layers_; ++l) {
    std::memcpy(out, k(l), n);
    std::memcpy(out + n, v(l), n);
    out += 2 * n;
  }
}

void KVCache::import_from(const void* src, std::size_t bytes, int length) {
  if (length < 0 || length > capacity_)
    throw std::invalid_argument("KV: import of " + std::to_string(length) + " rows exceeds capacity " +
                                std::to_string(capacity_));
  const std::size_t n = static_cast<std::size_t>(length) * row_bytes();
  if (bytes != 2 * n * n_layers_)
    throw std::invalid_argument("KV: import expects " + std::to_string(2 * n * n_layers_) + " bytes, got " +
                                std::to_string(bytes));
  const auto* in = static_cast<const std::uint8_t*>(src);
  for (int l = 0; l < n_layers_; ++l) {
    std::memcpy(k(l), in, n);
    std::memcpy(v(l), in + n, n);
    in += 2 * n;
  }
  length_ = length;
}

void KVCache::rows_f32(int layer, int which, float* dst) const {
  if (layer < 0 || layer >= n_layers_) throw std::invalid_argument("KV: layer out of range");
  const void* src = which == 0 ? k(layer) : v(layer);
  const std::size_t n = static_cast<std::size_t>(length_) * kv_dim_;
  if (!f16_) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const auto* h = static_cast<const std::uint16_t*>(src);
  for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(h[i]);
}

}  // namespace seqshare
