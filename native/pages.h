// Large buffers on transparent huge pages. In a VM every TLB miss walks two page tables (nested
// paging): with 4 KiB pages, decode attention over a long cache got half its bandwidth, and on the
// AMX Xeon a GEMV pass over Qwen2.5-1.5B-shaped weights ran 2-6% faster from huge pages. The
// kernel gives huge pages only where asked (THP "madvise", the common default); a region marked
// MADV_NOHUGEPAGE keeps 4 KiB pages even where THP is "always" (KV slots too small to fill one).
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

namespace seqshare {

inline constexpr std::size_t kHugePage = std::size_t{2} << 20;

// n bytes, 64-byte aligned; from 2 MiB up, whole huge pages advised `huge_pages` (untouched pages
// stay unbacked, so a large capacity costs address space, not memory). Release with std::free.
inline void* alloc_pages(std::size_t n, bool huge_pages = true) {
  void* p = nullptr;
  if (n >= kHugePage) {
    const std::size_t rounded = (n + kHugePage - 1) & ~(kHugePage - 1);
    p = std::aligned_alloc(kHugePage, rounded);
    if (p) madvise(p, rounded, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  } else {
    const std::size_t rounded = (n + 63) & ~std::size_t{63};
    p = std::aligned_alloc(64, rounded ? rounded : 64);
  }
  if (!p) throw std::bad_alloc();
  return p;
}

// A std::vector allocator on alloc_pages: the model's scratch rows.
template <class T>
struct PageAllocator {
  using value_type = T;
  PageAllocator() = default;
  template <class U>
  PageAllocator(const PageAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(alloc_pages(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <class U>
  bool operator==(const PageAllocator<U>&) const { return true; }
};
template <class T>
using PageVector = std::vector<T, PageAllocator<T>>;

}  // namespace seqshare
