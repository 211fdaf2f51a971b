// N-API glue: argument checking and dispatch to the kernels in gemm.cc and fused.cc. Every
// tensor argument is a typed array the caller owns (a view into the wasm heap, or the cpu
// backend's array); lengths are checked against the shapes before any kernel touches them.
#include <node_api.h>
#include "kernels.h"
#include "napi_args.h"
#include "cuda_probe.h"
#include "parallel.h"
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace prefopt {

int g_threads = 1;
void define_cuda(napi_env env, napi_value exports);  // cuda_addon.cc

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads live as long as the process
  return *p;
}

namespace {


// matmul(transA, transB, batch, M, N, K, A, strideA, B, strideB, C, useBlas)
napi_value Matmul(napi_env env, napi_callback_info info) {
  Args a(env, info, 12, "matmul");
  bool ta = a.flag(0), tb = a.flag(1), useBlas = a.flag(11);
  int64_t batch = a.num(2), M = a.num(3), N = a.num(4), K = a.num(5), sa = a.num(7), sb = a.num(9);
  const float* A = a.f32(6, batch ? (batch - 1) * sa + M * K : 0, "A");
  const float* B = a.f32(8, batch ? (batch - 1) * sb + K * N : 0, "B");
  float* C = a.f32(10, batch * M * N, "C");
  if (a.ok()) matmul(ta, tb, batch, M, N, K, A, sa, B, sb, C, useBlas);
  return nullptr;
}

// matmulWeight(tb, M, N, K, A, B, bdt, C): C [M, N] = A·op(B) for a weight B stored as bdt (a
// Float32Array, or a Uint16Array of bf16/f16 bits), on the built-in kernel.
napi_value MatmulWeight(napi_env env, napi_callback_info info) {
  Args a(env, info, 8, "matmulWeight");
  bool tb = a.flag(0);
  int64_t M = a.num(1), N = a.num(2), K = a.num(3);
  Dt dt = a.dtype(6);
  const float* A = a.f32(4, M * K, "A");
  const void* B = a.weight(5, K * N, dt, "B");
  float* C = a.f32(7, M * N, "C");
  if (a.ok()) matmul2(M, N, DenseTerm{false, tb, K, A, B, dt}, DenseTerm{false, false, 0, nullptr, nullptr}, C);
  return nullptr;
}

// widen(src, n, dt, out): a Uint16Array of bf16 (dt 1) or f16 (dt 2) bits into a Float32Array.
napi_value Widen(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "widen");
  int64_t n = a.num(1);
  Dt dt = a.dtype(2);
  a.require(dt != kF32, "dt must be 1 (bf16) or 2 (f16)");
  const void* src = a.weight(0, n, dt, "src");
  float* out = a.f32(3, n, "out");
  if (a.ok()) widen(static_cast<const uint16_t*>(src), n, dt, out);
  return nullptr;
}

// What both directions of a LoRA layer read: sizes (arguments 0–3), xd, w, a, b (5–8), the
// scale (at `scale_at`) and W's storage after it (dtype code, and whether it is the file's
// [out, in]); argument 4 is x forward and dy backward.
LoraLayer lora_layer(Args& a, int scale_at) {
  LoraDims d{a.num(0), a.num(1), a.num(2), a.num(3)};
  Dt dt = a.dtype(scale_at + 1);
  LoraLayer l{d, a.f32(5, d.M * d.in, "xd"), a.weight(6, d.in * d.out, dt, "w"), a.f32(7, d.in * d.r, "a"), a.f32(8, d.r * d.out, "b"), (float)a.real(scale_at)};
  l.wdt = dt;
  l.hf = a.flag(scale_at + 2);
  return l;
}

// loraForward(M, in, out, r, x, xd, w, a, b, scale, wdt, whf, y, u, bias | null)
napi_value LoraForward(napi_env env, napi_callback_info info) {
  Args a(env, info, 15, "loraForward");
  LoraLayer l = lora_layer(a, 9);
  const float* x = a.f32(4, l.d.M * l.d.in, "x");
  float* y = a.f32(12, l.d.M * l.d.out, "y");
  float* u = a.f32(13, l.d.M * l.d.r, "u");
  const float* bias = a.f32_or_null(14, l.d.out, "bias");
  if (a.ok()) lora_forward(l, x, y, u, bias);
  return nullptr;
}

