// kernels.cu compiled for the host (native/cuda/emulate.h): the emulated device's kernels, and
// the table of every kernel's name and parameter types, which the GPU device also uses to pack a
// launch's arguments — so a call that does not match a kernel's parameters fails on any machine.
#include "cuda_device.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/emulate.h"
#include "cuda/kernels.cu"
#include "parallel.h"

namespace prefopt {
namespace cuda {
namespace {

static_assert(sizeof(DimsArg) == sizeof(Dims), "DimsArg must be laid out as kernels.cu's Dims");

// A parameter's type as one character of a kernel's signature.
template <typename T>
constexpr char sig_char() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (std::is_same_v<T, i64>) return 'l';
  else if constexpr (std::is_same_v<T, int>) return 'i';
  else if constexpr (std::is_same_v<T, unsigned>) return 'u';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else if constexpr (std::is_same_v<T, double>) return 'd';
  else {
    static_assert(std::is_same_v<T, Dims>, "a kernel parameter type the launcher cannot pack");
    return 'D';
  }
}

template <typename... P>
std::string sig_of(void (*)(P...)) {
  return std::string{sig_char<P>()...};
}

template <typename... P, size_t... I>
void call(void (*f)(P...), void** args, std::index_sequence<I...>) {
  f(*static_cast<P*>(args[I])...);
}

template <typename... P>
void emulate_with(void (*f)(P...), unsigned grid, unsigned block, void** args) {
  emu_run(grid, block, [&] { call(f, args, std::index_sequence_for<P...>{}); });
}

template <auto F>
void emulate(unsigned grid, unsigned block, void** args) {
  emulate_with(F, grid, block, args);
}

#define PREFOPT_KERNEL(k) KernelInfo{#k, sig_of(&::k), &emulate<&::k>}

}  // namespace

int64_t attention_rows(int64_t hd, unsigned block) {
  const int p = attn_group(hd);
  return hd <= (int64_t)p * PREFOPT_ATT_DIMS ? block / p : 0;
}

const std::vector<KernelInfo>& kernels() {
  static const std::vector<KernelInfo> all = {
      PREFOPT_KERNEL(widen),           PREFOPT_KERNEL(rms_norm),          PREFOPT_KERNEL(rms_norm_grad_x),     PREFOPT_KERNEL(column_sum_part),
      PREFOPT_KERNEL(swiglu),          PREFOPT_KERNEL(swiglu_grad),       PREFOPT_KERNEL(rope),                PREFOPT_KERNEL(label_logprobs),
      PREFOPT_KERNEL(label_logprobs_grad), PREFOPT_KERNEL(attention_fwd), PREFOPT_KERNEL(attention_bwd_delta), PREFOPT_KERNEL(attention_bwd_dq),
      PREFOPT_KERNEL(attention_bwd_dkdv), PREFOPT_KERNEL(adamw),          PREFOPT_KERNEL(strided_copy),        PREFOPT_KERNEL(binary),
      PREFOPT_KERNEL(unary),           PREFOPT_KERNEL(fill32),            PREFOPT_KERNEL(sum_rows),            PREFOPT_KERNEL(bias_add),
      PREFOPT_KERNEL(column_sum),      PREFOPT_KERNEL(sum_squares),       PREFOPT_KERNEL(rms_inv),             PREFOPT_KERNEL(split_qkv),
      PREFOPT_KERNEL(embed),           PREFOPT_KERNEL(embed_grad),        PREFOPT_KERNEL(dropout_bits),        PREFOPT_KERNEL(gather),
      PREFOPT_KERNEL(to_bf16),         PREFOPT_KERNEL(embed_half),        PREFOPT_KERNEL(head_group_sum),    PREFOPT_KERNEL(alea_bits),
      PREFOPT_KERNEL(attention_mask),  PREFOPT_KERNEL(compare),           PREFOPT_KERNEL(cast),                PREFOPT_KERNEL(softmax_rows),
      PREFOPT_KERNEL(softmax_grad_rows), PREFOPT_KERNEL(sample_exps),        PREFOPT_KERNEL(sample_draw), PREFOPT_KERNEL(sample_kept),
  };
  return all;
}

}  // namespace cuda

// Chunks of the row over the pool; the max is exact in any order, each exp its element's own.
void host_sample_exps(const float* x, int64_t V, double t, double* out) {
  const int64_t chunk = 1 << 14;
  const int chunks = (int)((V + chunk - 1) / chunk);
  std::vector<double> part(chunks, -INFINITY);
  const auto over = [&](auto f) {
    parallel(chunks, V >= (1 << 15) ? g_threads : 1, [&](int lo, int hi) {
      for (int c = lo; c < hi; c++) f(c * chunk, std::min(V, (c + 1) * chunk), c);
    });
  };
  over([&](int64_t i0, int64_t i1, int c) {
    for (int64_t i = i0; i < i1; i++) part[c] = std::fmax(part[c], (double)x[i] / t);
  });
  double m = -INFINITY;
  for (double p : part) m = std::fmax(m, p);
  over([&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; i++) out[i] = js_exp((double)x[i] / t - m);
  });
}

namespace cuda {

const KernelInfo* find_kernel(const std::string& name) {
  for (const auto& k : kernels())
    if (name == k.name) return &k;
  return nullptr;
}

}  // namespace cuda
}  // namespace prefopt
