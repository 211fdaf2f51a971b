// What the native kernels offer to the N-API glue (addon.cc). All tensors are float32,
// row-major and dense — but for frozen weights, which may stay in the checkpoint's bf16 or f16
// (a product's B operand, LoRA's base weight, the embedding table; docs/REFERENCE.md §10) and
// are widened to float32 where they are read. Every kernel runs on up to g_threads threads and
// gives the same bits whatever the thread count.
#pragma once
#include <cstdint>
#include <string>

namespace prefopt {

extern int g_threads;
// The widest vector instructions the kernels use: what the CPU has, capped by PREFOPT_ISA
// (avx512, avx2 or portable). Set once when the addon loads.
enum Isa { kPortable = 0, kAVX2 = 1, kAVX512 = 2 };
extern Isa g_isa;
Isa detect_isa();
const char* isa_name(Isa isa);
extern std::string g_lib;  // the system BLAS in use, "" for the built-in kernel

// The storage of a weight operand: float32, or 16-bit bits as the safetensors file holds them.
enum Dt { kF32 = 0, kBF16 = 1, kF16 = 2 };
float half_to_float(uint16_t h, Dt dt);
// dst[0..n) = src[0..n) widened to float32 (vector instructions where the CPU has them).
void widen(const uint16_t* src, int64_t n, Dt dt, float* dst);

// gemm.cc
void open_blas(const char* want);
// C[b] = op(A[b])·op(B[b]); A[b] at b·sa (0 broadcasts one matrix over the batch), C dense.
void matmul(bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K, const float* A, int64_t sa, const float* B, int64_t sb, float* C, bool useBlas);
// C [M, N] = op(A1)·op(B1) + op(A2)·op(B2) for dense operands, in one pass over C (LoRA's base
// product and its update, forward and backward); a term with K = 0 is left out. B may be a
// 16-bit weight (bdt): the built-in kernel widens it while packing, so the product has the
// same bits as on a float32 copy of it.
struct DenseTerm {
  bool ta, tb;
  int64_t K;
  const float* A;
  const void* B;
  Dt bdt = kF32;
};
void matmul2(int64_t M, int64_t N, const DenseTerm& t1, const DenseTerm& t2, float* C);

// The built-in kernel on strided operands: C = op(A)·op(B) (+ C when accumulate), row strides
// lda, ldb, ldc, on up to `threads` threads.
void gemm(bool ta, bool tb, int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate, int threads);
// C = Σ_i op(A_i)·op(B_i) (+ C), the terms' K one after another in a single pass over C.
struct GemmTerm {
  bool ta, tb;
  int K;
  const float* A;
  int64_t lda;
  const void* B;  // float32, or 16-bit bits when bdt says so
  int64_t ldb;
  Dt bdt = kF32;
};
constexpr int kMaxTerms = 4;  // the callers (gemm, matmul2) pass one or two
void gemm_sum(int M, int N, const GemmTerm* terms, int nterms, float* C, int64_t ldc, bool accumulate, int threads);
// B packed once for many products that read it (attention's keys and values serve every query
// head and row block of their kv head): Bp[p][k][0..nr) holds op(B)'s columns p·nr … p·nr+nr−1
// (zero past N) for k < K, panels K·nr apart. nr = gemm_panel_width(N) is what gemm uses at N.
int gemm_panel_width(int N);
void gemm_pack(bool tb, int K, int N, const float* B, int64_t ldb, int nr, float* Bp);
// gemm with B given packed: Bp points at the first panel and row used, panels ps apart; the
// same bits as gemm on the unpacked B.
void gemm_packed(bool ta, int M, int N, int K, const float* A, int64_t lda, const float* Bp, int64_t ps, int nr, float* C, int64_t ldc, bool accumulate, int threads);

// lora.cc — x [M, in], W [in, out], A [in, r], B [r, out]; xd is x, or x after dropout.
struct LoraDims {
  int64_t M, in, out, r;
};
struct LoraLayer {
  LoraDims d;
  const float* xd;
  const void* w;
  const float *a, *b;
  float s;  // the adapter's scale
  // W's storage: float32 [in, out] (prefopt's layout), or, when `hf`, the checkpoint's
  // [out, in] as read from the file (16-bit frozen weights are not transposed at load).
  Dt wdt = kF32;
  bool hf = false;
};
// y = x·W + u·B (+ bias when not null) with u = s·(xd·A) (u is kept for the backward pass).
void lora_forward(const LoraLayer& l, const float* x, float* y, float* u, const float* bias);
// dx, dA, dB from dy; with dxd null (xd is x) dx = dy·Wᵀ + s·(dy·Bᵀ)·Aᵀ, else dx = dy·Wᵀ and
// dxd = s·(dy·Bᵀ)·Aᵀ.
void lora_backward(const LoraLayer& l, const float* dy, const float* u, float* dx, float* dxd, float* da, float* db);

// cuda_emulated.cc — infer/sampling's first pass over a row of V logits: out[i] = exp(x_i / t −
// max_j x_j / t) in double, Math.exp's bits: kernels.cu's js_exp (fdlibm's exp, which V8's is),
// the device's sample_exps' own.
void host_sample_exps(const float* x, int64_t V, double t, double* out);

// fused.cc — each forward with the backward pass that goes with it.
// out[i] = x[i, y_i] − logsumexp(x_i) (0 where y_i ∉ [0, V)).
void label_logprobs(const float* x, int64_t N, int64_t V, const int32_t* y, float* out);
// dx[i, j] = dy_i · (1[j = y_i] − softmax(x_i)_j), softmax from x and out (= x[y] − lse).
void label_logprobs_grad(const float* x, int64_t N, int64_t V, const int32_t* y, const float* out, const float* dy, float* dx);
// y = x / sqrt(mean(x²) + eps) · w over rows of length D. With res, the residual connection
// before the norm comes first: sum = x + res, and sum is normalized.
void rms_norm(const float* x, const float* w, int64_t N, int64_t D, float eps, float* y, const float* res = nullptr, float* sum = nullptr);
// Backward passes write only the gradients asked for (null: not wanted); dres, when given, is
// added to dx (the residual's own gradient, for the fused form above: x is then the sum).
void rms_norm_grad(const float* x, const float* w, const float* dy, int64_t N, int64_t D, float eps, float* dx, float* dw, const float* dres = nullptr);
// y = silu(g) · u.
void swiglu(const float* g, const float* u, int64_t n, float* y);
void swiglu_grad(const float* g, const float* u, const float* dy, int64_t n, float* dg, float* du);
// Rotary embedding ("rotate half") of x [rows, H, hd] with cos/sin [rows, hd]; `inverse`
// applies the transpose (the backward pass).
void rope(const float* x, const float* cos, const float* sin, int64_t rows, int64_t H, int64_t hd, bool inverse, float* y);
// Attention for q [B, T, H, hd] and k, v [B, Tk, KV, hd] (query head h uses kv head
// h / (H / KV)) with an additive mask [B, 1, T, Tk]: o [B, T, H, hd] =
// softmax(scale · q kᵀ + mask) v. The backward pass recomputes the probabilities.
void attention(const float* q, const float* k, const float* v, const float* mask, float scale, int64_t B, int64_t T, int64_t Tk, int64_t H, int64_t KV, int64_t hd, float* o);
void attention_grad(const float* q, const float* k, const float* v, const float* mask, float scale, int64_t B, int64_t T, int64_t Tk, int64_t H, int64_t KV, int64_t hd,
                    const float* dout, float* dq, float* dk, float* dv);
// 360Zhinao's fused projection qkv [N, KV, G+2, hd] (per kv head: its G query heads, then its key
// and value) → q [N, KV·G, hd], k, v [N, KV, hd]; with merge, the reverse (the gradient).
void split_qkv(float* qkv, int64_t N, int64_t KV, int64_t G, int64_t hd, float* q, float* k, float* v, bool merge);
// tf.dropout(x, 1 − keep, seed) bit for bit: u_i from seedrandom's alea generator, whose state
// (s0, s1, s2, c) the caller seeds as tfjs does; y_i = x_i · (floor(f32(u_i) + keep) / keep) in
// float32, on every thread: each jumps ahead in the generator to its part (alea is a
// congruential generator in disguise, fused.cc). With bits, also writes
// which elements were kept (bit i of bits[i / 32]), for dropout_bits to apply the same mask again.
void dropout_alea(const float* x, int64_t n, double s0, double s1, double s2, double c, float keep, float* y, uint32_t* bits = nullptr);
// The alea state's multipliers for jumps of 0, step, 2·step, … draws (count of them; each a
// 117-bit number as two 64-bit words, low first): what a device drawing a mask in chunks of step
// needs to start each chunk (native/cuda/kernels.cu: alea_bits).
void alea_jumps(int64_t step, int64_t count, uint64_t* out);
// y_i = x_i·(1/keep) where bit i is set, x_i·0 elsewhere: the mask dropout_alea drew, on every thread.
void dropout_bits(const float* x, int64_t n, const uint32_t* bits, float keep, float* y);
// Loading a checkpoint: out [cols, rows] = aᵀ for a [rows, cols] (HF's [out, in] linear weights
// to prefopt's [in, out]), in cache-sized tiles on every thread; and the index of the first NaN
// or ±Inf in x (float32 or 16-bit), or −1.
void transpose(const float* a, int64_t rows, int64_t cols, float* out);
int64_t first_non_finite(const void* x, Dt dt, int64_t n);
// y = a + b elementwise (same shapes): residual connections and gradient accumulation.
void add(const float* a, const float* b, int64_t n, float* y);
// y = x + b over rows of length D; its gradient for b is the column sum of dy.
void bias_add(const float* x, const float* b, int64_t N, int64_t D, float* y);
void column_sum(const float* dy, int64_t N, int64_t D, float* out);
// One AdamW update of n parameters (torch.optim.AdamW's formula, in the order prefopt's tfjs
// form computes it): g = grad·gscale; m' = β1 m + (1−β1) g; v' = β2 v + (1−β2) g²;
// p' = p − (m' / (√v' / √bc2 + eps))·(lr / bc1) − p·(lr·wd). Scalars come in already rounded
// to float32, as tfjs would use them.
struct AdamWArgs {
  float gscale, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step, decay;
};
void adamw(const float* p, const float* g, const float* m, const float* v, int64_t n, const AdamWArgs& a, float* p2, float* m2, float* v2);
// The same update for many tensors at once, in place: one pass of the thread pool over all of
// them (an optimizer step is one call, not one per parameter).
struct AdamWTensor {
  float* p;
  const float* g;
  float *m, *v;
  int64_t n;
  AdamWArgs a;
};
void adamw_in_place(const AdamWTensor* ts, int count);
// Σ x² in double, in fixed chunks combined in order.
double sum_squares(const float* x, int64_t n);
// out[i] = table[ids[i]] for an embedding table [V, D] (float32, or 16-bit widened); ids already
// checked to be in [0, V).
void embed(const void* table, Dt dt, int64_t D, const int32_t* ids, int64_t N, float* out);
// dtable = Σ_i onehot(ids[i]) ⊗ dy[i] (zeros where no id points), summed in row order.
void embed_grad(const int32_t* ids, int64_t N, const float* dy, int64_t V, int64_t D, float* dtable);

}  // namespace prefopt
