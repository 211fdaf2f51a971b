// The device check of native/cuda/kernels.cu, for a machine with an NVIDIA GPU (docs/REFERENCE.md
// §11): each kernel on random inputs against a float64 reference computed here, and the kernels
// that only add, multiply, divide and take square roots against the CPU kernels' float32
// expressions bit for bit. One JSON line per kernel; exit 0 when every one is within tolerance.
//   nvcc -O2 --fmad=false -arch=native -o /tmp/prefopt-cuda-check native/cuda/check.cu && /tmp/prefopt-cuda-check
// Built with -x c++ -std=c++20 -DPREFOPT_CUDA_EMULATE by a host compiler, it runs the same
// kernels on the CPU, a block's threads as real threads (native/cuda/emulate.h): their
// arithmetic and indexing checked without a GPU.
#ifdef PREFOPT_CUDA_EMULATE
#include "emulate.h"
#else
#include <cuda_runtime.h>
#define LAUNCH(kernel, grid, block) kernel<<<grid, block>>>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.cu"

namespace {

struct Rand {
  unsigned long long s;
  float next() {  // uniform in [-1, 1)
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((s >> 40) * (1.0 / (1ULL << 24))) * 2.f - 1.f;
  }
  std::vector<float> vec(size_t n, float scale = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = next() * scale;
    return v;
  }
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    printf("{\"kernel\":\"%s\",\"error\":\"%s\"}\n", what, cudaGetErrorString(e));
    exit(2);
  }
}

template <typename T>
T* dev(const std::vector<T>& h) {
  T* d = nullptr;
  check(cudaMalloc(&d, h.size() * sizeof(T) + 1), "cudaMalloc");
  check(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

template <typename T>
std::vector<T> host(const T* d, size_t n) {
  std::vector<T> h(n);
  check(cudaDeviceSynchronize(), "kernel");
  check(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return h;
}

int failures = 0;

// max |got − want| over max(1, |want|), against tol; bitwise: every float equal to `exact`.
void report(const char* name, const std::vector<float>& got, const std::vector<double>& want, double tol, const std::vector<float>* exact = nullptr) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); i++) worst = std::fmax(worst, std::fabs(got[i] - want[i]) / std::fmax(1.0, std::fabs(want[i])));
  bool bits = exact ? memcmp(got.data(), exact->data(), got.size() * sizeof(float)) == 0 : true;
  bool ok = worst <= tol && bits && !std::isnan(worst);
  if (!ok) failures++;
  unsigned long long hash = 14695981039346656037ULL;  // FNV-1a over the result's bytes: builds compared bit for bit
  for (size_t i = 0; i < got.size() * sizeof(float); i++) hash = (hash ^ reinterpret_cast<const unsigned char*>(got.data())[i]) * 1099511628211ULL;
  printf("{\"kernel\":\"%s\",\"n\":%zu,\"max_rel_err\":%.3g,\"tol\":%.1g,\"cpu_bits_equal\":%s,\"ok\":%s,\"bits\":\"%016llx\"}\n", name, got.size(), worst, tol, exact ? (bits ? "true" : "false") : "null",
         ok ? "true" : "false", hash);
}