// loraBackward(M, in, out, r, dy, xd, w, a, b, u, scale, wdt, whf, dx, dxd | null, da, db)
napi_value LoraBackward(napi_env env, napi_callback_info info) {
  Args a(env, info, 17, "loraBackward");
  LoraLayer l = lora_layer(a, 10);
  const LoraDims& d = l.d;
  const float* dy = a.f32(4, d.M * d.out, "dy");
  const float* u = a.f32(9, d.M * d.r, "u");
  float* dx = a.f32(13, d.M * d.in, "dx");
  float* dxd = a.f32_or_null(14, d.M * d.in, "dxd");
  float* da = a.f32(15, d.in * d.r, "da");
  float* db = a.f32(16, d.r * d.out, "db");
  if (a.ok()) lora_backward(l, dy, u, dx, dxd, da, db);
  return nullptr;
}

// sampleExps(logits, V, t, out)
napi_value SampleExps(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "sampleExps");
  int64_t V = a.num(1);
  const double t = a.real(2);
  const float* x = a.f32(0, V, "logits");
  double* out = a.f64(3, V, "out");
  if (a.ok()) host_sample_exps(x, V, t, out);
  return nullptr;
}

// labelLogProbs(x, N, V, labels, out)
napi_value LabelLogProbs(napi_env env, napi_callback_info info) {
  Args a(env, info, 5, "labelLogProbs");
  int64_t N = a.num(1), V = a.num(2);
  const float* x = a.f32(0, N * V, "logits");
  const int32_t* y = a.i32(3, N, "labels");
  float* out = a.f32(4, N, "out");
  if (a.ok()) label_logprobs(x, N, V, y, out);
  return nullptr;
}

// labelLogProbsGrad(x, N, V, labels, out, dy, dx)
napi_value LabelLogProbsGrad(napi_env env, napi_callback_info info) {
  Args a(env, info, 7, "labelLogProbsGrad");
  int64_t N = a.num(1), V = a.num(2);
  const float* x = a.f32(0, N * V, "logits");
  const int32_t* y = a.i32(3, N, "labels");
  const float* out = a.f32(4, N, "out");
  const float* dy = a.f32(5, N, "dy");
  float* dx = a.f32(6, N * V, "dx");
  if (a.ok()) label_logprobs_grad(x, N, V, y, out, dy, dx);
  return nullptr;
}

// rmsNorm(x, w, N, D, eps, y, res | null, sum | null)
napi_value RmsNorm(napi_env env, napi_callback_info info) {
  Args a(env, info, 8, "rmsNorm");
  int64_t N = a.num(2), D = a.num(3);
  float eps = (float)a.real(4);
  const float* x = a.f32(0, N * D, "x");
  const float* w = a.f32(1, D, "w");
  float* y = a.f32(5, N * D, "y");
  const float* res = a.f32_or_null(6, N * D, "res");
  float* sum = a.f32_or_null(7, N * D, "sum");
  if (a.require(!res == !sum, "rmsNorm: res and sum go together")) rms_norm(x, w, N, D, eps, y, res, sum);
  return nullptr;
}

// rmsNormGrad(x, w, dy, N, D, eps, dx, dw, dres)
napi_value RmsNormGrad(napi_env env, napi_callback_info info) {
  Args a(env, info, 9, "rmsNormGrad");
  int64_t N = a.num(3), D = a.num(4);
  float eps = (float)a.real(5);
  const float* x = a.f32(0, N * D, "x");
  const float* w = a.f32(1, D, "w");
  const float* dy = a.f32(2, N * D, "dy");
  float* dx = a.f32_or_null(6, N * D, "dx");
  float* dw = a.f32_or_null(7, D, "dw");
  const float* dres = a.f32_or_null(8, N * D, "dres");
  if (a.ok()) rms_norm_grad(x, w, dy, N, D, eps, dx, dw, dres);
  return nullptr;
}

// swiglu(g, u, n, y) and add(a, b, n, y): y = f(a, b) elementwise over n values. The
// property's data is the kernel's JS name, for messages.
template <void (*F)(const float*, const float*, int64_t, float*)>
napi_value Binary(napi_env env, napi_callback_info info) {
  void* name = nullptr;
  size_t argc = 0;
  napi_get_cb_info(env, info, &argc, nullptr, nullptr, &name);
  Args a(env, info, 4, static_cast<const char*>(name));
  int64_t n = a.num(2);
  const float* x = a.f32(0, n, "first input");
  const float* y = a.f32(1, n, "second input");
  float* out = a.f32(3, n, "output");
  if (a.ok()) F(x, y, n, out);
  return nullptr;
}

// swigluGrad(g, u, dy, n, dg, du)
napi_value SwigluGrad(napi_env env, napi_callback_info info) {
  Args a(env, info, 6, "swigluGrad");
  int64_t n = a.num(3);
  const float* g = a.f32(0, n, "g");
  const float* u = a.f32(1, n, "u");
  const float* dy = a.f32(2, n, "dy");
  float* dg = a.f32_or_null(4, n, "dg");
  float* du = a.f32_or_null(5, n, "du");
  if (a.ok()) swiglu_grad(g, u, dy, n, dg, du);
  return nullptr;
}

