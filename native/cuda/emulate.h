// CUDA's names on a CPU, so that native/cuda/check.cu can run kernels.cu without a GPU: each
// block's threads are real threads (one block at a time), __syncthreads is a barrier over them,
// and a warp shuffle is an exchange through the block's memory between two barriers. Slow, and
// stricter than a GPU (every shuffle synchronizes the whole block, which kernels.cu's reductions
// allow: all threads of a block reach them together), but the kernels' arithmetic and their
// indexing run as written.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct EmuDim {
  unsigned x;
};
struct EmuBlock {
  std::barrier<> bar;
  std::vector<float> slot;
  explicit EmuBlock(unsigned n) : bar((std::ptrdiff_t)n), slot(n) {}
};
inline thread_local EmuDim threadIdx{0}, blockIdx{0};
inline EmuDim blockDim{1}, gridDim{1};
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  unsigned t = threadIdx.x;
  emu_block->slot[t] = v;
  emu_block->bar.arrive_and_wait();
  float r = emu_block->slot[t ^ (unsigned)lane_mask];
  emu_block->bar.arrive_and_wait();
  return r;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float fmaxf(float a, float b) { return std::fmax(a, b); }

// LAUNCH(kernel, grid, block)(args…): the blocks one after another, each block's threads at once.
// Blocks run 64 threads at most (still two warps, a valid size for every kernel): thousands of
// threads per block would only add barrier time.
template <typename F>
struct EmuLaunch {
  unsigned grid, block;
  F* kernel;
  template <typename... A>
  void operator()(A... a) const {
    const unsigned block = this->block < 64 ? this->block : 64;
    blockDim.x = block, gridDim.x = grid;
    for (unsigned b = 0; b < grid; b++) {
      EmuBlock shared(block);
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < block; t++)
        ts.emplace_back([&, b, t] {
          threadIdx.x = t, blockIdx.x = b, emu_block = &shared;
          kernel(a...);
        });
      for (auto& t : ts) t.join();
    }
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
