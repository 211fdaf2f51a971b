// prefopt's CUDA kernels: the device twins of native/kernels.h's elementwise and row kernels
// (docs/REFERENCE.md §11). Written for NVRTC, which compiles them at run time (no nvcc on the
// user's machine), so the file includes nothing; nvcc compiles it too (test/cuda.test.ts checks
// that where nvcc is installed). Compiled with --fmad=false, the kernels that only add, multiply,
// divide and take square roots (widening, rotary, AdamW) give the CPU kernels' bits; those with
// exp or log (SwiGLU, the label log-softmax) and the reductions (RMSNorm, whose sums run in
// another order) agree to float32 rounding, attention too. The `cuda` backend launches them
// (native/cuda_device.cc, src/engine/cuda-backend.ts); native/cuda/check.cu runs each against a
// float64 reference on a GPU, and on the CPU with a block's threads as real threads
// (native/cuda/emulate.h), which is also the backend's emulated device.
//
// Launch shapes: elementwise kernels take any grid (grid-stride loops); row kernels take one
// block per row and a power-of-two block size from 32 to 1024.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

extern "C" {

// ---- 16-bit weights ----------------------------------------------------------------------------
__device__ __forceinline__ float half_to_float(u16 h, int dt) {
  if (dt == 1) return __uint_as_float((u32)h << 16);  // bf16: the high half of a float32
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));  // f16, exact
  return f;
#else  // the host emulation of native/cuda/emulate.h
  u32 s = (u32)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
  if (e == 0) return __uint_as_float(s) + (s ? -1.f : 1.f) * (float)m * 5.9604644775390625e-8f;  // m·2⁻²⁴
  return __uint_as_float(s | ((e == 31 ? 255 : e + 112) << 23) | (m << 13));
#endif
}

// dst[i] = src[i] widened (dt: 1 bf16, 2 f16).
__global__ void widen(const u16* src, i64 n, int dt, float* dst) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) dst[i] = half_to_float(src[i], dt);
}

// y = x rounded to bf16: to nearest, ties to even (as the checkpoint writer rounds); NaN stays a
// NaN. The activations' side of a product with a bf16 weight.
__global__ void to_bf16(const float* x, i64 n, u16* y) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    u32 u = __float_as_uint(x[i]);
    y[i] = (u & 0x7fffffffu) > 0x7f800000u ? (u16)((u >> 16) | 0x40u) : (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

// out [n, D] = rows ids of a 16-bit table [V, D] (dt: 1 bf16, 2 f16), widened; zeros for an id
// outside [0, V).
__global__ void embed_half(const u16* table, i64 V, i64 D, int dt, const int* ids, i64 n, float* out) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n * D; i += (i64)gridDim.x * blockDim.x) {
    i64 id = ids[i / D];
    out[i] = id >= 0 && id < V ? half_to_float(table[id * D + i % D], dt) : 0.f;
  }
}

// ---- block reductions --------------------------------------------------------------------------
// The sum (or max) over a block of v, returned to every thread. The order is fixed by the block
// size, so a launch gives the same bits every time.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ float block_sum(float v) {
  __shared__ float part[32];
  v = warp_sum(v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // part may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : 0.f;
  return warp_sum(v);
}
__device__ float block_max(float v) {
  __shared__ float part[32];
  v = warp_max(v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : -3.402823466e38f;
  return warp_max(v);
}

// ---- RMSNorm -----------------------------------------------------------------------------------
// y = v / sqrt(mean(v²) + eps) · w over rows of D, v = x (+ res, written to sum when given: the
// residual add fused with the norm that reads it). r (one per row, may be null) keeps 1/rms for
// the backward pass.
__global__ void rms_norm(const float* x, const float* w, i64 D, float eps, float* y, const float* res, float* sum, float* r) {
  const i64 row = blockIdx.x;
  const float* xi = x + row * D;
  float ss = 0.f;
  for (i64 j = threadIdx.x; j < D; j += blockDim.x) {
    float v = res ? xi[j] + res[row * D + j] : xi[j];
    if (sum) sum[row * D + j] = v;
    ss += v * v;
  }
  float inv = 1.f / sqrtf(block_sum(ss) / (float)D + eps);
  if (r && threadIdx.x == 0) r[row] = inv;
  for (i64 j = threadIdx.x; j < D; j += blockDim.x) {
    float v = res ? xi[j] + res[row * D + j] : xi[j];
    y[row * D + j] = v * inv * w[j];
  }
}

// dx = r·(w∘dy) − r³/D · x · Σ(w∘dy∘x) (+ dres); r from the forward pass. One block per row.
__global__ void rms_norm_grad_x(const float* x, const float* w, const float* dy, const float* r, i64 D, float* dx, const float* dres) {
  const i64 row = blockIdx.x;
  const float* xi = x + row * D;
  const float* dyi = dy + row * D;
  float dot = 0.f;
  for (i64 j = threadIdx.x; j < D; j += blockDim.x) dot += w[j] * dyi[j] * xi[j];
  dot = block_sum(dot);
  float ri = r[row], k = ri * ri * ri * dot / (float)D;
  for (i64 j = threadIdx.x; j < D; j += blockDim.x) {
    float g = ri * w[j] * dyi[j] - k * xi[j];
    dx[row * D + j] = dres ? g + dres[row * D + j] : g;
  }
}

// part [C, D], C = ⌈N / chunk⌉: part[c, j] = Σ over the rows i of chunk c, in order, of dy[i, j]
// (· x[i, j]·r[i] when x is given: RMSNorm's weight gradient). A thread per (chunk, column):
// column sums over thousands of rows in parallel; column_sum over part finishes them, in order —
// no atomics, the same bits every run.
__global__ void column_sum_part(const float* dy, const float* x, const float* r, i64 N, i64 D, i64 chunk, float* part) {
  const i64 C = (N + chunk - 1) / chunk;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < C * D; t += (i64)gridDim.x * blockDim.x) {
    const i64 j = t % D, c = t / D, end = (c + 1) * chunk < N ? (c + 1) * chunk : N;
    float s = 0.f;
    for (i64 i = c * chunk; i < end; i++) s += x ? dy[i * D + j] * x[i * D + j] * r[i] : dy[i * D + j];
    part[t] = s;
  }
}

// ---- SwiGLU ------------------------------------------------------------------------------------
// y = silu(g)·u, silu(g) = g·σ(g).
__global__ void swiglu(const float* g, const float* u, i64 n, float* y) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float s = 1.f / (1.f + expf(-g[i]));
    y[i] = g[i] * s * u[i];
  }
}

// dg = dy·u·σ(g)·(1 + g·(1 − σ(g))), du = dy·silu(g).
__global__ void swiglu_grad(const float* g, const float* u, const float* dy, i64 n, float* dg, float* du) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float s = 1.f / (1.f + expf(-g[i]));
    dg[i] = dy[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    du[i] = dy[i] * g[i] * s;
  }
}

// ---- rotary embedding ("rotate half") ---------------------------------------------------------
// x [rows, H, hd], cos/sin [rows, hd]; inverse applies the transpose (the backward pass). The
// CPU kernel's expressions, term for term.
__global__ void rope(const float* x, const float* cos, const float* sin, i64 rows, i64 H, i64 hd, int inverse, float* y) {
  const i64 h = hd / 2, n = rows * H * h;
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < n; t += (i64)gridDim.x * blockDim.x) {
    i64 j = t % h, rh = t / h, r = rh / H;
    const float* c = cos + r * hd;
    const float* s = sin + r * hd;
    const float* xi = x + rh * hd;
    float* yo = y + rh * hd;
    if (!inverse) {
      yo[j] = xi[j] * c[j] - xi[j + h] * s[j];
      yo[j + h] = xi[j + h] * c[j + h] + xi[j] * s[j + h];
    } else {
      yo[j] = xi[j] * c[j] + xi[j + h] * s[j + h];
      yo[j + h] = xi[j + h] * c[j + h] - xi[j] * s[j];
    }
  }
}

