// CUDA's names for one host thread, so that native/cuda/check.cu can run the kernels of
// kernels.cu whose threads never cooperate (grid-stride loops) on a CPU: grid and block of one
// thread, which then walks every index. Only their arithmetic is checked this way; the kernels
// that share memory or shuffle within a block need a GPU.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct EmuDim {
  unsigned x;
};
inline EmuDim threadIdx{0}, blockIdx{0}, blockDim{1}, gridDim{1};
inline void emulate_launch() { threadIdx.x = blockIdx.x = 0, blockDim.x = gridDim.x = 1; }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline void __syncthreads() {}
// Reached only by the block reductions, which the emulation does not run.
inline float __shfl_xor_sync(unsigned, float, int) { std::abort(); }

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
  std::strcpy(p->name, "host emulation, one thread");
  p->major = p->minor = 0;
  return cudaSuccess;
}
