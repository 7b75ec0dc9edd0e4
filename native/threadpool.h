// One pool per process: worker threads that run index ranges of a job. The caller participates,
// so a pool of T threads uses T-1 helpers. Not reentrant: ops never nest parallel_for.
#pragma once
#include <functional>

namespace seqshare {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // 0 = all hardware threads
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const;
  // Run fn(begin, end) over [0, n) split into contiguous chunks, one per thread (at most),
  // each chunk a multiple of `grain` except the last. Blocks until all chunks finished.
  void parallel_for(int n, int grain, const std::function<void(int, int)>& fn);

 private:
  struct Impl;
  Impl* impl_;
};

// The process-wide pool, created on first use with the configured size.
ThreadPool& global_pool();
void set_global_threads(int n_threads);  // recreates the pool; call before work starts

}  // namespace seqshare