void check_rms_norm(Rand& rnd) {
  const int N = 37, D = 896;
  auto x = rnd.vec(N * D), res = rnd.vec(N * D), w = rnd.vec(D), dy = rnd.vec(N * D);
  const float eps = 1e-6f;
  float *dx_ = dev(x), *dres = dev(res), *dw_ = dev(w), *ddy = dev(dy), *y, *sum, *r, *gx, *gw, *part;
  const int chunk = 8, C = (N + chunk - 1) / chunk;  // 5 chunks, the last of 5 rows
  cudaMalloc(&y, N * D * 4), cudaMalloc(&sum, N * D * 4), cudaMalloc(&r, N * 4), cudaMalloc(&gx, N * D * 4), cudaMalloc(&gw, D * 4), cudaMalloc(&part, C * D * 4);
  LAUNCH(rms_norm, N, 256)(dx_, dw_, D, eps, y, dres, sum, r);
  LAUNCH(rms_norm_grad_x, N, 256)(sum, dw_, ddy, r, D, gx, nullptr);
  LAUNCH(column_sum_part, 7, 128)(ddy, sum, r, N, D, chunk, part);
  LAUNCH(column_sum, 3, 128)(part, C, D, gw);
  std::vector<double> wy(N * D), wgx(N * D), wgw(D, 0.0);
  for (int i = 0; i < N; i++) {
    double ss = 0, dot = 0;
    std::vector<double> v(D);
    for (int j = 0; j < D; j++) v[j] = (double)x[i * D + j] + res[i * D + j], ss += v[j] * v[j];
    double inv = 1 / std::sqrt(ss / D + eps);
    for (int j = 0; j < D; j++) wy[i * D + j] = v[j] * inv * w[j], dot += (double)w[j] * dy[i * D + j] * v[j];
    for (int j = 0; j < D; j++) wgx[i * D + j] = inv * w[j] * dy[i * D + j] - inv * inv * inv * dot / D * v[j], wgw[j] += dy[i * D + j] * v[j] * inv;
  }
  report("rms_norm", host(y, N * D), wy, 1e-5);
  report("rms_norm_grad_x", host(gx, N * D), wgx, 1e-5);
  report("rms_norm_grad_w", host(gw, D), wgw, 1e-5);
}

void check_swiglu(Rand& rnd) {
  const int n = 100003;
  auto g = rnd.vec(n, 6.f), u = rnd.vec(n), dy = rnd.vec(n);
  float *dg_ = dev(g), *du_ = dev(u), *ddy = dev(dy), *y, *gg, *gu;
  cudaMalloc(&y, n * 4), cudaMalloc(&gg, n * 4), cudaMalloc(&gu, n * 4);
  LAUNCH(swiglu, 120, 256)(dg_, du_, n, y);
  LAUNCH(swiglu_grad, 120, 256)(dg_, du_, ddy, n, gg, gu);
  std::vector<double> wy(n), wg(n), wu(n);
  for (int i = 0; i < n; i++) {
    double s = 1 / (1 + std::exp(-(double)g[i]));
    wy[i] = g[i] * s * u[i], wg[i] = dy[i] * u[i] * s * (1 + g[i] * (1 - s)), wu[i] = dy[i] * g[i] * s;
  }
  report("swiglu", host(y, n), wy, 1e-6);
  report("swiglu_grad(g)", host(gg, n), wg, 1e-6);
  report("swiglu_grad(u)", host(gu, n), wu, 1e-6);
}

void check_rope(Rand& rnd) {
  const int rows = 19, H = 14, hd = 64, h = hd / 2, n = rows * H * hd;
  auto x = rnd.vec(n), c = rnd.vec(rows * hd), s = rnd.vec(rows * hd);
  float *dx_ = dev(x), *dc = dev(c), *ds = dev(s), *y, *yi;
  cudaMalloc(&y, n * 4), cudaMalloc(&yi, n * 4);
  LAUNCH(rope, 64, 256)(dx_, dc, ds, rows, H, hd, 0, y);
  LAUNCH(rope, 64, 256)(dx_, dc, ds, rows, H, hd, 1, yi);
  std::vector<double> want(n), wanti(n);
  std::vector<float> cpu(n), cpui(n);  // the CPU kernel's float32 expressions (native/fused.cc)
  for (int r = 0; r < rows; r++)
    for (int k = 0; k < H; k++)
      for (int j = 0; j < h; j++) {
        int b = (r * H + k) * hd;
        const float *xi = &x[b], *cr = &c[r * hd], *sr = &s[r * hd];
        want[b + j] = (double)xi[j] * cr[j] - (double)xi[j + h] * sr[j], want[b + j + h] = (double)xi[j + h] * cr[j + h] + (double)xi[j] * sr[j + h];
        wanti[b + j] = (double)xi[j] * cr[j] + (double)xi[j + h] * sr[j + h], wanti[b + j + h] = (double)xi[j + h] * cr[j + h] - (double)xi[j] * sr[j];
        cpu[b + j] = xi[j] * cr[j] - xi[j + h] * sr[j], cpu[b + j + h] = xi[j + h] * cr[j + h] + xi[j] * sr[j + h];
        cpui[b + j] = xi[j] * cr[j] + xi[j + h] * sr[j + h], cpui[b + j + h] = xi[j + h] * cr[j + h] - xi[j] * sr[j];
      }
  report("rope", host(y, n), want, 1e-6, &cpu);
  report("rope(inverse)", host(yi, n), wanti, 1e-6, &cpui);
}