// ---- log-softmax at the label ------------------------------------------------------------------
// out[i] = x[i, y_i] − logsumexp(x_i) (0 where y_i ∉ [0, V)). One block per row.
__global__ void label_logprobs(const float* x, i64 V, const int* y, float* out) {
  const i64 row = blockIdx.x;
  const float* xi = x + row * V;
  float m = -3.402823466e38f;
  for (i64 j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, xi[j]);
  m = block_max(m);
  float s = 0.f;
  for (i64 j = threadIdx.x; j < V; j += blockDim.x) s += expf(xi[j] - m);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    int label = y[row];
    out[row] = label >= 0 && label < V ? xi[label] - (m + logf(s)) : 0.f;
  }
}

// dx[i, j] = dy_i·(1[j = y_i] − softmax(x_i)_j), the log-sum-exp recovered from out = x[y] − lse.
__global__ void label_logprobs_grad(const float* x, i64 V, const int* y, const float* out, const float* dy, float* dx) {
  const i64 row = blockIdx.x;
  const int label = y[row];
  const bool valid = label >= 0 && label < V;
  const float lse = valid ? x[row * V + label] - out[row] : 0.f;
  for (i64 j = threadIdx.x; j < V; j += blockDim.x) dx[row * V + j] = valid ? dy[row] * ((j == label ? 1.f : 0.f) - expf(x[row * V + j] - lse)) : 0.f;
}

// ---- attention ----------------------------------------------------------------------------------
// q [B, T, H, hd], k, v [B, Tk, KV, hd] (query head h reads kv head h / (H / KV)), additive mask
// [B, 1, T, Tk] (prefopt's masked value is −1e9, finite, so a fully masked row is uniform, as on
// the CPU): o = softmax(scale·q·kᵀ + mask)·v, without a [T, Tk] tensor — each query row runs an
// online softmax over the keys, and stat [B, H, T, 2] (the row's max score m and log Σ exp(s − m))
// is kept for the backward pass, which recomputes p = exp((s − m) − log Σ) from it. Two numbers,
// not their sum: a fully masked row's m is about −1e9, where m + log Σ would round log Σ away.
//
// A row (a query's, or a key's for dk/dv) belongs to a group of P = attn_group(hd) adjacent
// threads, each holding the dimensions p, p + P, p + 2P, … (at most 32) in registers, so a dot
// product is a thread's partial sum and log2(P) shuffles. A block's rows share one (b, head) and
// read the other side's rows in tiles staged in shared memory: each staged row is read from
// global memory once per block (not once per row, as a warp per row did), and the P threads of a
// group read adjacent words (no bank conflicts; the groups read the same words, a broadcast).
// Any block size that is a multiple of 32 works: a block takes jobs (b, head, tile of rows) in
// turn, every thread the same number of rounds and barriers (rows past the end are computed on
// the last row and not written), as the emulation's block-wide shuffles need.
#define PREFOPT_ATT_TILE 4096  // floats of shared memory per staged operand
#ifdef __CUDA_ARCH__
#define PREFOPT_UNROLL _Pragma("unroll")
#else
#define PREFOPT_UNROLL
#endif

__device__ __forceinline__ int attn_group(i64 hd) { return hd <= 32 ? 1 : hd <= 64 ? 2 : hd <= 128 ? 4 : 8; }
// The most dimensions a thread of a group holds (its registers' arrays below).
#define PREFOPT_ATT_DIMS 32
// Rows per staged tile: PREFOPT_ATT_TILE floats, at most 64 rows.
__device__ __forceinline__ int attn_tile(i64 hd) { return PREFOPT_ATT_TILE / hd < 64 ? (int)(PREFOPT_ATT_TILE / hd) : 64; }

