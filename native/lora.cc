// A LoRA layer y = x·W + s·(xd·A)·B as one call each way (xd is x, or x after dropout). Each part
// is the same product the tfjs composition ran (matmul, matmul2, a float multiply), so the
// bits are the same; what goes is 6–8 kernel calls per adapted layer and step, each with its
// tfjs bookkeeping and its wake-up of the thread pool (an SFT-sized LoRA DPO step has 42).
#include "kernels.h"
#include <vector>

namespace prefopt {
namespace {
// The plain products go where tfjs's BatchMatMul would send them: the system BLAS when one is in
// use (the two-term products are always the built-in kernel, as in matmul2).
bool blas() { return !g_lib.empty(); }

void scale(float* v, int64_t n, float s) {
  for (int64_t i = 0; i < n; i++) v[i] *= s;
}

// W as the B operand of x·W (forward) or of dy·Wᵀ (backward, `back`): prefopt's [in, out], or
// the file's [out, in] for the other transpose.
DenseTerm base_term(const LoraLayer& l, const float* a, bool back) {
  return DenseTerm{false, back != l.hf, back ? l.d.out : l.d.in, a, l.w, l.wdt};
}
}  // namespace

void lora_forward(const LoraLayer& l, const float* x, float* y, float* u, const float* bias) {
  const LoraDims& d = l.d;
  matmul(false, false, 1, d.M, d.r, d.in, l.xd, 0, l.a, 0, u, blas());
  scale(u, d.M * d.r, l.s);
  matmul2(d.M, d.out, base_term(l, x, false), DenseTerm{false, false, d.r, u, l.b}, y);
  if (bias) bias_add(y, bias, d.M, d.out, y);  // after the products, as the bias kernel adds it
}

void lora_backward(const LoraLayer& l, const float* dy, const float* u, float* dx, float* dxd, float* da, float* db) {
  const LoraDims& d = l.d;
  std::vector<float> g(d.M * d.r);  // ∂/∂(xd·A) = s·dy·Bᵀ
  matmul(false, true, 1, d.M, d.r, d.out, dy, 0, l.b, 0, g.data(), blas());
  scale(g.data(), d.M * d.r, l.s);
  matmul(true, false, 1, d.in, d.r, d.M, l.xd, 0, g.data(), 0, da, blas());
  matmul(true, false, 1, d.r, d.out, d.M, u, 0, dy, 0, db, blas());
  if (!dxd) {  // xd is x: both paths of the gradient in one pass over dx
    matmul2(d.M, d.in, base_term(l, dy, true), DenseTerm{false, true, d.r, g.data(), l.a}, dx);
    return;
  }
  if (l.wdt == kF32 && !l.hf) matmul(false, true, 1, d.M, d.in, d.out, dy, 0, static_cast<const float*>(l.w), 0, dx, blas());
  else matmul2(d.M, d.in, base_term(l, dy, true), DenseTerm{false, false, 0, nullptr, nullptr}, dx);
  matmul(false, true, 1, d.M, d.in, d.r, g.data(), 0, l.a, 0, dxd, blas());
}

}  // namespace prefopt