// transpose(a, rows, cols, out)
napi_value Transpose(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "transpose");
  int64_t rows = a.num(1), cols = a.num(2);
  const float* x = a.f32(0, rows * cols, "a");
  float* out = a.f32(3, rows * cols, "out");
  if (a.ok()) transpose(x, rows, cols, out);
  return nullptr;
}

// firstNonFinite(x, n, dt) → index or −1; x a Float32Array, or 16-bit bits as dt says.
napi_value FirstNonFinite(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "firstNonFinite");
  int64_t n = a.num(1);
  Dt dt = a.dtype(2);
  const void* x = a.weight(0, n, dt, "x");
  napi_value r;
  napi_create_double(env, a.ok() ? (double)first_non_finite(x, dt, n) : -1.0, &r);
  return r;
}

// dropoutAlea(x, n, s0, s1, s2, c, keep, y)
napi_value DropoutAlea(napi_env env, napi_callback_info info) {
  Args a(env, info, 9, "dropoutAlea");
  int64_t n = a.num(1);
  const float* x = a.f32(0, n, "x");
  double s0 = a.real(2), s1 = a.real(3), s2 = a.real(4), c = a.real(5);
  float keep = static_cast<float>(a.real(6));
  float* y = a.f32(7, n, "y");
  uint32_t* bits = a.u32_or_null(8, (n + 31) / 32, "bits");
  if (a.ok()) dropout_alea(x, n, s0, s1, s2, c, keep, y, bits);
  return nullptr;
}

// aleaJumps(step, count, out: BigUint64Array of 2·count)
napi_value AleaJumps(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "aleaJumps");
  int64_t step = a.num(0), count = a.num(1);
  uint64_t* out = a.u64(2, 2 * count, "out");
  if (a.ok()) alea_jumps(step, count, out);
  return nullptr;
}

// dropoutBits(x, n, bits, keep, y)
napi_value DropoutBits(napi_env env, napi_callback_info info) {
  Args a(env, info, 5, "dropoutBits");
  int64_t n = a.num(1);
  const float* x = a.f32(0, n, "x");
  const uint32_t* bits = a.u32(2, (n + 31) / 32, "bits");
  float keep = static_cast<float>(a.real(3));
  float* y = a.f32(4, n, "y");
  if (a.ok()) dropout_bits(x, n, bits, keep, y);
  return nullptr;
}

// splitQkv(qkv, N, KV, G, hd, q, k, v, merge): merge writes qkv from q, k, v
napi_value SplitQkv(napi_env env, napi_callback_info info) {
  Args a(env, info, 9, "splitQkv");
  int64_t N = a.num(1), KV = a.num(2), G = a.num(3), hd = a.num(4);
  bool merge = a.flag(8);
  float* qkv = a.f32(0, N * KV * (G + 2) * hd, "qkv");
  float* q = a.f32(5, N * KV * G * hd, "q");
  float* k = a.f32(6, N * KV * hd, "k");
  float* v = a.f32(7, N * KV * hd, "v");
  if (a.ok()) split_qkv(qkv, N, KV, G, hd, q, k, v, merge);
  return nullptr;
}

// rope(x, cos, sin, rows, H, hd, inverse, y)
napi_value Rope(napi_env env, napi_callback_info info) {
  Args a(env, info, 8, "rope");
  int64_t rows = a.num(3), H = a.num(4), hd = a.num(5);
  bool inverse = a.flag(6);
  const float* x = a.f32(0, rows * H * hd, "x");
  const float* c = a.f32(1, rows * hd, "cos");
  const float* s = a.f32(2, rows * hd, "sin");
  float* y = a.f32(7, rows * H * hd, "y");
  if (a.require(hd % 2 == 0, "head_dim must be even")) rope(x, c, s, rows, H, hd, inverse, y);
  return nullptr;
}

// The arguments attention and its gradient share: (q, k, v, mask, scale, B, T, Tk, H, KV, hd, …).
struct AttnArgs {
  float scale;
  int64_t B, T, Tk, H, KV, hd;
  const float *q, *k, *v, *mask;
  int64_t q_size() const { return B * T * H * hd; }
  int64_t kv_size() const { return B * Tk * KV * hd; }
};

AttnArgs attn_args(Args& a) {
  AttnArgs x;
  x.scale = (float)a.real(4);
  x.B = a.num(5), x.T = a.num(6), x.Tk = a.num(7), x.H = a.num(8), x.KV = a.num(9), x.hd = a.num(10);
  x.q = a.f32(0, x.q_size(), "q");
  x.k = a.f32(1, x.kv_size(), "k");
  x.v = a.f32(2, x.kv_size(), "v");
  x.mask = a.f32(3, x.B * x.T * x.Tk, "mask");
  a.require(x.KV > 0 && x.H % x.KV == 0, "heads must be a multiple of kv heads");
  return x;
}