// The kernels below are written once for each group size P (a template parameter, so that a
// thread's dimensions sit at constant offsets: no registers spent on addresses) and dispatched
// on attn_group(hd); their shared memory is the kernel's, passed down.
extern "C++" {
// This thread's place: its dimension p of P (it holds p, p + P, …, E of them below hd) and its
// row r of the R rows a job covers.
template <int P>
struct AttnLanes {
  int p, R, r, E;
  __device__ __forceinline__ explicit AttnLanes(i64 hd) : p((int)(threadIdx.x % P)), R((int)(blockDim.x / P)), r((int)(threadIdx.x / P)), E((int)((hd - p + P - 1) / P)) {}

  // Job j of B·H·tiles (tiles of R rows per (b, head)): its head, its batch entry and this
  // thread's row, clamped to the last (rows past the end compute it and write nothing).
  struct Job {
    i64 h, b, row, at;
  };
  __device__ __forceinline__ Job job(i64 j, i64 tiles, i64 H, i64 rows) const {
    const i64 row = j % tiles * R + r;
    return Job{j / tiles % H, j / (tiles * H), row, row < rows ? row : rows - 1};
  }
  // f(job) for each of this block's jobs: (b, head, tile of R rows) over B·H·⌈rows / R⌉.
  template <class F>
  __device__ __forceinline__ void jobs(i64 B, i64 H, i64 rows, F&& f) const {
    const i64 tiles = (rows + R - 1) / R;
    for (i64 j = blockIdx.x; j < B * H * tiles; j += gridDim.x) f(job(j, tiles, H, rows));
  }
  __device__ __forceinline__ static void zero(float* acc) {
    PREFOPT_UNROLL
    for (int e = 0; e < 32; e++) acc[e] = 0.f;
  }

  // The sum over the group's P threads (aligned lanes), returned to each.
  __device__ __forceinline__ float sum(float v) const {
    for (int o = P >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  // This thread's dimensions of the row at x; zeros past E.
  __device__ __forceinline__ void load(const float* x, float* out) const {
    x += p;
    PREFOPT_UNROLL
    for (int e = 0; e < 32; e++) out[e] = e < E ? x[P * e] : 0.f;
  }
  // The row's dot product with a (this thread's part, then the group's sum); two chains.
  __device__ __forceinline__ float dot(const float* a, const float* s) const {
    s += p;
    float s0 = 0.f, s1 = 0.f;
    PREFOPT_UNROLL
    for (int e = 0; e < 32; e += 2) {
      if (e < E) s0 += a[e] * s[P * e];
      if (e + 1 < E) s1 += a[e + 1] * s[P * (e + 1)];
    }
    return sum(s0 + s1);
  }
  // acc = acc·c + w·row s.
  __device__ __forceinline__ void axpy(float* acc, float c, float w, const float* s) const {
    s += p;
    PREFOPT_UNROLL
    for (int e = 0; e < 32; e++)
      if (e < E) acc[e] = acc[e] * c + w * s[P * e];
  }
  __device__ __forceinline__ void store(float* x, const float* v, float scale) const {
    x += p;
    PREFOPT_UNROLL
    for (int e = 0; e < 32; e++)
      if (e < E) x[P * e] = v[e] * scale;
  }
};

// s [n, hd] = rows [r0, r0 + n) of x [B, rows, heads, hd] at (b, head), by the whole block,
// between barriers (the previous tile is consumed before, this one complete after).
__device__ __forceinline__ void stage(float* s, const float* x, i64 b, i64 r0, int n, i64 rows, i64 heads, i64 head, i64 hd) {
  __syncthreads();
  const float* src = x + ((b * rows + r0) * heads + head) * hd;
  const int w = (int)hd;
  for (int t = threadIdx.x; t < n * w; t += blockDim.x) s[t] = src[(i64)(t / w) * heads * hd + t % w];
  __syncthreads();
}

// Whether the block can pass over a tile: every thread's row is `ready` and masks all n of the
// tile's keys (m[t·stride] ≤ −1e8; prefopt masks with −1e9). Exact: a ready row has a score
// above −1e7 in its running max (fwd) or its max (backward), so each skipped key's
// exp(s − max) is exp(< −8.9e7) = 0 in float32 — its term is +0 either way. A row that has seen
// no key it attends to is never ready (a fully masked row stays uniform over every key). For a
// causal mask this passes over the tiles above the diagonal. Uniform over the block.
__device__ __forceinline__ bool tile_masked(const float* m, i64 stride, int n, bool ready) {
#ifdef PREFOPT_ATTN_NO_SKIP  // check.cu's second build: every tile computed, the same bits expected
  return false;
#else
  __shared__ int all;
  bool mine = ready;
  for (int t = 0; mine && t < n; t++) mine = m[t * stride] <= -1e8f;
  __syncthreads();  // the previous tile's answer has been read
  if (threadIdx.x == 0) all = 1;
  __syncthreads();
  if (!mine) all = 0;
  __syncthreads();
  return all != 0;
#endif
}

// f(k row, v row, mask value) for each key of a query row (mask row mi), K and V staged by the
// block in tiles; a tile tile_masked passes over is skipped, `ready()` saying whether this row
// may skip.
template <class Ready, class F>
__device__ __forceinline__ void over_keys(float* ks, float* vs, const float* k, const float* v, i64 b, i64 g, i64 Tk, i64 KV, i64 hd, const float* mi, Ready&& ready, F&& f) {
  const int KT = attn_tile(hd), w = (int)hd;
  for (i64 j0 = 0; j0 < Tk; j0 += KT) {
    const int n = Tk - j0 < KT ? (int)(Tk - j0) : KT;
    if (tile_masked(mi + j0, 1, n, ready())) continue;
    stage(ks, k, b, j0, n, Tk, KV, g, hd);
    stage(vs, v, b, j0, n, Tk, KV, g, hd);
    for (int jj = 0; jj < n; jj++) f(ks + jj * w, vs + jj * w, mi[j0 + jj]);
  }
}

template <int P>
__device__ __forceinline__ void attention_fwd_p(float* ks, float* vs, const float* q, const float* k, const float* v, const float* mask, float scale, i64 B, i64 T, i64 Tk, i64 H, i64 KV,
                                                i64 hd, float* o, float* stat) {
  const AttnLanes<P> L(hd);
  L.jobs(B, H, T, [&](const typename AttnLanes<P>::Job& J) {
    const i64 h = J.h, b = J.b, i = J.row, ic = J.at;
    float qv[PREFOPT_ATT_DIMS], acc[PREFOPT_ATT_DIMS];
    L.load(q + ((b * T + ic) * H + h) * hd, qv);
    L.zero(acc);
    float m = -3.402823466e38f, l = 0.f;
    over_keys(ks, vs, k, v, b, h / (H / KV), Tk, KV, hd, mask + (b * T + ic) * Tk, [&] { return m >= -1e7f; }, [&](const float* kr, const float* vr, float mask_j) {
      float s = L.dot(qv, kr) * scale + mask_j;
      float mn = fmaxf(m, s), corr = expf(m - mn), pr = expf(s - mn);
      l = l * corr + pr;
      L.axpy(acc, corr, pr, vr);
      m = mn;
    });
    if (i < T) {
      L.store(o + ((b * T + i) * H + h) * hd, acc, 1.f / l);
      if (L.p == 0) stat[2 * ((b * H + h) * T + i)] = m, stat[2 * ((b * H + h) * T + i) + 1] = logf(l);
    }
  });
}

template <int P>
__device__ __forceinline__ void attention_bwd_dq_p(float* ks, float* vs, const float* q, const float* k, const float* v, const float* mask, const float* dout, const float* stat,
                                                   const float* delta, float scale, i64 B, i64 T, i64 Tk, i64 H, i64 KV, i64 hd, float* dq) {
  const AttnLanes<P> L(hd);
  L.jobs(B, H, T, [&](const typename AttnLanes<P>::Job& J) {
    const i64 h = J.h, b = J.b, i = J.row, ic = J.at, at = ((b * T + ic) * H + h) * hd;
    const float mr = stat[2 * ((b * H + h) * T + ic)], ll = stat[2 * ((b * H + h) * T + ic) + 1], de = delta[(b * H + h) * T + ic];
    float qv[PREFOPT_ATT_DIMS], dov[PREFOPT_ATT_DIMS], acc[PREFOPT_ATT_DIMS];
    L.load(q + at, qv);
    L.load(dout + at, dov);
    L.zero(acc);
    over_keys(ks, vs, k, v, b, h / (H / KV), Tk, KV, hd, mask + (b * T + ic) * Tk, [&] { return mr >= -1e7f; }, [&](const float* kr, const float* vr, float mask_j) {
      float pr = expf((L.dot(qv, kr) * scale + mask_j - mr) - ll);
      float ds = pr * (L.dot(dov, vr) - de);
      L.axpy(acc, 1.f, ds, kr);
    });
    if (i < T) L.store(dq + at, acc, scale);
  });
}

template <int P>
__device__ __forceinline__ void attention_bwd_dkdv_p(float* qs, float* dos, float* ls, float* dls, const float* q, const float* k, const float* v, const float* mask, const float* dout,
                                                     const float* stat, const float* delta, float scale, i64 B, i64 T, i64 Tk, i64 H, i64 KV, i64 hd, float* dk, float* dv) {
  const AttnLanes<P> L(hd);
  const int QT = attn_tile(hd), w = (int)hd;
  L.jobs(B, H, Tk, [&](const typename AttnLanes<P>::Job& J) {
    const i64 h = J.h, b = J.b, g = h / (H / KV), j = J.row, jc = J.at, kat = ((b * Tk + jc) * KV + g) * hd;
    const float* mj = mask + b * T * Tk + jc;
    float kv[PREFOPT_ATT_DIMS], vv[PREFOPT_ATT_DIMS], ak[PREFOPT_ATT_DIMS], av[PREFOPT_ATT_DIMS];
    L.load(k + kat, kv);
    L.load(v + kat, vv);
    L.zero(ak);
    L.zero(av);
    for (i64 i0 = 0; i0 < T; i0 += QT) {
      const int n = T - i0 < QT ? (int)(T - i0) : QT;
      __syncthreads();
      for (int t = threadIdx.x; t < 2 * n; t += blockDim.x) ls[t] = stat[2 * ((b * H + h) * T + i0) + t];  // (m, log Σ) pairs
      for (int t = threadIdx.x; t < n; t += blockDim.x) dls[t] = delta[(b * H + h) * T + i0 + t];
      __syncthreads();
      bool ready = true;
      for (int t = 0; t < n; t++) ready = ready && ls[2 * t] >= -1e7f;
      if (tile_masked(mj + i0 * Tk, Tk, n, ready)) continue;
      stage(qs, q, b, i0, n, T, H, h, hd);
      stage(dos, dout, b, i0, n, T, H, h, hd);
      for (int ii = 0; ii < n; ii++) {
        float pr = expf((L.dot(kv, qs + ii * w) * scale + mj[(i0 + ii) * Tk] - ls[2 * ii]) - ls[2 * ii + 1]);
        float ds = pr * (L.dot(vv, dos + ii * w) - dls[ii]);
        L.axpy(av, 1.f, pr, dos + ii * w);
        L.axpy(ak, 1.f, ds, qs + ii * w);
      }
    }
    if (j < Tk) {
      const i64 out = ((b * Tk + j) * H + h) * hd;
      L.store(dk + out, ak, scale);
      L.store(dv + out, av, 1.f);
    }
  });
}
}  // extern "C++"

// The kernels' dispatch on the group size.
#define PREFOPT_ATTN_DISPATCH(f, ...)                  \
  switch (attn_group(hd)) {                            \
    case 1: f<1>(__VA_ARGS__); break;                  \
    case 2: f<2>(__VA_ARGS__); break;                  \
    case 4: f<4>(__VA_ARGS__); break;                  \
    default: f<8>(__VA_ARGS__);                        \
  }

__global__ void attention_fwd(const float* q, const float* k, const float* v, const float* mask, float scale, i64 B, i64 T, i64 Tk, i64 H, i64 KV, i64 hd, float* o, float* stat) {
  __shared__ float ks[PREFOPT_ATT_TILE], vs[PREFOPT_ATT_TILE];
  PREFOPT_ATTN_DISPATCH(attention_fwd_p, ks, vs, q, k, v, mask, scale, B, T, Tk, H, KV, hd, o, stat)
}

// delta [B, H, T] = Σ_d dO·O per query row: the softmax gradient's row term. A warp per row
// (one pass over two rows: the layout above would gain nothing).
__global__ void attention_bwd_delta(const float* o, const float* dout, i64 B, i64 T, i64 H, i64 hd, float* delta) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const i64 rows = B * H * T;
  for (i64 base = blockIdx.x * (i64)warps; base < rows; base += (i64)gridDim.x * warps) {
    const i64 row = base + (threadIdx.x >> 5), t = row < rows ? row : rows - 1;
    const i64 i = t % T, h = t / T % H, b = t / (T * H);
    const float* oi = o + ((b * T + i) * H + h) * hd;
    const float* di = dout + ((b * T + i) * H + h) * hd;
    float s = 0.f;
    for (i64 d = lane; d < hd; d += 32) s += oi[d] * di[d];
    s = warp_sum(s);
    if (row < rows && lane == 0) delta[t] = s;
  }
}

// dq_i = scale · Σ_j p_ij (dO_i·v_j − delta_i) k_j: query rows as in attention_fwd.
__global__ void attention_bwd_dq(const float* q, const float* k, const float* v, const float* mask, const float* dout, const float* stat, const float* delta, float scale, i64 B, i64 T, i64 Tk,
                                 i64 H, i64 KV, i64 hd, float* dq) {
  __shared__ float ks[PREFOPT_ATT_TILE], vs[PREFOPT_ATT_TILE];
  PREFOPT_ATTN_DISPATCH(attention_bwd_dq_p, ks, vs, q, k, v, mask, dout, stat, delta, scale, B, T, Tk, H, KV, hd, dq)
}

// One query head's share of the key side: dv_j = Σ_i p_ij dO_i and dk_j = scale · Σ_i p_ij
// (dO_i·v_j − delta_i) q_i for key rows j, written to dk, dv [B, Tk, H, hd] at head h — the
// heads of a kv group are summed by head_group_sum (or, without grouping, this is dk, dv):
// a job per (b, head, tile of keys), so there are as many jobs as for the query side, and no
// atomics. The queries, their dO, stat and delta are staged in tiles.
__global__ void attention_bwd_dkdv(const float* q, const float* k, const float* v, const float* mask, const float* dout, const float* stat, const float* delta, float scale, i64 B, i64 T,
                                   i64 Tk, i64 H, i64 KV, i64 hd, float* dk, float* dv) {
  __shared__ float qs[PREFOPT_ATT_TILE], dos[PREFOPT_ATT_TILE], ls[128], dls[64];
  PREFOPT_ATTN_DISPATCH(attention_bwd_dkdv_p, qs, dos, ls, dls, q, k, v, mask, dout, stat, delta, scale, B, T, Tk, H, KV, hd, dk, dv)
}

// out [n, KV, hd] = Σ_{s < G} part [n, KV, G, hd] over s in order: the query heads of each kv
// group summed (attention_bwd_dkdv's per-head dk and dv).
__global__ void head_group_sum(const float* part, i64 n, i64 KV, i64 G, i64 hd, float* out) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n * KV * hd; i += (i64)gridDim.x * blockDim.x) {
    const i64 d = i % hd, row = i / hd;  // row = t·KV + g
    const float* p = part + row * G * hd + d;
    float s = 0.f;
    for (i64 si = 0; si < G; si++) s += p[si * hd];
    out[i] = s;
  }
}