void check_label_logprobs(Rand& rnd) {
  const int N = 23, V = 151936;
  auto x = rnd.vec((size_t)N * V, 8.f), dy = rnd.vec(N);
  std::vector<int> y(N);
  for (int i = 0; i < N; i++) y[i] = i == 3 ? -100 : (int)((rnd.next() + 1) / 2 * (V - 1));
  float *dx_ = dev(x), *ddy = dev(dy), *out, *g;
  int* dyl = dev(y);
  cudaMalloc(&out, N * 4), cudaMalloc(&g, (size_t)N * V * 4);
  LAUNCH(label_logprobs, N, 1024)(dx_, V, dyl, out);
  LAUNCH(label_logprobs_grad, N, 1024)(dx_, V, dyl, out, ddy, g);
  std::vector<double> wout(N), wg((size_t)N * V);
  for (int i = 0; i < N; i++) {
    const float* xi = &x[(size_t)i * V];
    double m = -INFINITY, s = 0;
    for (int j = 0; j < V; j++) m = std::fmax(m, xi[j]);
    for (int j = 0; j < V; j++) s += std::exp(xi[j] - m);
    double lse = m + std::log(s);
    bool valid = y[i] >= 0;
    wout[i] = valid ? xi[y[i]] - lse : 0;
    for (int j = 0; j < V; j++) wg[(size_t)i * V + j] = valid ? dy[i] * ((j == y[i]) - std::exp(xi[j] - lse)) : 0;
  }
  report("label_logprobs", host(out, N), wout, 1e-5);
  report("label_logprobs_grad", host(g, (size_t)N * V), wg, 1e-6);
}

// Causal, with the second sequence's last 5 keys padded (prefopt's −1e9) and one query row of
// the first masked whole (uniform over every key, as float32 rounds its scores), grouped heads; hd
// picks the threads per row (64: 2; 12: 1, most of a thread's 32 slots unused; 80: 4, uneven;
// 256: 8, and tiles of 16 rows), and the launch's 8 blocks of 64 threads take several jobs each.
// Attention by products' row kernels: rows of scores with a mask (a masked key, a fully masked
// row), their softmax and its gradient, against float64.
void check_softmax_rows(Rand& rnd) {
  const int B = 2, H = 3, T = 5, Tk = 300, rows = B * H * T;
  const float scale = 0.125f;
  auto s = rnd.vec(rows * Tk, 20.f), m = rnd.vec(B * T * Tk, 0.f), dp = rnd.vec(rows * Tk);
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int j = 0; j < Tk; j++) m[(b * T + t) * Tk + j] = (j % 7 == 3 || (b == 1 && t == 2)) ? -1e9f : 0.f;
  float *ds_ = dev(s), *dm = dev(m), *ddp = dev(dp);
  LAUNCH(softmax_rows, rows, 256)(ds_, dm, T, Tk, H * T, scale);
  auto p = host(ds_, (size_t)rows * Tk);
  LAUNCH(softmax_grad_rows, rows, 256)(ds_, ddp, Tk, scale);
  std::vector<double> wp((size_t)rows * Tk), wd((size_t)rows * Tk);
  for (int r = 0; r < rows; r++) {
    // The masked score as the kernel has it, in float32: a fully masked row's are all −1e9 (uniform).
    const float* mi = m.data() + ((size_t)(r / (H * T)) * T + r % T) * Tk;
    std::vector<double> x(Tk);
    double mx = -1e300, sum = 0, dot = 0;
    for (int j = 0; j < Tk; j++) x[j] = scale * s[r * Tk + j] + mi[j], mx = std::fmax(mx, x[j]);
    for (int j = 0; j < Tk; j++) sum += std::exp(x[j] - mx);
    for (int j = 0; j < Tk; j++) wp[r * Tk + j] = std::exp(x[j] - mx) / sum, dot += wp[r * Tk + j] * dp[r * Tk + j];
    for (int j = 0; j < Tk; j++) wd[r * Tk + j] = scale * wp[r * Tk + j] * (dp[r * Tk + j] - dot);
  }
  report("softmax_rows", p, wp, 1e-6);
  report("softmax_grad_rows", host(ddp, (size_t)rows * Tk), wd, 1e-6);
}