// attention(q, k, v, mask, scale, B, T, Tk, H, KV, hd, o)
napi_value Attention(napi_env env, napi_callback_info info) {
  Args a(env, info, 12, "attention");
  AttnArgs x = attn_args(a);
  float* o = a.f32(11, x.q_size(), "o");
  if (a.ok()) attention(x.q, x.k, x.v, x.mask, x.scale, x.B, x.T, x.Tk, x.H, x.KV, x.hd, o);
  return nullptr;
}

// attentionGrad(q, k, v, mask, scale, B, T, Tk, H, KV, hd, dout, dq, dk, dv)
napi_value AttentionGrad(napi_env env, napi_callback_info info) {
  Args a(env, info, 15, "attentionGrad");
  AttnArgs x = attn_args(a);
  const float* dout = a.f32(11, x.q_size(), "dout");
  float* dq = a.f32(12, x.q_size(), "dq");
  float* dk = a.f32(13, x.kv_size(), "dk");
  float* dv = a.f32(14, x.kv_size(), "dv");
  if (a.ok()) attention_grad(x.q, x.k, x.v, x.mask, x.scale, x.B, x.T, x.Tk, x.H, x.KV, x.hd, dout, dq, dk, dv);
  return nullptr;
}

// Ids index memory directly: every one is checked against the table first.
bool ids_in_range(napi_env env, const int32_t* ids, int64_t N, int64_t V) {
  for (int64_t i = 0; i < N; i++)
    if (ids[i] < 0 || ids[i] >= V) {
      napi_throw_range_error(env, nullptr, ("embed: token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(V) + ")").c_str());
      return false;
    }
  return true;
}

// embed(table, V, D, ids, N, out, dt): the table a Float32Array, or 16-bit bits as dt says.
napi_value Embed(napi_env env, napi_callback_info info) {
  Args a(env, info, 7, "embed");
  int64_t V = a.num(1), D = a.num(2), N = a.num(4);
  Dt dt = a.dtype(6);
  const void* table = a.weight(0, V * D, dt, "table");
  const int32_t* ids = a.i32(3, N, "ids");
  float* out = a.f32(5, N * D, "out");
  if (a.ok() && ids_in_range(env, ids, N, V)) embed(table, dt, D, ids, N, out);
  return nullptr;
}

// embedGrad(ids, N, dy, V, D, dtable)
napi_value EmbedGrad(napi_env env, napi_callback_info info) {
  Args a(env, info, 6, "embedGrad");
  int64_t N = a.num(1), V = a.num(3), D = a.num(4);
  const int32_t* ids = a.i32(0, N, "ids");
  const float* dy = a.f32(2, N * D, "dy");
  float* dt = a.f32(5, V * D, "dtable");
  if (a.ok() && ids_in_range(env, ids, N, V)) embed_grad(ids, N, dy, V, D, dt);
  return nullptr;
}

// biasAdd(x, b, N, D, y)
napi_value BiasAdd(napi_env env, napi_callback_info info) {
  Args a(env, info, 5, "biasAdd");
  int64_t N = a.num(2), D = a.num(3);
  const float* x = a.f32(0, N * D, "x");
  const float* b = a.f32(1, D, "b");
  float* y = a.f32(4, N * D, "y");
  if (a.ok()) bias_add(x, b, N, D, y);
  return nullptr;
}

// columnSum(dy, N, D, out)
napi_value ColumnSum(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "columnSum");
  int64_t N = a.num(1), D = a.num(2);
  const float* dy = a.f32(0, N * D, "dy");
  float* out = a.f32(3, D, "out");
  if (a.ok()) column_sum(dy, N, D, out);
  return nullptr;
}

// adamw(p, g, m, v, n, [gscale, beta1, 1−beta1, beta2, 1−beta2, √bc2, eps, lr/bc1, lr·wd], p2, m2, v2)
napi_value AdamW(napi_env env, napi_callback_info info) {
  Args a(env, info, 9, "adamw");
  int64_t n = a.num(4);
  const float* p = a.f32(0, n, "p");
  const float* g = a.f32(1, n, "g");
  const float* m = a.f32(2, n, "m");
  const float* v = a.f32(3, n, "v");
  const float* s = a.f32(5, 9, "scalars");
  float* p2 = a.f32(6, n, "p2");
  float* m2 = a.f32(7, n, "m2");
  float* v2 = a.f32(8, n, "v2");
  if (!a.ok()) return nullptr;
  AdamWArgs w{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]};
  adamw(p, g, m, v, n, w, p2, m2, v2);
  return nullptr;
}