// ---- attention by products ------------------------------------------------------------------------
// For sequences whose scores fit in memory, engine/cuda-fused runs attention as cuBLASLt products
// (tensor cores) around these two row kernels: with q, k, v as [B, KV, G·T or Tk, hd], the scores
// of every batch entry's kv group are one product, [G·T, Tk] — rows ordered (b, kv head, query
// head of the group, t), B·H·T of them.
//
// s ← softmax(scale·s + mask[b, 0, t]) over each row of Tk, in place (rows_per_b = H·T). One
// block per row; the backward pass runs it again on the same scores for the same bits.
__global__ void softmax_rows(float* s, const float* mask, i64 T, i64 Tk, i64 rows_per_b, float scale) {
  const i64 row = blockIdx.x;
  float* si = s + row * Tk;
  const float* mi = mask + (row / rows_per_b * T + row % T) * Tk;
  float m = -3.402823466e38f;
  for (i64 j = threadIdx.x; j < Tk; j += blockDim.x) m = fmaxf(m, scale * si[j] + mi[j]);
  m = block_max(m);
  float sum = 0.f;
  for (i64 j = threadIdx.x; j < Tk; j += blockDim.x) sum += expf(scale * si[j] + mi[j] - m);
  const float inv = 1.f / block_sum(sum);
  for (i64 j = threadIdx.x; j < Tk; j += blockDim.x) si[j] = expf(scale * si[j] + mi[j] - m) * inv;
}

// dp ← scale·p·(dp − Σ_j p_j·dp_j) over each row of Tk, in place: the gradient of the scaled
// scores from that of the probabilities (the mask is constant). One block per row.
__global__ void softmax_grad_rows(const float* p, float* dp, i64 Tk, float scale) {
  const i64 row = blockIdx.x;
  const float* pi = p + row * Tk;
  float* di = dp + row * Tk;
  float d = 0.f;
  for (i64 j = threadIdx.x; j < Tk; j += blockDim.x) d += pi[j] * di[j];
  d = block_sum(d);
  for (i64 j = threadIdx.x; j < Tk; j += blockDim.x) di[j] = scale * pi[j] * (di[j] - d);
}