// The sampler's exps: the GPU's bits against the same function compiled for the host (the one
// test/helpers/cuda-cases.ts holds to Math.exp), and against std::exp within a few ulps.
void check_sample_exps(Rand& rnd) {
  const int rows = 3, V = 5000;
  const double t = 0.7;
  auto x = rnd.vec(rows * V, 40.f);
  for (int i = 0; i < V; i += 11) x[i] = -900.f;  // underflowing
  for (int i = 5; i < V; i += 13) x[V + i] = 1e-9f * x[V + i];
  float* dx_ = dev(x);
  double* e;
  cudaMalloc(&e, (size_t)rows * V * 8);
  LAUNCH(sample_exps, rows, 256)(dx_, V, t, e);
  std::vector<double> got(rows * V), mine(rows * V);
  check(cudaDeviceSynchronize(), "kernel");
  check(cudaMemcpy(got.data(), e, got.size() * 8, cudaMemcpyDeviceToHost), "cudaMemcpy");
  double worst = 0;
  for (int r = 0; r < rows; r++) {
    double m = -INFINITY;
    for (int i = 0; i < V; i++) m = std::fmax(m, (double)x[r * V + i] / t);
    for (int i = 0; i < V; i++) {
      mine[r * V + i] = js_exp((double)x[r * V + i] / t - m);
      const double want = std::exp((double)x[r * V + i] / t - m);
      if (want > 1e-300) worst = std::fmax(worst, std::fabs(got[r * V + i] - want) / want);
    }
  }
  const bool bits = memcmp(got.data(), mine.data(), got.size() * 8) == 0;
  const bool ok = bits && worst <= 1e-15;
  if (!ok) failures++;
  printf("{\"kernel\":\"sample_exps\",\"n\":%d,\"max_rel_err\":%.3g,\"tol\":1e-15,\"cpu_bits_equal\":%s,\"ok\":%s}\n", rows * V, worst, bits ? "true" : "false", ok ? "true" : "false");
  // The draw from those exps: the host sampler's walk, written out here in its order.
  const std::vector<double> u = {0.3, 0.999, 1e-9};
  double* du = dev(u);
  int* ids;
  cudaMalloc(&ids, rows * 4);
  LAUNCH(sample_draw, rows, 256)(e, V, du, ids);
  const auto drawn = host(ids, rows);
  bool same = true;
  for (int r = 0; r < rows; r++) {
    double z = 0, w = u[r];
    for (int i = 0; i < V; i++) z += mine[r * V + i];
    int want = -1;
    for (int i = 0; i < V && want < 0; i++)
      if ((w -= mine[r * V + i] / z) < 0) want = i;
    same = same && drawn[r] == want;
  }
  if (!same) failures++;
  printf("{\"kernel\":\"sample_draw\",\"n\":%d,\"cpu_bits_equal\":%s,\"ok\":%s}\n", rows, same ? "true" : "false", same ? "true" : "false");
  // Top-k and top-p: infer/sampling's keptPrefix written out as the whole sort, then the draw over
  // the kept tokens in id order; −1 where more than KEPT_MAX tokens are kept. Rows: the exps above
  // (peaked), then ties (logits on a grid of eighths) and underflowing zeros with draws spread
  // over [0, 1), so that which of a run of ties a cut keeps shows in the tokens.
  const int R = 64;
  std::vector<double> ex(mine), uk(u);
  ex.resize((size_t)R * V), uk.resize(R);
  for (int r = rows; r < R; r++) {
    uk[r] = (r - rows + 0.5) / (R - rows);
    for (int i = 0; i < V; i++) ex[(size_t)r * V + i] = i % 3 ? 0.0 : std::exp(-(double)(i % 24) / 8);
  }
  double* duk = dev(uk);
  int* kids;
  cudaMalloc(&kids, R * 4);
  struct Setting { long long k; double p; };
  const Setting settings[] = {{20, 1}, {V, 0.9}, {50, 0.5}, {3000, 1}, {V, 0.99999}, {1, 1}, {2048, 0.999}, {V, 0.3}};
  bool kept_same = true;
  int drawn_here = 0, unsettled = 0;
  for (const Setting& st : settings) {
    double* de = dev(ex);
    LAUNCH(sample_kept, R, 256)(de, V, st.k, st.p, duk, kids);
    const auto got_ids = host(kids, R);
    const auto probs = host(de, (size_t)R * V);
    for (int r = 0; r < R; r++) {
      const double* er = ex.data() + (size_t)r * V;
      double z = 0;
      for (int i = 0; i < V; i++) z += er[i];
      std::vector<double> p(V);
      for (int i = 0; i < V; i++) p[i] = er[i] / z;
      std::vector<int> order(V);
      for (int i = 0; i < V; i++) order[i] = i;
      std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      long long n = std::min<long long>(st.k, V);
      double cum = 0;
      for (long long i = 0; i < n && st.p < 1; i++)
        if ((cum += p[order[i]]) >= st.p) n = i + 1;
      double s = 0;
      for (long long i = 0; i < n; i++) s += p[order[i]];
      std::vector<int> kept(order.begin(), order.begin() + n);
      std::sort(kept.begin(), kept.end());
      int want = -1;
      double w = uk[r];
      for (size_t i = 0; i < kept.size() && want < 0; i++)
        if ((w -= p[kept[i]] / s) < 0) want = kept[i];
      if (want < 0) {
        size_t best = 0;
        for (size_t i = 1; i < kept.size(); i++)
          if (p[kept[i]] / s > p[kept[best]] / s) best = i;
        want = kept[best];
      }
      if (n > 2048) want = -1;
      drawn_here += want >= 0, unsettled += want < 0;
      kept_same = kept_same && got_ids[r] == want && memcmp(probs.data() + (size_t)r * V, p.data(), V * 8) == 0;
    }
  }
  kept_same = kept_same && drawn_here > 0 && unsettled > 0;
  if (!kept_same) failures++;
  printf("{\"kernel\":\"sample_kept\",\"n\":%d,\"unsettled\":%d,\"cpu_bits_equal\":%s,\"ok\":%s}\n", drawn_here + unsettled, unsettled, kept_same ? "true" : "false", kept_same ? "true" : "false");
}