// adamwInPlace(ps, gs, ms, vs, scalars): the update of adamw above for every tensor i of the
// arrays, in place (p, m and v overwritten), with scalars[9i … 9i+8] as adamw's.
napi_value AdamWInPlace(napi_env env, napi_callback_info info) {
  Args a(env, info, 5, "adamwInPlace");
  uint32_t count = a.length(0, "ps");
  const float* s = a.f32(4, 9 * (int64_t)count, "scalars");
  std::vector<AdamWTensor> ts(count);
  for (uint32_t i = 0; i < count && a.ok(); i++) {
    AdamWTensor& t = ts[i];
    t.p = a.f32_at(0, i, 0, "ps", &t.n);  // its length is the others'
    t.g = a.f32_at(1, i, t.n, "gs");
    t.m = a.f32_at(2, i, t.n, "ms");
    t.v = a.f32_at(3, i, t.n, "vs");
    if (a.ok()) t.a = AdamWArgs{s[9 * i], s[9 * i + 1], s[9 * i + 2], s[9 * i + 3], s[9 * i + 4], s[9 * i + 5], s[9 * i + 6], s[9 * i + 7], s[9 * i + 8]};
  }
  if (a.ok()) adamw_in_place(ts.data(), (int)count);
  return nullptr;
}

// sumSquares(x, n, out): out[0] = Σ x² (summed in double, stored as float32).
napi_value SumSquares(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "sumSquares");
  int64_t n = a.num(1);
  const float* x = a.f32(0, n, "x");
  float* out = a.f32(2, 1, "out");
  if (a.ok()) out[0] = (float)sum_squares(x, n);
  return nullptr;
}

// The one-argument calls that let go of an external buffer now (free, unmapFile): when its data
// is a key of `registry`, the buffer is detached — every view then reads as empty, never as
// memory given back — and `drop` gets the registry entry. → whether it was one.
template <typename Registry, typename Drop>
napi_value detach_registered(napi_env env, napi_callback_info info, Registry& registry, Drop drop) {
  size_t argc = 1;
  napi_value argv[1], result;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  void* data = nullptr;
  size_t len = 0;
  bool done = false;
  if (argc >= 1 && napi_get_arraybuffer_info(env, argv[0], &data, &len) == napi_ok) {
    auto it = registry.find(data);
    if (it != registry.end() && napi_detach_arraybuffer(env, argv[0]) == napi_ok) {
      drop(it);
      done = true;
    }
  }
  napi_get_boolean(env, done, &result);
  return result;
}

// mapFile(path) → an ArrayBuffer over the whole file, memory-mapped, or null when it cannot be
// (the caller then reads the file). Loading a checkpoint's 16-bit weights is then no copy at all:
// pages come from the page cache as the kernels first touch them, where reading into fresh
// memory cost ~2.7 s per GB of page faults on this project's machines. Mapped copy-on-write, so
// a stray write from JavaScript changes this process's page, never the file; unmapped when the
// last view is collected, or at once by unmapFile. The file must not be truncated while mapped
// (prefopt writes checkpoints to a temporary name and renames it, so the mapped inode stays whole).
std::unordered_map<void*, size_t> g_file_maps;  // still mapped: the collector or unmapFile unmaps once

napi_value MapFile(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result = nullptr;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  napi_get_null(env, &result);
  char path[4096];
  size_t len = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok || len >= sizeof path - 1) return result;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return result;
  struct stat st;
  void* p = MAP_FAILED;
  if (fstat(fd, &st) == 0 && st.st_size > 0) p = mmap(nullptr, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return result;
  size_t size = (size_t)st.st_size;
  auto unmap = [](napi_env, void* data, void*) {
    auto it = g_file_maps.find(data);
    if (it == g_file_maps.end()) return;
    munmap(data, it->second);
    g_file_maps.erase(it);
  };
  if (napi_create_external_arraybuffer(env, p, size, unmap, nullptr, &result) != napi_ok) {
    munmap(p, size);
    napi_get_null(env, &result);
    return result;
  }
  g_file_maps[p] = size;
  return result;
}

// unmapFile(buffer): unmap a mapFile buffer now (a model that widened its 16-bit weights no longer
// reads them, and the mapped pages would count in its memory until a collection). The buffer is
// detached first, so a view left over reads as empty, never as unmapped memory. → whether it did.
napi_value UnmapFile(napi_env env, napi_callback_info info) {
  return detach_registered(env, info, g_file_maps, [](auto it) {
    munmap(it->first, it->second);
    g_file_maps.erase(it);
  });
}