// ---- sampling ------------------------------------------------------------------------------------
// JavaScript's Math.exp (V8's is fdlibm's exp) step for step in double: argument reduction
// x = k·ln2 + r (ln2 in two parts), a degree-10 rational approximation on r, scaling by 2^k.
// With --fmad=false every operation rounds as the host's do, so the bits are Math.exp's
// (test/helpers/cuda-cases.ts holds them to it).
// The double's bits and back (a union: usable on the host too, where check.cu compares).
union JsDouble {
  double d;
  unsigned long long u;
};
__host__ __device__ __forceinline__ unsigned long long js_bits(double d) {
  JsDouble v;
  v.d = d;
  return v.u;
}
__host__ __device__ __forceinline__ double js_double(unsigned long long u) {
  JsDouble v;
  v.u = u;
  return v.d;
}
__host__ __device__ __forceinline__ double js_exp(double x) {
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10, inv_ln2 = 1.44269504088896338700e+00;
  const double p1 = 1.66666666666666019037e-01, p2 = -2.77777777770155933842e-03, p3 = 6.61375632143793436117e-05, p4 = -1.65339022054652515390e-06,
               p5 = 4.13813679705723846039e-08;
  const unsigned long long bits = js_bits(x);
  const unsigned high = (unsigned)(bits >> 32) & 0x7fffffffu;
  const bool negative = (bits >> 63) != 0;
  if (high >= 0x40862E42u) {  // |x| ≥ 709.78: NaN, ±∞, overflow or underflow
    if (high >= 0x7ff00000u) return x != x ? x + x : negative ? 0.0 : x;
    if (x > 7.09782712893383973096e+02) return js_double(0x7ff0000000000000ull);
    if (x < -7.45133219101941108420e+02) return 0.0;
  }
  double hi = 0.0, lo = 0.0;
  int k = 0;
  if (high > 0x3fd62e42u) {  // |x| > ln2 / 2
    if (high < 0x3FF0A2B2u) {  // |x| < 3·ln2 / 2: k = ±1
      hi = negative ? x + ln2_hi : x - ln2_hi;
      lo = negative ? -ln2_lo : ln2_lo;
      k = negative ? -1 : 1;
    } else {
      k = (int)(inv_ln2 * x + (negative ? -0.5 : 0.5));
      hi = x - (double)k * ln2_hi;
      lo = (double)k * ln2_lo;
    }
    x = hi - lo;
  } else if (high < 0x3e300000u) {
    return 1.0 + x;  // |x| < 2⁻²⁸
  }
  const double t = x * x;
  const double c = x - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))));
  if (k == 0) return 1.0 - ((x * c) / (c - 2.0) - x);
  const double y = 1.0 - ((lo - (x * c) / (2.0 - c)) - hi);
  if (k >= -1021) {
    if (k == 1024) return y * 2.0 * 8.988465674311579539e307;
    return y * js_double((unsigned long long)(0x3ff00000u + ((unsigned)k << 20)) << 32);
  }
  return y * js_double((unsigned long long)(0x3ff00000u + ((unsigned)(k + 1000) << 20)) << 32) * 9.33263618503218878990e-302;
}

// exps[row, i] = Math.exp(x_i / t − max_j x_j / t) in double for a row x of V float32 logits: the
// host sampler's first pass (infer/sampling: filteredProbs), which then needs only to sum, divide
// and draw. One block per row; the max is taken in shared memory (order does not matter to it).
__global__ void sample_exps(const float* logits, i64 V, double t, double* exps) {
  __shared__ double part[1024];
  const i64 row = blockIdx.x;
  const float* x = logits + row * V;
  double m = -js_double(0x7ff0000000000000ull);
  for (i64 i = threadIdx.x; i < V; i += blockDim.x) {
    const double s = (double)x[i] / t;
    if (s > m) m = s;
  }
  part[threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (unsigned j = 1; j < blockDim.x; j++)
      if (part[j] > m) m = part[j];
    part[0] = m;
  }
  __syncthreads();
  m = part[0];
  for (i64 i = threadIdx.x; i < V; i += blockDim.x) exps[row * V + i] = js_exp((double)x[i] / t - m);
}

// Σ e_0 + … + e_{V−1} in index order, for every thread of the block: one thread's sequential chain
// (its order is its result), the block staging each chunk of the row in `buf` (blockDim doubles)
// so that the thread reads at shared memory's latency.
__device__ double row_sum_in_order(const double* e, i64 V, double* buf) {
  __shared__ double total;
  const i64 B = blockDim.x;
  double z = 0.0;
  for (i64 c = 0; c < V; c += B) {
    const i64 n = V - c < B ? V - c : B;
    __syncthreads();
    if (threadIdx.x < n) buf[threadIdx.x] = e[c + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0)
      for (i64 j = 0; j < n; j++) z += buf[j];
  }
  if (threadIdx.x == 0) total = z;
  __syncthreads();
  return total;
}