void check_attention(Rand& rnd, int hd) {
  const int B = 2, T = 67, Tk = 67, H = 4, KV = 2, G = H / KV;
  const float scale = 1.f / std::sqrt((float)hd);
  auto q = rnd.vec((size_t)B * T * H * hd), k = rnd.vec((size_t)B * Tk * KV * hd), v = rnd.vec((size_t)B * Tk * KV * hd), dout = rnd.vec((size_t)B * T * H * hd);
  std::vector<float> mask((size_t)B * T * Tk, 0.f);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < T; i++)
      for (int j = 0; j < Tk; j++)
        if (j > i || (b == 1 && j >= Tk - 5) || (b == 0 && i == 5)) mask[((size_t)b * T + i) * Tk + j] = -1e9f;
  float *dq_ = dev(q), *dk_ = dev(k), *dv_ = dev(v), *dm = dev(mask), *ddo = dev(dout), *o, *stat, *delta, *gq, *gk, *gv, *pk, *pv;
  cudaMalloc(&o, q.size() * 4), cudaMalloc(&stat, B * H * T * 8), cudaMalloc(&delta, B * H * T * 4), cudaMalloc(&gq, q.size() * 4), cudaMalloc(&gk, k.size() * 4), cudaMalloc(&gv, v.size() * 4);
  cudaMalloc(&pk, k.size() * G * 4), cudaMalloc(&pv, v.size() * G * 4);
  LAUNCH(attention_fwd, 8, 64)(dq_, dk_, dv_, dm, scale, B, T, Tk, H, KV, hd, o, stat);
  LAUNCH(attention_bwd_delta, 8, 64)(o, ddo, B, T, H, hd, delta);
  LAUNCH(attention_bwd_dq, 8, 64)(dq_, dk_, dv_, dm, ddo, stat, delta, scale, B, T, Tk, H, KV, hd, gq);
  LAUNCH(attention_bwd_dkdv, 8, 64)(dq_, dk_, dv_, dm, ddo, stat, delta, scale, B, T, Tk, H, KV, hd, pk, pv);
  LAUNCH(head_group_sum, 8, 64)(pk, B * Tk, KV, G, hd, gk);
  LAUNCH(head_group_sum, 8, 64)(pv, B * Tk, KV, G, hd, gv);
  std::vector<double> wo(q.size(), 0.0), wq(q.size(), 0.0), wk(k.size(), 0.0), wv(v.size(), 0.0);
  std::vector<double> p(Tk), dp(Tk);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < T; i++) {
        const int g = h / G;
        const size_t at = (((size_t)b * T + i) * H + h) * hd;
        double mx = -INFINITY, sum = 0, dot = 0;
        for (int j = 0; j < Tk; j++) {
          const size_t kat = (((size_t)b * Tk + j) * KV + g) * hd;
          double s = 0, e = 0;
          for (int d = 0; d < hd; d++) s += (double)q[at + d] * k[kat + d], e += (double)dout[at + d] * v[kat + d];
          // The logit as float32 forms it (score, then the mask added): a fully masked row's
          // logits all round to −1e9.
          p[j] = (float)((float)(s * scale) + mask[((size_t)b * T + i) * Tk + j]), dp[j] = e, mx = std::fmax(mx, p[j]);
        }
        for (int j = 0; j < Tk; j++) p[j] = std::exp(p[j] - mx), sum += p[j];
        for (int j = 0; j < Tk; j++) p[j] /= sum, dot += p[j] * dp[j];
        for (int j = 0; j < Tk; j++) {
          const size_t kat = (((size_t)b * Tk + j) * KV + g) * hd;
          const double ds = p[j] * (dp[j] - dot);
          for (int d = 0; d < hd; d++) {
            wo[at + d] += p[j] * v[kat + d];
            wq[at + d] += scale * ds * k[kat + d];
            wk[kat + d] += scale * ds * q[at + d];
            wv[kat + d] += p[j] * dout[at + d];
          }
        }
      }
  const std::string at = "(hd " + std::to_string(hd) + ")";
  report(("attention_fwd" + at).c_str(), host(o, q.size()), wo, 1e-5);
  report(("attention_bwd(dq)" + at).c_str(), host(gq, q.size()), wq, 1e-5);
  report(("attention_bwd(dk)" + at).c_str(), host(gk, k.size()), wk, 1e-5);
  report(("attention_bwd(dv)" + at).c_str(), host(gv, v.size()), wv, 1e-5);
}

