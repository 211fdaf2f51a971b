// A persistent pool of worker threads for the native kernels. Kernels are called synchronously
// from JavaScript hundreds of times per training step, many on small tensors: starting threads
// on every call cost more than the work. Callers split `n` items into contiguous ranges, sized to
// each thread's measured speed; which thread runs a range never changes what it computes, so
// results do not depend on timing.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace prefopt {

extern int g_threads;

constexpr int kPoolMaxParts = 64;

class Pool {
 public:
  Pool() { std::fill(speed_, speed_ + kPoolMaxParts, 1.0); }

  // Runs f(lo, hi) over `parts` ranges of [0, n) and returns when all are done.
  void run(int n, int parts, const std::function<void(int, int)>& f) {
    std::lock_guard<std::mutex> serial(call_);  // one caller at a time (e.g. worker_threads)
    start(parts - 1);
    {
      std::lock_guard<std::mutex> l(m_);
      job_ = &f;
      parts_ = parts;
      split(n, parts);
      pending_.store(parts - 1);
      gen_.fetch_add(1);
    }
    wake_.notify_all();
    auto t0 = Clock::now();
    f(bounds_[0], bounds_[1]);
    seconds_[0] = std::chrono::duration<double>(Clock::now() - t0).count();
    spin([&] { return pending_.load() == 0; });
    std::unique_lock<std::mutex> l(m_);
    done_.wait(l, [&] { return pending_.load() == 0; });
    job_ = nullptr;
    learn(parts);
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Shares in proportion to each thread's recent speed: when another process slows one core,
  // an even split left the others waiting for it (on this VM the caller waited 17–70 ms per SFT
  // step for its worker). Which thread computes an item never changes its result.
  void split(int n, int parts) {
    double total = 0;
    for (int p = 0; p < parts; p++) total += speed_[p];
    double acc = 0;
    bounds_[0] = 0;
    for (int p = 0; p < parts; p++) {
      acc += speed_[p];
      bounds_[p + 1] = p + 1 == parts ? n : (int)(n * acc / total + 0.5);
    }
  }
  // Items per second of each thread in this call, folded into its running estimate; calls too
  // short to time well are skipped. No share falls below a quarter of an even one, so a thread
  // that was slow once keeps being measured.
  void learn(int parts) {
    double rate[kPoolMaxParts], sum = 0;
    for (int p = 0; p < parts; p++) {
      int items = bounds_[p + 1] - bounds_[p];
      if (items <= 0 || seconds_[p] < 50e-6) return;
      rate[p] = items / seconds_[p];
      sum += rate[p];
    }
    for (int p = 0; p < parts; p++) speed_[p] = std::max(0.25, 0.8 * speed_[p] + 0.2 * (rate[p] / sum * parts));
  }
  void start(int workers) {
    while ((int)threads_.size() < workers) {
      int id = (int)threads_.size() + 1;
      // Detached: the pool lives for the whole process and is never destroyed.
      std::thread([this, id] { loop(id); }).detach();
      threads_.push_back(id);
    }
  }
  // Waits up to kSpin for `ready` before blocking. Waking a thread that had gone to sleep costs
  // ~50 µs on this project's VMs (a 37×70×300 product ran at 47 GFLOP/s with it, 69 without),
  // and in a training step the gaps between kernels (the tape's bookkeeping, AdamW's calls) run
  // from tens of µs to a few ms: with a 50 µs spin the workers' late starts added up to 13 ms per
  // SFT step (10 with a 1 ms spin, 6 with 5 ms). Past kBusy the thread yields between checks:
  // a plain 2 ms spin held a core that another process needed (two SFT runs side by side on
  // two cores: 1.75 s a step each, against 0.58 s with a 50 µs spin and 0.53–0.69 s so).
  static constexpr auto kSpin = std::chrono::microseconds(2000);
  static constexpr auto kBusy = std::chrono::microseconds(50);
  template <class P>
  static void spin(P ready) {
    auto start = Clock::now();
    for (int i = 1; !ready(); i++) {
      if (i % 64) {
        pause();
        continue;
      }
      auto waited = Clock::now() - start;
      if (waited > kSpin) return;
      if (waited > kBusy) std::this_thread::yield();
    }
  }
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin([&] { return gen_.load() != seen; });
      std::unique_lock<std::mutex> l(m_);
      wake_.wait(l, [&] { return gen_.load() != seen; });
      seen = gen_.load();
      if (id >= parts_) continue;
      int lo = bounds_[id], hi = bounds_[id + 1];
      const auto* f = job_;
      l.unlock();
      auto t0 = Clock::now();
      (*f)(lo, hi);
      seconds_[id] = std::chrono::duration<double>(Clock::now() - t0).count();
      l.lock();
      if (pending_.fetch_sub(1) == 1) done_.notify_one();
    }
  }
  std::mutex call_, m_;
  std::condition_variable wake_, done_;
  std::vector<int> threads_;
  const std::function<void(int, int)>* job_ = nullptr;
  int parts_ = 1;
  int bounds_[kPoolMaxParts + 1] = {};
  double seconds_[kPoolMaxParts] = {};
  double speed_[kPoolMaxParts];
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> gen_{0};
};

Pool& pool();

// f(lo, hi) over [0, n) on up to `threads` threads (inline when one suffices).
template <class F>
void parallel(int n, int threads, F f) {
  threads = std::min({threads, n, kPoolMaxParts});
  if (threads <= 1) {
    f(0, n);
    return;
  }
  std::function<void(int, int)> job(f);
  pool().run(n, threads, job);
}

}  // namespace prefopt
