// The pool's helpers spin briefly before sleeping on a condition variable: a decode step issues
// hundreds of small parallel_for calls, and a futex wake-up per call would cost more than the
// work. Chunks are claimed, not assigned: when the machine is oversubscribed and a helper is not
// running, the caller takes its chunks instead of waiting for it to be scheduled.
#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SEQSHARE_PAUSE() _mm_pause()
#else
#define SEQSHARE_PAUSE() ((void)0)
#endif

namespace seqshare {

namespace {
constexpr int kSpinIters = 1 << 15;  // pauses before a helper sleeps (~0.3 ms)
constexpr int kWaitSpins = 1 << 10;  // pauses before the caller yields while chunks finish
}  // namespace

struct ThreadPool::Impl {
  int n_threads = 1;
  std::vector<std::thread> helpers;
  // (generation << 32) | next unclaimed chunk: claiming with CAS on both guarantees a late
  // helper never takes a chunk of a job other than the one it saw published.
  std::atomic<std::uint64_t> state{0};
  std::atomic<int> done{0};
  std::atomic<int> sleepers{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable cv;
  // The current job (written before state is published, read after a chunk is claimed).
  const std::function<void(int, int)>* fn = nullptr;
  int n = 0, grain = 1;

  void run_chunk(int t) const {
    const int units = (n + grain - 1) / grain;
    const int b = static_cast<int>(static_cast<long long>(units) * t / n_threads) * grain;
    const int e = std::min(n, static_cast<int>(static_cast<long long>(units) * (t + 1) / n_threads) * grain);
    if (b < e) (*fn)(b, e);
  }

  // Claim and run chunks of generation `gen` until none is left.
  void work(std::uint32_t gen) {
    std::uint64_t v = state.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<std::uint32_t>(v >> 32) != gen || static_cast<int>(v & 0xFFFFFFFFu) >= n_threads) return;
      if (!state.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      run_chunk(static_cast<int>(v & 0xFFFFFFFFu));
      done.fetch_add(1, std::memory_order_acq_rel);
      v = state.load(std::memory_order_acquire);
    }
  }

  static std::uint32_t gen_of(std::uint64_t v) { return static_cast<std::uint32_t>(v >> 32); }

  void helper() {
    std::uint32_t seen = 0;
    for (;;) {
      int spins = 0;
      while (gen_of(state.load(std::memory_order_acquire)) == seen && !stop.load(std::memory_order_relaxed)) {
        if (++spins < kSpinIters) {
          SEQSHARE_PAUSE();
          continue;
        }
        std::unique_lock<std::mutex> lk(mu);
        sleepers.fetch_add(1);
        cv.wait(lk, [&] { return gen_of(state.load()) != seen || stop.load(); });
        sleepers.fetch_sub(1);
        spins = 0;
      }
      if (stop.load()) return;
      seen = gen_of(state.load(std::memory_order_acquire));
      work(seen);
    }
  }
};

ThreadPool::ThreadPool(int n_threads) : impl_(new Impl) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  impl_->n_threads = n_threads;
  for (int t = 1; t < n_threads; ++t) impl_->helpers.emplace_back([this] { impl_->helper(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stop.store(true);
  }
  impl_->cv.notify_all();
  for (auto& th : impl_->helpers) th.join();
  delete impl_;
}

int ThreadPool::size() const { return impl_->n_threads; }

void ThreadPool::parallel_for(int n, int grain, const std::function<void(int, int)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  Impl& p = *impl_;
  if (p.n_threads == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  p.fn = &fn;
  p.n = n;
  p.grain = grain;
  p.done.store(0, std::memory_order_relaxed);
  const std::uint32_t gen = Impl::gen_of(p.state.load()) + 1;
  {
    // Publishing under the lock closes the window in which a helper checked and is about to sleep.
    std::lock_guard<std::mutex> lk(p.mu);
    p.state.store(static_cast<std::uint64_t>(gen) << 32, std::memory_order_release);
  }
  if (p.sleepers.load() > 0) p.cv.notify_all();
  p.work(gen);
  for (int spins = 0; p.done.load(std::memory_order_acquire) < p.n_threads; ++spins) {
    if (spins < kWaitSpins)
      SEQSHARE_PAUSE();
    else
      std::this_thread::yield();
  }
}

static std::unique_ptr<ThreadPool>& pool_slot() {
  static std::unique_ptr<ThreadPool> p;
  return p;
}

static std::mutex& pool_mu() {
  static std::mutex m;
  return m;
}

ThreadPool& global_pool() {
  std::lock_guard<std::mutex> lk(pool_mu());
  auto& p = pool_slot();
  if (!p) p = std::make_unique<ThreadPool>(0);
  return *p;
}

void set_global_threads(int n_threads) {
  std::lock_guard<std::mutex> lk(pool_mu());
  auto& p = pool_slot();
  p.reset();
  p = std::make_unique<ThreadPool>(n_threads);
}

}  // namespace seqshare
