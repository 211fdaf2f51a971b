// CUDA's names on a CPU, so that kernels.cu runs without a GPU: in native/cuda/check.cu, and as
// the `cuda` backend's emulated device (native/cuda_device.cc), which lets the backend's host side
// be tested on any machine. A launch runs its blocks one after another, a block's threads as
// coroutines; __syncthreads is a barrier over them, and a warp shuffle is an exchange through the
// block's memory between two barriers. Slow, and stricter than a GPU (every shuffle synchronizes
// the whole block, which kernels.cu's reductions allow: all threads of a block reach them
// together), but the kernels' arithmetic and their indexing run as written.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One launch at a time, its blocks in turn: a block's shared memory may be the function's static.
#define __shared__ static

struct EmuDim {
  unsigned x;
};
inline EmuDim threadIdx{0}, blockIdx{0}, blockDim{1}, gridDim{1};

// A block's threads are coroutines on the calling thread: __syncthreads switches to the next
// thread of the block, so a barrier costs a context switch, not a wake-up of OS threads. Threads
// are resumed in rounds, each running to its next barrier (or its end), which is a barrier's
// meaning when every thread reaches the same barriers, as CUDA requires. On x86-64 the switch is
// the few instructions below (ucontext's saves the signal mask with a system call each time:
// 20x slower for kernels with block reductions); elsewhere, ucontext.
#if defined(__x86_64__) && defined(__ELF__)
#define PREFOPT_EMU_ASM 1
// Saves the callee-saved registers on the current stack and its pointer to *from, then resumes
// the stack `to` (SysV x86-64: rbx, rbp, r12–r15 are all a switch must keep).
extern "C" void prefopt_emu_switch(void** from, void* to);
__asm__(
    ".text\n"
    ".globl prefopt_emu_switch\n"
    ".hidden prefopt_emu_switch\n"
    ".type prefopt_emu_switch,@function\n"
    "prefopt_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size prefopt_emu_switch, .-prefopt_emu_switch\n");
#else
#include <ucontext.h>
#endif

class EmuBlocks {
 public:
  static constexpr unsigned kMaxThreads = 64;
  static EmuBlocks& get() {
    static EmuBlocks* b = new EmuBlocks();  // never destroyed: kernels may run until exit
    return *b;
  }
  void sync() { to_main(); }
  float* slot() { return slot_; }
  void run(unsigned grid, unsigned block, std::function<void()> body) {
    body_ = std::move(body);
    for (unsigned b = 0; b < grid; b++) {
      blockIdx.x = b;
      for (unsigned t = 0; t < block; t++) start(t);
      for (bool more = true; more;) {
        more = false;
        for (unsigned t = 0; t < block; t++) {
          if (done_[t]) continue;
          cur_ = t, threadIdx.x = t;
          resume(t);
          more |= !done_[t];
        }
      }
    }
    body_ = nullptr;
  }

 private:
  static constexpr size_t kStack = 128u << 10;
  EmuBlocks() : stacks_((size_t)kMaxThreads * kStack) {}
  char* stack_top(unsigned t) { return stacks_.data() + (size_t)(t + 1) * kStack; }
  static void entry() {
    EmuBlocks& b = get();
    b.body_();
    b.done_[b.cur_] = true;
    b.to_main();  // never resumed again
  }
#ifdef PREFOPT_EMU_ASM
  // A new thread's stack: six zero registers, then entry as the return address, with the stack
  // 16-byte aligned at entry's first instruction less 8 (as after a call).
  void start(unsigned t) {
    void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack_top(t)) & ~uintptr_t(15));
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&EmuBlocks::entry);
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    sp_[t] = sp;
    done_[t] = false;
  }
  void resume(unsigned t) { prefopt_emu_switch(&main_sp_, sp_[t]); }
  void to_main() { prefopt_emu_switch(&sp_[cur_], main_sp_); }
  void* sp_[kMaxThreads];
  void* main_sp_ = nullptr;
#else
  void start(unsigned t) {
    getcontext(&ctx_[t]);
    ctx_[t].uc_stack.ss_sp = stack_top(t) - kStack;
    ctx_[t].uc_stack.ss_size = kStack;
    ctx_[t].uc_link = &main_;
    makecontext(&ctx_[t], entry, 0);
    done_[t] = false;
  }
  void resume(unsigned t) { swapcontext(&main_, &ctx_[t]); }
  void to_main() { swapcontext(&ctx_[cur_], &main_); }
  ucontext_t main_, ctx_[kMaxThreads];
#endif
  bool done_[kMaxThreads];
  float slot_[kMaxThreads];
  unsigned cur_ = 0;
  std::vector<char> stacks_;
  std::function<void()> body_;
};

inline void __syncthreads() { EmuBlocks::get().sync(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  float* slot = EmuBlocks::get().slot();
  unsigned t = threadIdx.x;
  slot[t] = v;
  __syncthreads();
  float r = slot[t ^ (unsigned)lane_mask];
  __syncthreads();
  return r;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float fmaxf(float a, float b) { return std::fmax(a, b); }

// Run body() as `grid` blocks of `block` threads. Blocks run 64 threads at most (still two warps,
// a valid size for every kernel).
template <typename F>
void emu_run(unsigned grid, unsigned block, const F& body) {
  block = block < EmuBlocks::kMaxThreads ? block : EmuBlocks::kMaxThreads;
  blockDim.x = block, gridDim.x = grid;
  EmuBlocks::get().run(grid, block, body);
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