// ---- tensor memory of the native backend (engine/native-backend.ts) -------------------------
// A block handed to JavaScript as an external ArrayBuffer. Freed at once by Free (the buffer is
// detached first, so every view of it reads as empty instead of into freed memory), or, if
// JavaScript drops it without that, when the buffer is collected.
//
// Blocks are whole pages from mmap, and a freed one is kept (up to g_pool_cap) for the next
// request of the same size: a step allocates the same shapes layer after layer and step after
// step. From malloc, freed blocks stayed in glibc's heap (its mmap threshold rises to the largest
// size freed), and the log-probs job's RSS grew a third over the cpu backend's; fresh mmaps for
// every tensor would pay the first-touch page faults (~2.7 s per GB here) again and again.
//
// The pool never makes a job bigger than its own high-water mark of live blocks: a request the
// pool cannot serve first unmaps the longest-unused pooled blocks until live + pooled + the new
// block fit under that mark. So it needs no size cap, and holds blocks of every size, the large
// ones too (a full SFT step's [vocab, D] gradients): a fixed 2 GB pool of blocks up to 256 MB put
// that step 0.6 GB over the pool-less peak and still mapped 6.6 GB of fresh pages a step
// (bench/RESULTS.md). Phases that use different sizes (a forward pass's layers, then its LM-head
// chunk) do evict and remap each other's blocks every pass; huge pages (map_block) make that
// cheap. trimPool hands everything back between jobs (docs/REFERENCE.md §11).
struct Block {
  void* p;
  size_t n;  // bytes asked for
  size_t mapped;  // whole pages
  bool freed;
};
std::unordered_map<void*, Block*> g_blocks;
int64_t g_native_bytes = 0;
// PREFOPT_POOL_MB caps the pool below the high-water mark (0: no pool); read when the addon loads.
size_t g_pool_cap = SIZE_MAX;
// Pooled blocks, oldest free first, and an index by size into that list.
using Pooled = std::list<std::pair<size_t, void*>>;
Pooled g_lru;
std::unordered_multimap<size_t, Pooled::iterator> g_pool;
size_t g_pooled = 0, g_live = 0, g_high_water = 0;  // bytes mapped
size_t g_mapped_total = 0, g_evicted_total = 0;  // bytes mapped fresh, and unmapped from the pool, ever

void unpool(Pooled::iterator it) {
  auto range = g_pool.equal_range(it->first);
  for (auto m = range.first; m != range.second; ++m)
    if (m->second == it) {
      g_pool.erase(m);
      break;
    }
  g_pooled -= it->first;
  g_lru.erase(it);
}

// Unmap the longest-unused pooled block; → its size.
size_t unmap_oldest() {
  size_t n = g_lru.front().first;
  munmap(g_lru.front().second, n);
  unpool(g_lru.begin());
  return n;
}