// ids[row] = infer/sampling's draw from a row's exps when nothing is filtered: p_i = e_i / Σe (the
// sum in index order), the first i at which u − p_0 − … − p_i falls below 0, else the first most
// probable — the host's operations in the host's order, so the host's token. The walk is one
// thread's chain too, over chunks staged divided.
__global__ void sample_draw(const double* exps, i64 V, const double* u, int* ids) {
  __shared__ double buf[1024];
  __shared__ long long found;
  const i64 row = blockIdx.x;
  const double* e = exps + row * V;
  const i64 B = blockDim.x;
  const double z = row_sum_in_order(e, V, buf);
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  double w = u[row];
  for (i64 c = 0; c < V && found < 0; c += B) {
    const i64 n = V - c < B ? V - c : B;
    if (threadIdx.x < n) buf[threadIdx.x] = e[c + threadIdx.x] / z;
    __syncthreads();
    if (threadIdx.x == 0)
      for (i64 j = 0; j < n; j++) {
        w -= buf[j];
        if (w < 0) {
          found = c + j;
          break;
        }
      }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  if (found < 0) {  // rounding left u above the total: the first most probable
    double best = e[0] / z;
    found = 0;
    for (i64 i = 1; i < V; i++)
      if (e[i] / z > best) best = e[i] / z, found = i;
  }
  ids[row] = (int)found;
}

// The most tokens sample_kept sorts (engine/kernels.ts: SAMPLE_KEPT_MAX says it to the host).
#define KEPT_MAX 2048
#define KEPT_BLOCK 256

// Bitonic sort of n (a power of two, ≤ KEPT_MAX) entries (p, id) in shared memory, into
// infer/sampling's order — p descending, ties by id — or, by_id, ids ascending.
__device__ void kept_sort(double* p, int* id, unsigned n, bool by_id) {
  for (unsigned size = 2; size <= n; size <<= 1)
    for (unsigned stride = size / 2; stride > 0; stride >>= 1) {
      for (unsigned i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const unsigned a = 2 * i - (i & (stride - 1)), b = a + stride;
        const unsigned lo = (a & size) == 0 ? a : b, hi = lo == a ? b : a;
        // lo must precede hi: swap where hi's entry comes first.
        const bool first = by_id ? id[hi] < id[lo] : p[hi] > p[lo] || (p[hi] == p[lo] && id[hi] < id[lo]);
        if (first) {
          const double tp = p[lo];
          const int ti = id[lo];
          p[lo] = p[hi], id[lo] = id[hi], p[hi] = tp, id[hi] = ti;
        }
      }
      __syncthreads();
    }
}

// ids[row] = infer/sampling's draw with top-k and top-p (k = V: no top-k; top_p = 1: no top-p):
// probs_i = e_i / Σe (the host's normalise, written over the exps), then keptPrefix — the first
// min(k, V) tokens in the order p descending, ties by id, cut at the shortest prefix whose mass
// reaches top_p — and the draw over those tokens in id order with probabilities p / (their sum
// in the order's order): the host's operations in its order, so its token. The first
// C = min(k, V, KEPT_MAX) tokens of the order are found without sorting the row: a radix select
// on p's bits (a non-negative double's bits order as it does), four bits a pass, gives the C-th
// one's value; the tokens above it and the first of its ties by id are gathered and sorted. Where
// more than KEPT_MAX tokens are kept (top-p not reached within them, k larger), ids[row] = −1: the
// host samples that row from probs. Blocks of KEPT_BLOCK threads at most.
__global__ void sample_kept(double* exps, i64 V, i64 k, double top_p, const double* u, int* ids) {
  __shared__ double buf[KEPT_BLOCK];
  __shared__ double cp[KEPT_MAX];
  __shared__ int ci[KEPT_MAX];
  __shared__ unsigned red[16 * KEPT_BLOCK];
  __shared__ long long kept;  // n, or −1 where the prefix is not settled
  __shared__ double mass;
  const i64 row = blockIdx.x;
  double* e = exps + row * V;
  const unsigned B = blockDim.x, t = threadIdx.x;
  const double z = row_sum_in_order(e, V, buf);
  for (i64 i = t; i < V; i += B) e[i] /= z;
  __syncthreads();
  const i64 want = k < V ? k : V, C = want < KEPT_MAX ? want : KEPT_MAX;
  // The C-th largest bits: each pass fixes four more bits of it, counting the tokens that match
  // it so far by their next digit; `rank` is its place among those.
  unsigned long long prefix = 0, mask = 0;
  i64 rank = C;
  for (int shift = 60; shift >= 0; shift -= 4) {
    unsigned c[16];
    for (int d = 0; d < 16; d++) c[d] = 0;
    for (i64 i = t; i < V; i += B) {
      const unsigned long long b = js_bits(e[i]);
      if ((b & mask) == prefix) c[(b >> shift) & 15]++;
    }
    for (int d = 0; d < 16; d++) red[d * KEPT_BLOCK + t] = c[d];
    __syncthreads();
    for (unsigned s = B / 2; s > 0; s >>= 1) {
      if (t < s)
        for (int d = 0; d < 16; d++) red[d * KEPT_BLOCK + t] += red[d * KEPT_BLOCK + t + s];
      __syncthreads();
    }
    int d = 15;
    for (; d > 0 && red[d * KEPT_BLOCK] < rank; d--) rank -= red[d * KEPT_BLOCK];
    prefix |= (unsigned long long)d << shift;
    mask |= 15ull << shift;
    __syncthreads();
  }
  // Gathered: the C − rank tokens above the C-th value, then its first `rank` ties by id. Each
  // thread takes a contiguous stretch, so the ties' places follow id order.
  const i64 L = (V + B - 1) / B, lo = t * L < V ? t * L : V, hi = lo + L < V ? lo + L : V;
  unsigned above = 0, ties = 0;
  for (i64 i = lo; i < hi; i++) {
    const unsigned long long b = js_bits(e[i]);
    above += b > prefix;
    ties += b == prefix;
  }
  red[t] = above, red[KEPT_BLOCK + t] = ties;
  __syncthreads();
  if (t == 0) {
    unsigned sa = 0, st = 0;
    for (unsigned j = 0; j < B; j++) {
      const unsigned a = red[j], s = red[KEPT_BLOCK + j];
      red[j] = sa, red[KEPT_BLOCK + j] = st, sa += a, st += s;
    }
  }
  __syncthreads();
  unsigned at = red[t], tie = red[KEPT_BLOCK + t];
  const unsigned first_tie = (unsigned)(C - rank);
  for (i64 i = lo; i < hi; i++) {
    const unsigned long long b = js_bits(e[i]);
    if (b > prefix) cp[at] = e[i], ci[at++] = (int)i;
    else if (b == prefix && tie < rank) cp[first_tie + tie] = e[i], ci[first_tie + tie++] = (int)i;
  }
  unsigned n2 = 1;
  while (n2 < C) n2 <<= 1;
  for (unsigned i = (unsigned)C + t; i < n2; i += B) cp[i] = -1.0, ci[i] = 0x7fffffff;
  __syncthreads();
  kept_sort(cp, ci, n2, false);
  if (t == 0) {  // keptPrefix's cut, then the kept mass in the order's order
    i64 n = C;
    bool reached = false;
    double cum = 0;
    for (i64 i = 0; i < n && top_p < 1 && !reached; i++) {
      cum += cp[i];
      if (cum >= top_p) n = i + 1, reached = true;
    }
    double s = 0;
    for (i64 i = 0; i < n; i++) s += cp[i];
    kept = !reached && C < want ? -1 : n, mass = s;
  }
  __syncthreads();
  const i64 n = kept;
  if (n < 0) {
    if (t == 0) ids[row] = -1;
    return;
  }
  for (unsigned i = (unsigned)n + t; i < n2; i += B) ci[i] = 0x7fffffff;
  __syncthreads();
  kept_sort(cp, ci, n2, true);
  if (t != 0) return;
  const double s = mass;
  double w = u[row];
  for (i64 i = 0; i < n; i++) {
    w -= cp[i] / s;
    if (w < 0) {
      ids[row] = ci[i];
      return;
    }
  }
  i64 best = 0;  // rounding left u above the total: the first most probable
  for (i64 i = 1; i < n; i++)
    if (cp[i] / s > cp[best] / s) best = i;
  ids[row] = ci[best];
}

// ---- AdamW -------------------------------------------------------------------------------------
// Every parameter of an optimizer step in one launch (an adapter has hundreds of small ones, a
// launch each otherwise). tab holds, per tensor, PREFOPT_ADAMW_WORDS words: p, g, m, v
// (addresses), n, its first chunk of PREFOPT_ADAMW_CHUNK elements (ascending), then the float bits
// of its nine scalars as train/adamw computes them (gscale, β1, 1−β1, β2, 1−β2, √bc2, ε, step,
// decay). A block takes a chunk at a time and finds its tensor by bisection. The update is the CPU
// kernel's, operation for operation: g' = g·gscale, m' = β1·m + (1−β1)·g',
// v' = β2·v + (1−β2)·g'², p' = p − m'/(√v'/√bc2 + ε)·step − p·decay; in place.
#define PREFOPT_ADAMW_CHUNK 4096
#define PREFOPT_ADAMW_WORDS 15
__global__ void adamw(const i64* tab, int count, i64 chunks) {
  for (i64 c = blockIdx.x; c < chunks; c += gridDim.x) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tab[mid * PREFOPT_ADAMW_WORDS + 5] <= c) lo = mid;
      else hi = mid - 1;
    }
    const i64* e = tab + lo * PREFOPT_ADAMW_WORDS;
    float* p = reinterpret_cast<float*>(e[0]);
    const float* g = reinterpret_cast<const float*>(e[1]);
    float* m = reinterpret_cast<float*>(e[2]);
    float* v = reinterpret_cast<float*>(e[3]);
    const i64 begin = (c - e[5]) * PREFOPT_ADAMW_CHUNK;
    const i64 end = begin + PREFOPT_ADAMW_CHUNK < e[4] ? begin + PREFOPT_ADAMW_CHUNK : e[4];
    float s[9];
    for (int k = 0; k < 9; k++) s[k] = __uint_as_float((unsigned)e[6 + k]);
    for (i64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
      float gi = g[i] * s[0];
      float mi = m[i] * s[1] + gi * s[2];
      float vi = v[i] * s[3] + gi * gi * s[4];
      float next = p[i] - (mi / (sqrtf(vi) / s[5] + s[6])) * s[7];
      if (s[8] != 0.f) next -= p[i] * s[8];
      p[i] = next;
      m[i] = mi;
      v[i] = vi;
    }
  }
}

