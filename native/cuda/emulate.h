// CUDA's names on a CPU, so that kernels.cu runs without a GPU: in native/cuda/check.cu, and as
// the `cuda` backend's emulated device (native/cuda_device.cc), which lets the backend's host side
// be tested on any machine. A launch runs its blocks one after another on one set of real
// threads (a block's threads), __syncthreads is a barrier over them, and a warp shuffle is an
// exchange through the block's memory between two barriers. Slow, and stricter than a GPU (every
// shuffle synchronizes the whole block, which kernels.cu's reductions allow: all threads of a
// block reach them together), but the kernels' arithmetic and their indexing run as written.
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
// One launch at a time, its blocks in turn, a barrier between blocks: a block's shared memory
// may be the function's static.
#define __shared__ static

struct EmuDim {
  unsigned x;
};

class EmuBarrier {
 public:
  explicit EmuBarrier(unsigned n) : n_(n), left_(n) {}
  void wait() {
    std::unique_lock<std::mutex> l(m_);
    unsigned gen = gen_;
    if (--left_ == 0) {
      gen_++, left_ = n_;
      cv_.notify_all();
    } else {
      cv_.wait(l, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, left_, gen_ = 0;
};

struct EmuBlock {
  EmuBarrier bar;
  std::vector<float> slot;
  explicit EmuBlock(unsigned n) : bar(n), slot(n) {}
};
inline thread_local EmuDim threadIdx{0}, blockIdx{0};
inline EmuDim blockDim{1}, gridDim{1};
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->bar.wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  unsigned t = threadIdx.x;
  emu_block->slot[t] = v;
  emu_block->bar.wait();
  float r = emu_block->slot[t ^ (unsigned)lane_mask];
  emu_block->bar.wait();
  return r;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float fmaxf(float a, float b) { return std::fmax(a, b); }

// Run body() as `grid` blocks of `block` threads. Blocks run 64 threads at most (still two warps,
// a valid size for every kernel): more would only add barrier time.
template <typename F>
void emu_run(unsigned grid, unsigned block, const F& body) {
  block = block < 64 ? block : 64;
  blockDim.x = block, gridDim.x = grid;
  EmuBlock shared(block);
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < block; t++)
    ts.emplace_back([&, t] {
      threadIdx.x = t, emu_block = &shared;
      for (unsigned b = 0; b < grid; b++) {
        blockIdx.x = b;
        body();
        shared.bar.wait();  // the next block may reuse the shared statics
      }
    });
  for (auto& t : ts) t.join();
}

// LAUNCH(kernel, grid, block)(args…), as kernel<<<grid, block>>>(args…).
template <typename F>
struct EmuLaunch {
  unsigned grid, block;
  F* kernel;
  template <typename... A>
  void operator()(A... a) const {
    emu_run(grid, block, [&] { kernel(a...); });
  }
};
#define LAUNCH(kernel, grid, block) EmuLaunch<decltype(kernel)>{(unsigned)(grid), (unsigned)(block), kernel}

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost };
struct cudaDeviceProp {
  char name[64];
  int major, minor;
};
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
template <typename T>
cudaError_t cudaMalloc(T** p, size_t n) {
  *p = static_cast<T*>(std::malloc(n));
  return *p ? cudaSuccess : 1;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { return std::memcpy(d, s, n), cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { return *n = 1, cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::strcpy(p->name, "host emulation");
  p->major = p->minor = 0;
  return cudaSuccess;
}
