// A persistent pool of worker threads for the native kernels. Kernels are called synchronously
// from JavaScript hundreds of times per training step, many on small tensors: starting threads
// on every call cost more than the work. Callers split `n` items into `parts` contiguous ranges;
// which thread runs a range never changes what it computes, so results do not depend on timing.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace prefopt {

extern int g_threads;

class Pool {
 public:
  // Runs f(lo, hi) over `parts` ranges of [0, n) and returns when all are done.
  void run(int n, int parts, const std::function<void(int, int)>& f) {
    std::lock_guard<std::mutex> serial(call_);  // one caller at a time (e.g. worker_threads)
    start(parts - 1);
    {
      std::lock_guard<std::mutex> l(m_);
      job_ = &f;
      n_ = n;
      parts_ = parts;
      pending_ = parts - 1;
      gen_++;
    }
    wake_.notify_all();
    f(0, range(0).second);
    std::unique_lock<std::mutex> l(m_);
    done_.wait(l, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  std::pair<int, int> range(int p) const {
    return {(int)((int64_t)n_ * p / parts_), (int)((int64_t)n_ * (p + 1) / parts_)};
  }
  void start(int workers) {
    while ((int)threads_.size() < workers) {
      int id = (int)threads_.size() + 1;
      // Detached: the pool lives for the whole process and is never destroyed.
      std::thread([this, id] { loop(id); }).detach();
      threads_.push_back(id);
    }
  }
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> l(m_);
      wake_.wait(l, [&] { return gen_ != seen; });
      seen = gen_;
      if (id >= parts_) continue;
      auto r = range(id);
      const auto* f = job_;
      l.unlock();
      (*f)(r.first, r.second);
      l.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }
  std::mutex call_, m_;
  std::condition_variable wake_, done_;
  std::vector<int> threads_;
  const std::function<void(int, int)>* job_ = nullptr;
  int n_ = 0, parts_ = 1, pending_ = 0;
  uint64_t gen_ = 0;
};

Pool& pool();

// f(lo, hi) over [0, n) on up to `threads` threads (inline when one suffices).
template <class F>
void parallel(int n, int threads, F f) {
  threads = std::min(threads, n);
  if (threads <= 1) {
    f(0, n);
    return;
  }
  std::function<void(int, int)> job(f);
  pool().run(n, threads, job);
}

}  // namespace prefopt