// ---- glue: what the tfjs graph around the fused kernels needs on the device -------------------
// Up to 6 dimensions: the shape of the iteration and the element strides of two operands (0
// where one is broadcast). Passed by value: no upload per launch.
#define PREFOPT_MAX_RANK 6
struct Dims {
  i64 shape[PREFOPT_MAX_RANK];
  i64 a[PREFOPT_MAX_RANK];
  i64 b[PREFOPT_MAX_RANK];
};

// The two operands' offsets of element i of the iteration (row-major over d.shape).
__device__ __forceinline__ void dims_offsets(const Dims& d, int rank, i64 i, i64* oa, i64* ob) {
  i64 a = 0, b = 0;
  for (int r = rank - 1; r >= 0; r--) {
    i64 idx = i % d.shape[r];
    i /= d.shape[r];
    a += idx * d.a[r];
    b += idx * d.b[r];
  }
  *oa = a;
  *ob = b;
}

// dst[Σ idx·d.b] = src[Σ idx·d.a] over the n elements of d.shape, 4-byte elements (float32 or
// int32): slices, concatenation, splits, transposes and padding are all this copy.
__global__ void strided_copy(const u32* src, u32* dst, i64 n, int rank, Dims d) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    i64 oa, ob;
    dims_offsets(d, rank, i, &oa, &ob);
    dst[ob] = src[oa];
  }
}

// y[i] = a[·] op b[·] with numpy broadcasting through the strides, y contiguous over d.shape; op:
// 0 add, 1 subtract, 2 multiply, 3 divide, 4 minimum, 5 maximum — those two as JavaScript's
// Math.min and Math.max (tfjs's cpu kernels): NaN if either is, −0 below +0.
__global__ void binary(int op, const float* a, const float* b, float* y, i64 n, int rank, Dims d) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    i64 oa, ob;
    dims_offsets(d, rank, i, &oa, &ob);
    const float x = a[oa], z = b[ob];
    if (op < 4) {
      y[i] = op == 0 ? x + z : op == 1 ? x - z : op == 2 ? x * z : x / z;
      continue;
    }
    const bool xneg = (__float_as_uint(x) >> 31) != 0;
    const bool pick_x = op == 4 ? x < z || (x == z && xneg) : x > z || (x == z && !xneg);
    y[i] = x != x || z != z ? x + z : pick_x ? x : z;
  }
}

// y[i] = a[·] op b[·] ? 1 : 0 as bytes (tfjs's bool), broadcast as in binary; op: 0 <, 1 ≤, 2 >,
// 3 ≥, 4 =, 5 ≠ (a NaN compares unequal to everything).
__global__ void compare(int op, const float* a, const float* b, u8* y, i64 n, int rank, Dims d) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    i64 oa, ob;
    dims_offsets(d, rank, i, &oa, &ob);
    const float x = a[oa], z = b[ob];
    y[i] = op == 0 ? x < z : op == 1 ? x <= z : op == 2 ? x > z : op == 3 ? x >= z : op == 4 ? x == z : x != z;
  }
}

// y = op(x) as tfjs's cpu kernels compute it: 0 −x, 1 eˣ, 2 |x|, 3 ln x, 4 ln(1 + x), 5 max(0, x)
// (NaN kept), 6 x², 7 √x, 8 1 / (1 + e⁻ˣ), 9 step: 1 where x > 0, else alpha (NaN kept) — the
// gradients of |x| and max(0, x).
__global__ void unary(int op, const float* x, float* y, i64 n, float alpha) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float v = x[i];
    float r;
    switch (op) {
      case 0: r = -v; break;
      case 1: r = expf(v); break;
      case 2: r = fabsf(v); break;
      case 3: r = logf(v); break;
      case 4: r = log1pf(v); break;
      case 5: r = v != v || v > 0.f ? v : 0.f; break;
      case 6: r = v * v; break;
      case 7: r = sqrtf(v); break;
      case 8: r = 1.f / (1.f + expf(-v)); break;
      default: r = v != v ? v : v > 0.f ? 1.f : alpha;
    }
    y[i] = r;
  }
}

// y = x converted between tfjs's dtypes (0 float32, 1 int32, 2 bool bytes), as its cpu kernel
// does: to int32 as JavaScript's ToInt32 (truncated, modulo 2³², NaN and ±∞ to 0), to bool x ≠ 0.
__global__ void cast(const void* x, int from, int to, i64 n, void* y) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float f = from == 0 ? ((const float*)x)[i] : 0.f;
    const int k = from == 1 ? ((const int*)x)[i] : from == 2 ? (int)((const u8*)x)[i] : 0;
    if (to == 0) ((float*)y)[i] = from == 0 ? f : (float)k;
    else if (to == 2) ((u8*)y)[i] = from == 0 ? f != 0.f : k != 0;
    else if (from != 0) ((int*)y)[i] = k;
    else if (f != f || f - f != 0.f) ((int*)y)[i] = 0;  // NaN or ±∞
    else if (fabsf(f) < 2147483648.f) ((int*)y)[i] = (int)f;
    else {
      double m = fmod((double)f, 4294967296.0);  // |f| ≥ 2³¹ is an integer
      ((int*)y)[i] = (int)(u32)(m < 0 ? m + 4294967296.0 : m);
    }
  }
}

// n 4-byte words set to the bits v (a float's or an int's).
__global__ void fill32(u32* y, i64 n, u32 v) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) y[i] = v;
}

// model/mask.ts's attention mask [B, 1, T, Tk] made where it is used: query t of row b (key index
// qi = Tk − T + t) sees key j when j ≤ qi, j is within the window (window < 0: none), key j is valid
// and in qi's segment; every other entry is model/mask.ts's MASKED. From B·Tk ids, not B·T·Tk
// floats copied up.
__global__ void attention_mask(const int* valid, const int* seg, i64 B, i64 T, i64 Tk, i64 window, float* out) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < B * T * Tk; i += (i64)gridDim.x * blockDim.x) {
    const i64 j = i % Tk, t = i / Tk % T, b = i / (T * Tk);
    const i64 qi = Tk - T + t;
    const bool seen = j <= qi && (window < 0 || qi - j < window) && valid[b * Tk + j] != 0 && seg[b * Tk + j] == seg[b * Tk + qi];
    out[i] = seen ? 0.f : -1e9f;
  }
}

// y[row] = Σ_j x[row, j]: one block per row.
__global__ void sum_rows(const float* x, i64 cols, float* y) {
  const i64 row = blockIdx.x;
  float s = 0.f;
  for (i64 j = threadIdx.x; j < cols; j += blockDim.x) s += x[row * cols + j];
  s = block_sum(s);
  if (threadIdx.x == 0) y[row] = s;
}

// y = x + b over rows of d (x may be y).
__global__ void bias_add(const float* x, const float* b, i64 n, i64 d, float* y) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n * d; i += (i64)gridDim.x * blockDim.x) y[i] = x[i] + b[i % d];
}

// out[j] = Σ_rows dy[row, j], a thread per column, rows in order.
__global__ void column_sum(const float* dy, i64 n, i64 d, float* out) {
  for (i64 j = blockIdx.x * (i64)blockDim.x + threadIdx.x; j < d; j += (i64)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (i64 i = 0; i < n; i++) s += dy[i * d + j];
    out[j] = s;
  }
}