// Fresh pages cost a fault each on first touch (~2.7 s per GB of 4 KB pages here). Blocks from
// 4 MB start on a 2 MB boundary and are offered to transparent huge pages, which fault 2 MB at a
// time; the tail past the last whole huge page stays in small pages, so nothing extra is resident.
// PREFOPT_HUGEPAGES=0 keeps small pages (where huge-page compaction stalls).
constexpr size_t kHuge = size_t(2) << 20;
bool g_huge = true;
void* map_block(size_t mapped) {
  const int prot = PROT_READ | PROT_WRITE, flags = MAP_PRIVATE | MAP_ANONYMOUS;
  if (mapped < 2 * kHuge || !g_huge) {
    void* p = mmap(nullptr, mapped, prot, flags, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  void* raw = mmap(nullptr, mapped + kHuge, prot, flags, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  char* lo = static_cast<char*>(raw);
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(lo) + kHuge - 1) & ~(kHuge - 1));
  if (p > lo) munmap(lo, p - lo);
  if (lo + kHuge > p) munmap(p + mapped, lo + kHuge - p);
  madvise(p, mapped, MADV_HUGEPAGE);
  return p;
}

void* take(size_t mapped) {
  auto hit = g_pool.find(mapped);
  void* p = nullptr;
  if (hit != g_pool.end()) {
    p = hit->second->second;
    unpool(hit->second);
  } else {
    g_high_water = std::max(g_high_water, g_live + mapped);
    while (!g_lru.empty() && g_live + mapped + g_pooled > g_high_water) g_evicted_total += unmap_oldest();
    p = map_block(mapped);
    if (!p) return nullptr;
    g_mapped_total += mapped;
  }
  g_live += mapped;
  return p;
}

void give(void* p, size_t mapped) {
  g_live -= mapped;
  if (g_pooled + mapped <= g_pool_cap) {
    g_pool.emplace(mapped, g_lru.insert(g_lru.end(), {mapped, p}));
    g_pooled += mapped;
  } else {
    munmap(p, mapped);
  }
}

void release(Block* b) {
  if (b->freed) return;
  give(b->p, b->mapped);
  b->freed = true;
  g_native_bytes -= (int64_t)b->n;
  g_blocks.erase(b->p);
}

// alloc(bytes) → an ArrayBuffer of that many bytes of native memory, page-aligned, contents
// undefined.
napi_value Alloc(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result = nullptr;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  double want = 0;
  if (argc < 1 || napi_get_value_double(env, argv[0], &want) != napi_ok || !(want >= 1) || want > 1e15) {
    napi_throw_range_error(env, nullptr, "alloc: bytes must be a positive number");
    return nullptr;
  }
  size_t n = (size_t)want, mapped = (n + 4095) / 4096 * 4096;
  void* p = take(mapped);
  if (!p) {
    napi_throw_error(env, nullptr, "alloc: out of memory");
    return nullptr;
  }
  Block* b = new Block{p, n, mapped, false};
  auto collected = [](napi_env, void*, void* hint) {
    Block* b = static_cast<Block*>(hint);
    release(b);
    delete b;
  };
  if (napi_create_external_arraybuffer(env, p, n, collected, b, &result) != napi_ok) {
    give(p, mapped);
    delete b;
    return nullptr;  // the failed call has thrown
  }
  g_blocks[p] = b;
  g_native_bytes += (int64_t)n;
  return result;
}

// free(buffer): release a block from alloc now; anything else is left alone (false).
napi_value Free(napi_env env, napi_callback_info info) {
  return detach_registered(env, info, g_blocks, [](auto it) { release(it->second); });
}

// nativeBytes() → bytes currently allocated by alloc and not yet freed.
napi_value NativeBytes(napi_env env, napi_callback_info) {
  napi_value r;
  napi_create_double(env, (double)g_native_bytes, &r);
  return r;
}

// trimPool(): unmap every pooled block, and start the high-water mark again from what is live.
napi_value TrimPool(napi_env env, napi_callback_info) {
  while (!g_lru.empty()) unmap_oldest();
  g_high_water = g_live;
  return nullptr;
}

// poolStats() → {live, pooled, highWater, mappedTotal, evictedTotal}: bytes mapped for live
// blocks, kept in the pool, the most ever live at once (since the last trim), ever mapped fresh,
// and ever unmapped to make room under the mark.
napi_value PoolStats(napi_env env, napi_callback_info) {
  napi_value o, v;
  napi_create_object(env, &o);
  const std::pair<const char*, size_t> fields[] = {{"live", g_live}, {"pooled", g_pooled}, {"highWater", g_high_water}, {"mappedTotal", g_mapped_total}, {"evictedTotal", g_evicted_total}};
  for (const auto& [name, value] : fields) {
    napi_create_double(env, (double)value, &v);
    napi_set_named_property(env, o, name, v);
  }
  return o;
}

// probeCuda(driver, cublasLt, nvrtc): each a list of candidate files or sonames, tried in order →
// {driver: {path, version, error}, cublasLt: {…}, nvrtc: {…}, devices: [{name, major, minor, memory}]}
// (engine/cuda.ts builds the lists and words the report).
std::vector<std::string> string_list(napi_env env, napi_value v) {
  std::vector<std::string> out;
  uint32_t n = 0;
  if (napi_get_array_length(env, v, &n) != napi_ok) return out;
  for (uint32_t i = 0; i < n; i++) {
    napi_value e;
    char buf[4096];
    size_t len = 0;
    if (napi_get_element(env, v, i, &e) == napi_ok && napi_get_value_string_utf8(env, e, buf, sizeof buf, &len) == napi_ok && len < sizeof buf - 1) out.emplace_back(buf, len);
  }
  return out;
}

napi_value lib_object(napi_env env, const prefopt::LibProbe& l) {
  napi_value o, v;
  napi_create_object(env, &o);
  for (const auto& [key, value] : {std::pair<const char*, const std::string*>{"path", &l.path}, {"version", &l.version}, {"error", &l.error}}) {
    if (value->empty()) napi_get_null(env, &v);
    else napi_create_string_utf8(env, value->c_str(), value->size(), &v);
    napi_set_named_property(env, o, key, v);
  }
  return o;
}

napi_value ProbeCuda(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], o, list, v;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < 3) {
    napi_throw_type_error(env, nullptr, "probeCuda(driver, cublasLt, nvrtc): three lists of candidates");
    return nullptr;
  }
  prefopt::CudaProbe p = prefopt::probe_cuda(string_list(env, argv[0]), string_list(env, argv[1]), string_list(env, argv[2]));
  napi_create_object(env, &o);
  napi_set_named_property(env, o, "driver", lib_object(env, p.driver));
  napi_set_named_property(env, o, "cublasLt", lib_object(env, p.cublaslt));
  napi_set_named_property(env, o, "nvrtc", lib_object(env, p.nvrtc));
  napi_create_array_with_length(env, p.devices.size(), &list);
  for (size_t i = 0; i < p.devices.size(); i++) {
    napi_value d;
    napi_create_object(env, &d);
    napi_create_string_utf8(env, p.devices[i].name.c_str(), NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, d, "name", v);
    napi_create_int32(env, p.devices[i].major, &v);
    napi_set_named_property(env, d, "major", v);
    napi_create_int32(env, p.devices[i].minor, &v);
    napi_set_named_property(env, d, "minor", v);
    napi_create_double(env, (double)p.devices[i].memory, &v);
    napi_set_named_property(env, d, "memory", v);
    napi_set_element(env, list, (uint32_t)i, d);
  }
  napi_set_named_property(env, o, "devices", list);
  return o;
}