// alea_bits against the generator drawn in sequence from the start (no jumps): the host makes
// the chunks' jump multipliers by repeated modular products (a second formulation of
// native/fused.cc's powers), the device jumps to each chunk and draws it.
void check_alea(Rand& rnd) {
  typedef unsigned __int128 u128;
  const unsigned long long a = 2091639;
  const u128 m = ((u128)a << 96) - 1;
  auto mul = [&](u128 x, u128 y) {
    u128 r = 0;
    for (int i = 116; i >= 0; i--) {
      r = r + r >= m ? r + r - m : r + r;
      if ((y >> i) & 1) r = r + x >= m ? r + x - m : r + x;
    }
    return r;
  };
  const long long n = 300001, chunks = (n + PREFOPT_ALEA_CHUNK - 1) / PREFOPT_ALEA_CHUNK;
  u128 step = 1;  // (a·2⁶⁴)^1024: one draw is a multiplication by a·2⁶⁴
  for (int i = 0; i < PREFOPT_ALEA_CHUNK; i++) step = mul(step, (u128)a << 64);
  std::vector<unsigned long long> jumps(2 * chunks);
  u128 j = 1;
  for (long long c = 0; c < chunks; c++, j = mul(j, step)) jumps[2 * c] = (unsigned long long)j, jumps[2 * c + 1] = (unsigned long long)(j >> 64);
  const u32 s0 = (u32)(rnd.next() * 2e9 + 2e9), s1 = (u32)(rnd.next() * 2e9 + 2e9), s2 = (u32)(rnd.next() * 2e9 + 2e9);
  const float keep = 0.95f;
  std::vector<u32> zeros((n + 31) / 32, 0);
  unsigned long long* dj = dev(jumps);
  u32* db = dev(zeros);
  LAUNCH(alea_bits, 4, 64)(n, s0, s1, s2, 1u, dj, keep, db);
  std::vector<u32> got = host(db, zeros.size());
  std::vector<float> gotf(n);
  std::vector<double> want(n);
  u32 w0 = s0, w1 = s1, w2 = s2;
  unsigned long long c = 1;
  for (long long i = 0; i < n; i++) {
    const unsigned long long t = a * w0 + c;
    w0 = w1, w1 = w2, c = t >> 32, w2 = (u32)t;
    want[i] = std::floor((float)(w2 * 2.3283064365386963e-10) + keep) != 0.f;
    gotf[i] = (float)((got[i >> 5] >> (i & 31)) & 1u);
  }
  report("alea_bits", gotf, want, 0);
}