// out[0] = Σ x², one block (launch with grid 1): the gradient norm, once per step.
__global__ void sum_squares(const float* x, i64 n, float* out) {
  float s = 0.f;
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += x[i] * x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = s;
}

// r[row] = 1/sqrt(mean(x²) + eps), as rms_norm computes it: for a backward pass whose forward
// pass kept no r.
__global__ void rms_inv(const float* x, i64 D, float eps, float* r) {
  const i64 row = blockIdx.x;
  float ss = 0.f;
  for (i64 j = threadIdx.x; j < D; j += blockDim.x) ss += x[row * D + j] * x[row * D + j];
  ss = block_sum(ss);
  if (threadIdx.x == 0) r[row] = 1.f / sqrtf(ss / (float)D + eps);
}

// qkv [N, KV, G+2, hd] ↔ q [N, KV·G, hd], k, v [N, KV, hd] (merge: q, k, v → qkv).
__global__ void split_qkv(float* qkv, i64 N, i64 KV, i64 G, i64 hd, float* q, float* k, float* v, int merge) {
  const i64 n = N * KV * (G + 2) * hd;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    i64 d = i % hd, s = i / hd % (G + 2), g = i / (hd * (G + 2)) % KV, t = i / (hd * (G + 2) * KV);
    float* o = s < G ? q + ((t * KV + g) * G + s) * hd + d : (s == G ? k : v) + (t * KV + g) * hd + d;
    if (merge) qkv[i] = *o;
    else *o = qkv[i];
  }
}

// out [n, D] = table rows ids (zeros for an id outside [0, V)).
__global__ void embed(const float* table, i64 V, i64 D, const int* ids, i64 n, float* out) {
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n * D; i += (i64)gridDim.x * blockDim.x) {
    i64 id = ids[i / D];
    out[i] = id >= 0 && id < V ? table[id * D + i % D] : 0.f;
  }
}

// dtable[ids[u], j] = Σ dy[rows[k], j] over k in [starts[u], starts[u + 1]), in order: the rows
// of each of U distinct ids, grouped on the host (a stable sort), so a thread per (id, column)
// sums them with no atomics and no serial walk over all rows. Other rows of dtable are left as
// they are (zeroed before).
__global__ void embed_grad(const int* ids, const int* starts, const int* rows, i64 U, const float* dy, i64 D, float* dtable) {
  for (i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x; t < U * D; t += (i64)gridDim.x * blockDim.x) {
    const i64 u = t / D, j = t % D;
    float s = 0.f;
    for (int k = starts[u]; k < starts[u + 1]; k++) s += dy[(i64)rows[k] * D + j];
    dtable[(i64)ids[u] * D + j] = s;
  }
}

// ---- dropout masks: tf.dropout's alea stream, drawn on the device ------------------------------
// The CPU kernel's generator (native/fused.cc, docs/REFERENCE.md §11): the state Y = c·b³ + S2·b²
// + S1·b + S0 (b = 2³²) is k draws later Y·J_k mod m, m = a·b³ − 1 < 2¹¹⁷. The host gives J for
// every chunk's start (alea_jumps: J_{i·PREFOPT_ALEA_CHUNK}); a thread takes a chunk, jumps with
// one modular product (117-bit words as two 64-bit halves: no __int128, which NVRTC does not
// take by default) and draws it, writing its mask words — the CPU's bits exactly. A thread's
// draws are one serial chain and a 0.5B LoRA input's mask is 1.8M draws, a few thousand chunks:
// too few threads to hide latency, so the chain is kept short (the jump costs about as much as
// 256 draws).
#define PREFOPT_ALEA_CHUNK 256
typedef unsigned long long u64;
struct AleaWide {
  u64 lo, hi;
};
#define PREFOPT_ALEA_A 2091639ull

// x + y mod m, for x, y < m (the sum is below 2¹¹⁸: no overflow).
__device__ __forceinline__ AleaWide alea_add_mod(AleaWide x, AleaWide y) {
  const u64 mhi = (PREFOPT_ALEA_A << 32) - 1, mlo = ~0ull;  // m = a·2⁹⁶ − 1
  AleaWide r;
  r.lo = x.lo + y.lo;
  r.hi = x.hi + y.hi + (r.lo < x.lo ? 1 : 0);
  if (r.hi > mhi || (r.hi == mhi && r.lo == mlo)) {
    r.hi = r.hi - mhi - (r.lo < mlo ? 1 : 0);
    r.lo = r.lo - mlo;
  }
  return r;
}

// x·j mod m by doubling and adding over j's 117 bits.
__device__ __forceinline__ AleaWide alea_mul_mod(AleaWide x, AleaWide j) {
  AleaWide r = {0, 0};
  for (int i = 116; i >= 0; i--) {
    r = alea_add_mod(r, r);
    if ((i >= 64 ? j.hi >> (i - 64) : j.lo >> i) & 1) r = alea_add_mod(r, x);
  }
  return r;
}

// bits (⌈n / 32⌉ words) = which of n draws from the state (s0, s1, s2, c) keep their element:
// floor(u + keep) ≠ 0, u the draw as float32 (tf.dropout's test). jumps: 2 words per chunk.
__global__ void alea_bits(i64 n, u32 s0, u32 s1, u32 s2, u32 c, const u64* jumps, float keep, u32* bits) {
  const i64 chunks = (n + PREFOPT_ALEA_CHUNK - 1) / PREFOPT_ALEA_CHUNK;
  for (i64 ch = blockIdx.x * (i64)blockDim.x + threadIdx.x; ch < chunks; ch += (i64)gridDim.x * blockDim.x) {
    const AleaWide y = {((u64)s1 << 32) | s0, ((u64)c << 32) | s2}, j = {jumps[2 * ch], jumps[2 * ch + 1]};
    const AleaWide z = alea_mul_mod(y, j);
    u32 w0 = (u32)z.lo, w1 = (u32)(z.lo >> 32), w2 = (u32)z.hi;
    u64 carry = z.hi >> 32;
    const i64 i0 = ch * PREFOPT_ALEA_CHUNK, i1 = i0 + PREFOPT_ALEA_CHUNK < n ? i0 + PREFOPT_ALEA_CHUNK : n;
    u32 word = 0;
    for (i64 i = i0; i < i1; i++) {
      const u64 t = PREFOPT_ALEA_A * w0 + carry;
      w0 = w1, w1 = w2, carry = t >> 32, w2 = (u32)t;
      const float u = (float)((double)w2 * 2.3283064365386963e-10);
      if (floorf(u + keep) != 0.f) word |= 1u << (i & 31);
      if ((i & 31) == 31 || i == i1 - 1) bits[i >> 5] = word, word = 0;
    }
  }
}

// y_i = x_i·(1/keep) where bit i is set, x_i·0 elsewhere (the CPU kernel's expression).
__global__ void dropout_bits(const float* x, i64 n, const u32* bits, float keep, float* y) {
  const float scale = 1.f / keep;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) y[i] = (bits[i >> 5] >> (i & 31)) & 1u ? x[i] * scale : x[i] * 0.f;
}

// y [outer, m, inner] = x [outer, axis, inner] at indices idx [m] (4-byte elements).
__global__ void gather(const u32* x, const int* idx, i64 outer, i64 m, i64 axis, i64 inner, u32* y) {
  const i64 n = outer * m * inner;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    i64 in = i % inner, j = i / inner % m, o = i / (inner * m);
    y[i] = x[(o * axis + idx[j]) * inner + in];
  }
}

}  // extern "C"