napi_value Info(napi_env env, napi_callback_info) {
  napi_value o, v;
  napi_create_object(env, &o);
  napi_create_string_utf8(env, g_lib.c_str(), NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, o, "blas", v);
  napi_create_int32(env, g_threads, &v);
  napi_set_named_property(env, o, "threads", v);
  napi_create_string_utf8(env, isa_name(g_isa), NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, o, "isa", v);
  return o;
}

napi_value Init(napi_env env, napi_value exports) {
  const char* t = getenv("PREFOPT_THREADS");
  g_threads = t && atoi(t) > 0 ? atoi(t) : std::max(1u, std::thread::hardware_concurrency());
  // The built-in AVX2 and AVX-512 kernels measured faster than Debian's OpenBLAS 0.3.21 on this
  // project's machines (bench/RESULTS.md), so a system BLAS is used where neither can run, or when
  // PREFOPT_BLAS names one (openblas, blis, mkl_rt, Accelerate). Never chosen by timing: the
  // kernel decides the rounding, and the same seed must give the same result.
  g_isa = detect_isa();
  if (const char* mb = getenv("PREFOPT_POOL_MB")) g_pool_cap = (size_t)std::strtoull(mb, nullptr, 10) << 20;
  if (const char* h = getenv("PREFOPT_HUGEPAGES")) g_huge = strcmp(h, "0") != 0;
  const char* want = getenv("PREFOPT_BLAS");
  bool builtin_only = want && strcmp(want, "builtin") == 0;
  if (!builtin_only && ((want && *want) || g_isa == kPortable)) open_blas(want);
  napi_property_descriptor props[] = {
      {"matmul", nullptr, Matmul, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"matmulWeight", nullptr, MatmulWeight, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"widen", nullptr, Widen, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"mapFile", nullptr, MapFile, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"unmapFile", nullptr, UnmapFile, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"alloc", nullptr, Alloc, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"free", nullptr, Free, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"nativeBytes", nullptr, NativeBytes, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"poolStats", nullptr, PoolStats, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"trimPool", nullptr, TrimPool, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"probeCuda", nullptr, ProbeCuda, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"loraForward", nullptr, LoraForward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"loraBackward", nullptr, LoraBackward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"labelLogProbs", nullptr, LabelLogProbs, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"sampleExps", nullptr, SampleExps, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"labelLogProbsGrad", nullptr, LabelLogProbsGrad, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"rmsNorm", nullptr, RmsNorm, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"rmsNormGrad", nullptr, RmsNormGrad, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"swiglu", nullptr, Binary<swiglu>, nullptr, nullptr, nullptr, napi_default, (void*)"swiglu"},
      {"swigluGrad", nullptr, SwigluGrad, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"dropoutAlea", nullptr, DropoutAlea, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"dropoutBits", nullptr, DropoutBits, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"aleaJumps", nullptr, AleaJumps, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"transpose", nullptr, Transpose, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"firstNonFinite", nullptr, FirstNonFinite, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"rope", nullptr, Rope, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"attention", nullptr, Attention, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"attentionGrad", nullptr, AttentionGrad, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"embed", nullptr, Embed, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"embedGrad", nullptr, EmbedGrad, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"splitQkv", nullptr, SplitQkv, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"add", nullptr, Binary<add>, nullptr, nullptr, nullptr, napi_default, (void*)"add"},
      {"biasAdd", nullptr, BiasAdd, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"columnSum", nullptr, ColumnSum, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"adamw", nullptr, AdamW, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"adamwInPlace", nullptr, AdamWInPlace, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"sumSquares", nullptr, SumSquares, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"info", nullptr, Info, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  define_cuda(env, exports);
  return exports;
}

}  // namespace
}  // namespace prefopt

NAPI_MODULE(NODE_GYP_MODULE_NAME, prefopt::Init)