void check_adamw(Rand& rnd) {
  const int n = 65537;
  auto p = rnd.vec(n), g = rnd.vec(n), m = rnd.vec(n, 0.1f), v = rnd.vec(n, 0.01f);
  for (auto& e : v) e = std::fabs(e);
  // Step 3 of lr 1e-3, β (0.9, 0.95), ε 1e-8, weight decay 0.1, gradient scale 0.5.
  const float gs = 0.5f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, lr = 1e-3f, wd = 0.1f;
  const float bc1 = 1 - std::pow(b1, 3.f), bc2 = 1 - std::pow(b2, 3.f);
  const float sqrt_bc2 = std::sqrt(bc2), step = lr / bc1, decay = lr * wd;
  std::vector<double> want(n);
  std::vector<float> cpu(n);
  for (int i = 0; i < n; i++) {
    double gi = (double)g[i] * gs, mi = m[i] * (double)b1 + gi * (1 - (double)b1), vi = v[i] * (double)b2 + gi * gi * (1 - (double)b2);
    want[i] = p[i] - mi / (std::sqrt(vi) / std::sqrt((double)bc2) + eps) * ((double)lr / bc1) - p[i] * (double)decay;
    float gf = g[i] * gs, mf = m[i] * b1 + gf * (1 - b1), vf = v[i] * b2 + gf * gf * (1 - b2);
    float next = p[i] - (mf / (std::sqrt(vf) / sqrt_bc2 + eps)) * step;
    cpu[i] = next - p[i] * decay;
  }
  // The arrays as one tensor, then as three (4096-element chunks: 8, 1 and 9 of them), each launch's
  // table as the host builds it (engine/cuda-fused: adamw).
  const float scalars[9] = {gs, b1, 1 - b1, b2, 1 - b2, sqrt_bc2, eps, step, decay};
  const std::vector<long long> one = {n}, three = {30000, 1, 35536};
  for (const auto* sizes : {&one, &three}) {
    float *dp = dev(p), *dg = dev(g), *dm = dev(m), *dv = dev(v);
    std::vector<long long> tab;
    long long at = 0, chunks = 0;
    for (long long size : *sizes) {
      for (float* base : {dp, dg, dm, dv}) tab.push_back((long long)(uintptr_t)(base + at));
      tab.insert(tab.end(), {size, chunks});
      for (float x : scalars) {
        u32 bits;
        std::memcpy(&bits, &x, 4);
        tab.push_back((long long)bits);
      }
      at += size;
      chunks += (size + 4095) / 4096;
    }
    LAUNCH(adamw, 7, 256)(dev(tab), (int)sizes->size(), chunks);
    report(sizes == &one ? "adamw(1 tensor)" : "adamw(3 tensors)", host(dp, n), want, 1e-5, &cpu);
  }
}

void check_widen(Rand& rnd) {
  const int n = 65536;
  std::vector<u16> bits(n);
  for (int i = 0; i < n; i++) bits[i] = (u16)i;  // every 16-bit pattern
  u16* d = dev(bits);
  float* out;
  cudaMalloc(&out, n * 4);
  for (int dt : {1, 2}) {
    LAUNCH(widen, 64, 256)(d, n, dt, out);
    auto got = host(out, n);
    std::vector<float> cpu(n);
    std::vector<double> want(n);
    for (int i = 0; i < n; i++) {
      unsigned u;
      if (dt == 1) u = (unsigned)i << 16;
      else {  // IEEE half → float
        unsigned s = (i >> 15) & 1, e = (i >> 10) & 31, f = i & 1023;
        if (e == 0) {
          float v = std::ldexp((float)f, -24);
          memcpy(&u, &v, 4);
          u |= s << 31;
        } else u = (s << 31) | ((e == 31 ? 255 : e + 112) << 23) | (f << 13);
      }
      memcpy(&cpu[i], &u, 4);
      want[i] = std::isnan(cpu[i]) ? 0 : cpu[i];
    }
    // NaNs compare by bits only.
    for (int i = 0; i < n; i++)
      if (std::isnan(cpu[i])) got[i] = std::isnan(got[i]) ? 0 : 1, cpu[i] = 0;
    report(dt == 1 ? "widen(bf16)" : "widen(f16)", got, want, 0, &cpu);
  }
  (void)rnd;
}

}  // namespace

int main() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    printf("{\"error\":\"no CUDA device: %s\"}\n", e != cudaSuccess ? cudaGetErrorString(e) : "count 0");
    return 2;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("{\"device\":\"%s\",\"compute_capability\":\"%d.%d\"}\n", prop.name, prop.major, prop.minor);
  Rand rnd{42};
  check_widen(rnd);
  check_rms_norm(rnd);
  check_swiglu(rnd);
  check_rope(rnd);
  check_label_logprobs(rnd);
  check_softmax_rows(rnd);
  check_sample_exps(rnd);
  for (int hd : {64, 12, 80, 256}) check_attention(rnd, hd);
  check_alea(rnd);
  check_adamw(rnd);
  printf("{\"failures\":%d}\n", failures);
  return failures ? 1 : 0;
}
