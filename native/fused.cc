// Fused kernels for the pieces of a decoder step that tfjs would run as chains of elementwise
// and reduction kernels (a dozen passes over memory each way for RMSNorm, SwiGLU, rotary
// embeddings, the attention softmax and the loss). Each is one or two passes here. Rows are
// split over the thread pool; a row is always summed in the same order, and reductions across
// rows (dw of RMSNorm) are split by column, so the bits never depend on the thread count.
#include "kernels.h"
#include "parallel.h"
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PREFOPT_X86 1
#endif

namespace prefopt {
namespace {

// Below this many elements a kernel is not worth waking a second thread.
constexpr int64_t kParallelMin = 1 << 15;
int threads_for(int64_t elems) { return elems >= kParallelMin ? g_threads : 1; }

// Runs f() compiled for AVX-512 where the CPU has it: f (a lambda marked PREFOPT_INLINE, inlined
// here with the PREFOPT_INLINE helpers it calls) then has its loops vectorized 16 lanes wide
// instead of the baseline x86-64 build's 4. Vector and scalar arithmetic round alike (the build
// keeps FMA contraction off; a vector square root or division rounds like the scalar one), and
// sums fix their order in the source (sum_double), so the bits do not depend on which form ran.
#define PREFOPT_INLINE __attribute__((always_inline))
#ifdef PREFOPT_X86
template <class F>
__attribute__((target("avx512f,prefer-vector-width=512"))) void run_avx512(const F& f) {
  f();
}
#endif
template <class F>
void wide(const F& f) {
#ifdef PREFOPT_X86
  if (g_isa == kAVX512) return run_avx512(f);
#endif
  f();
}

// Σ_j term(j) over [0, n) in double: eight running sums (lane j mod 8, one vector of doubles)
// combined in a fixed order.
template <class T>
PREFOPT_INLINE inline double sum_double(int64_t n, const T& term) {
  double acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; k++) acc[k] += term(j + k);
  double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; j++) s += term(j);
  return s;
}

#ifdef PREFOPT_X86
// exp(x) in vector lanes: x = n·ln2 + r, |r| ≤ ln2/2, a degree-6 polynomial for e^r (Cephes'
// expf coefficients, within 2 ulp), scaled by 2^n through the exponent bits. Below kExpLo the
// result is exactly 0, like expf's underflow, so masked attention scores (−1e9) give exact
// zeros. exp8 and exp16 take the same steps with these constants, so they give the same bits.
constexpr float kExpLo = -87.3f, kExpHi = 88.7f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExpLo);
  __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(kExpHi));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

__attribute__((target("avx2,fma"))) void exp_avx2(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
  if (i < n) {
    alignas(32) float t[8] = {-1e30f, -1e30f, -1e30f, -1e30f, -1e30f, -1e30f, -1e30f, -1e30f};
    std::copy(v + i, v + n, t);
    _mm256_store_ps(t, exp8(_mm256_load_ps(t)));
    std::copy(t, t + (n - i), v + i);
  }
}
#endif

#ifdef PREFOPT_X86
// exp8's steps on 16 lanes.
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpLo);
  __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(kExpHi));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

// The lanes of a 16-wide vector that hold values when `left` remain.
inline __mmask16 lanes16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

__attribute__((target("avx512f"))) void exp_avx512(float* v, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 k = lanes16(n - i);
    _mm512_mask_storeu_ps(v + i, k, exp16(_mm512_mask_loadu_ps(_mm512_set1_ps(-1e30f), k, v + i)));
  }
}
#endif

// v[i] = exp(v[i]): the one transcendental every kernel here needs (the vector forms give the
// same bits as each other).
void exp_inplace(float* v, int64_t n) {
#ifdef PREFOPT_X86
  if (g_isa == kAVX512) return exp_avx512(v, n);
  if (g_isa >= kAVX2) return exp_avx2(v, n);
#endif
  for (int64_t i = 0; i < n; i++) v[i] = std::exp(v[i]);
}

// Σ v in a fixed order, eight running sums (as a vector unit adds), combined in double.
double sum_of(const float* v, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) acc[k] += v[i + k];
  double s = 0;
  for (int k = 0; k < 8; k++) s += acc[k];
  for (; i < n; i++) s += v[i];
  return s;
}

// The largest of v, in 16 running maxima (a > b ? a : b is the vector max instruction, so the
// loop vectorizes; a maximum does not depend on the order it is taken in).
PREFOPT_INLINE inline float max_of(const float* v, int64_t n) {
  float acc[16];
  std::fill(acc, acc + 16, -INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; k++) acc[k] = acc[k] > v[i + k] ? acc[k] : v[i + k];
  float m = -INFINITY;
  for (int k = 0; k < 16; k++) m = m > acc[k] ? m : acc[k];
  for (; i < n; i++) m = m > v[i] ? m : v[i];
  return m;
}

// Elementwise kernels work in chunks of kChunk values: the unit of thread splitting and of
// their scratch buffers. f(c, i0, i1) runs for chunk c = [i0, i1) of [0, n).
constexpr int64_t kChunk = 4096;

template <class F>
void for_chunks(int64_t n, F f) {
  int64_t chunks = (n + kChunk - 1) / kChunk;
  parallel((int)chunks, threads_for(n), [&](int c0, int c1) {
    for (int64_t c = c0; c < c1; c++) f(c, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
}

}  // namespace

void label_logprobs(const float* x, int64_t N, int64_t V, const int32_t* y, float* out) {
  parallel((int)N, threads_for(N * V), [&](int r0, int r1) {
    std::vector<float> e(V);
    for (int r = r0; r < r1; r++) {
      const float* row = x + (int64_t)r * V;
      float m;
      wide([&]() PREFOPT_INLINE {
        m = max_of(row, V);
        for (int64_t j = 0; j < V; j++) e[j] = row[j] - m;
      });
      exp_inplace(e.data(), V);
      float l = m + (float)std::log(sum_of(e.data(), V));
      out[r] = y[r] >= 0 && y[r] < V ? row[y[r]] - l : 0.f;
    }
  });
}

void label_logprobs_grad(const float* x, int64_t N, int64_t V, const int32_t* y, const float* out, const float* dy, float* dx) {
  parallel((int)N, threads_for(N * V), [&](int r0, int r1) {
    for (int r = r0; r < r1; r++) {
      const float* row = x + (int64_t)r * V;
      float* d = dx + (int64_t)r * V;
      if (!(y[r] >= 0 && y[r] < V)) {
        std::fill(d, d + V, 0.f);  // a masked label contributes nothing
        continue;
      }
      float l = row[y[r]] - out[r];
      float g = dy[r];
      wide([&]() PREFOPT_INLINE {
        for (int64_t j = 0; j < V; j++) d[j] = row[j] - l;
      });
      exp_inplace(d, V);
      wide([&]() PREFOPT_INLINE {
        for (int64_t j = 0; j < V; j++) d[j] *= -g;
      });
      d[y[r]] += g;
    }
  });
}

namespace {
PREFOPT_INLINE inline float inv_rms(const float* x, int64_t D, float eps) {
  return (float)(1.0 / std::sqrt(sum_double(D, [&](int64_t j) PREFOPT_INLINE { return (double)x[j] * x[j]; }) / D + eps));
}
}  // namespace

void rms_norm(const float* x, const float* w, int64_t N, int64_t D, float eps, float* y, const float* res, float* sum) {
  parallel((int)N, threads_for(N * D), [&](int r0, int r1) {
    wide([&]() PREFOPT_INLINE {
      for (int r = r0; r < r1; r++) {
        const float* xr = x + (int64_t)r * D;
        float* yr = y + (int64_t)r * D;
        if (res) {
          float* sr = sum + (int64_t)r * D;
          const float* rr = res + (int64_t)r * D;
          for (int64_t j = 0; j < D; j++) sr[j] = xr[j] + rr[j];
          xr = sr;
        }
        float k = inv_rms(xr, D, eps);
        for (int64_t j = 0; j < D; j++) yr[j] = xr[j] * k * w[j];
      }
    });
  });
}

// With r = (mean(x²) + eps)^(-1/2) and g = dy ⊙ w: dx = r·g − x · r³ · mean(g ⊙ x), dw = Σ_rows dy ⊙ x · r.
void rms_norm_grad(const float* x, const float* w, const float* dy, int64_t N, int64_t D, float eps, float* dx, float* dw, const float* dres) {
  std::vector<float> rs(N);
  parallel((int)N, threads_for(N * D), [&](int r0, int r1) {
    wide([&]() PREFOPT_INLINE {
      for (int r = r0; r < r1; r++) {
        const float* xr = x + (int64_t)r * D;
        const float* gr = dy + (int64_t)r * D;
        float k = inv_rms(xr, D, eps);
        rs[r] = k;
        if (!dx) continue;
        float* d = dx + (int64_t)r * D;
        double c = sum_double(D, [&](int64_t j) PREFOPT_INLINE { return (double)gr[j] * w[j] * xr[j]; });
        float k3c = (float)(c / D) * k * k * k;
        for (int64_t j = 0; j < D; j++) d[j] = k * gr[j] * w[j] - xr[j] * k3c;
        if (dres)
          for (int64_t j = 0; j < D; j++) d[j] += dres[(int64_t)r * D + j];
      }
    });
  });
  if (!dw) return;
  parallel((int)D, threads_for(N * D), [&](int c0, int c1) {
    wide([&]() PREFOPT_INLINE {
      std::vector<double> acc(c1 - c0, 0.0);
      for (int64_t r = 0; r < N; r++) {
        const float* xr = x + r * D;
        const float* gr = dy + r * D;
        for (int c = c0; c < c1; c++) acc[c - c0] += (double)(gr[c] * xr[c] * rs[r]);
      }
      for (int c = c0; c < c1; c++) dw[c] = (float)acc[c - c0];
    });
  });
}

namespace {
// Calls f(i0, m, s) over [0, n) in chunks of m ≤ kChunk elements, with s[i] = σ(g[i0 + i]).
template <class F>
void over_sigmoid(const float* g, int64_t n, const F& f) {
  for_chunks(n, [&](int64_t, int64_t i0, int64_t i1) {
    wide([&]() PREFOPT_INLINE {
      float s[kChunk];
      int64_t m = i1 - i0;
      for (int64_t i = 0; i < m; i++) s[i] = -g[i0 + i];
      exp_inplace(s, m);
      for (int64_t i = 0; i < m; i++) s[i] = 1.f / (1.f + s[i]);
      f(i0, m, s);
    });
  });
}
}  // namespace

namespace alea {
// seedrandom's alea as integers: its state is three 32-bit words (s·2³²) and a carry, and a
// draw is t = a·S0 + c, c' = t >> 32, S' = t mod 2³² (the double arithmetic of lib/alea.js is
// exact: a·S0 + c < 2⁵³). That is a lag-3 multiply-with-carry generator, which is a linear
// congruential one in disguise (docs/REFERENCE.md §11): Y = c·b³ + S2·b² + S1·b + S0 (b = 2³²)
// steps as Y' = Y·b⁻¹ mod m, m = a·b³ − 1, with b⁻¹ = a·b² — so k draws ahead is one modular
// power, and a mask's chunks are drawn on every thread, each from its own start.
using u128 = unsigned __int128;
constexpr uint64_t kA = 2091639;
constexpr u128 kM = ((u128)kA << 96) - 1;

struct Words {
  uint32_t s0, s1, s2;
  uint64_t c;
};

inline u128 add_mod(u128 x, u128 y) {  // x, y < m < 2¹¹⁷: no overflow
  x += y;
  return x >= kM ? x - kM : x;
}
u128 mul_mod(u128 x, u128 y) {
  u128 r = 0;
  for (int i = 116; i >= 0; i--) {
    r = add_mod(r, r);
    if ((y >> i) & 1) r = add_mod(r, x);
  }
  return r;
}
u128 pow_mod(u128 x, uint64_t k) {
  u128 r = 1;
  for (; k; k >>= 1, x = mul_mod(x, x))
    if (k & 1) r = mul_mod(r, x);
  return r;
}

Words words(double s0, double s1, double s2, double c) {
  const double b = 4294967296.0;
  return Words{(uint32_t)(s0 * b), (uint32_t)(s1 * b), (uint32_t)(s2 * b), (uint64_t)c};
}

// The multiplier of a k-draw jump: Y·(a·b²)^k mod m.
u128 jump_multiplier(uint64_t k) { return pow_mod((u128)kA << 64, k); }

// The state k draws later.
Words jump(Words w, uint64_t k) {
  if (k == 0) return w;
  const u128 y = ((u128)w.c << 96) | ((u128)w.s2 << 64) | ((u128)w.s1 << 32) | w.s0;
  const u128 z = mul_mod(y, jump_multiplier(k));
  return Words{(uint32_t)z, (uint32_t)(z >> 32), (uint32_t)(z >> 64), (uint64_t)(z >> 96)};
}

// One draw, as the float32 tf.dropout compares: lib/alea.js's s2 rounded to float.
inline float draw(Words& w) {
  const uint64_t t = kA * w.s0 + w.c;
  w.s0 = w.s1, w.s1 = w.s2, w.c = t >> 32, w.s2 = (uint32_t)t;
  return static_cast<float>(w.s2 * 2.3283064365386963e-10);
}
}  // namespace alea

void alea_jumps(int64_t step, int64_t count, uint64_t* out) {
  const alea::u128 m = alea::jump_multiplier((uint64_t)step);
  alea::u128 r = 1;
  for (int64_t i = 0; i < count; i++, r = alea::mul_mod(r, m)) out[2 * i] = (uint64_t)r, out[2 * i + 1] = (uint64_t)(r >> 64);
}

void dropout_alea(const float* x, int64_t n, double s0, double s1, double s2, double c, float keep, float* y, uint32_t* bits) {
  const float scale = 1.f / keep;  // floor(u + keep) is 0 or 1: the quotient is 0 or f32(1 / keep)
  const alea::Words start = alea::words(s0, s1, s2, c);
  const int64_t chunks = (n + kChunk - 1) / kChunk;  // kChunk is a multiple of 32: a thread owns whole words
  parallel((int)chunks, threads_for(n), [&](int c0, int c1) {
    const int64_t i0 = c0 * kChunk, i1 = std::min(n, c1 * kChunk);
    alea::Words w = alea::jump(start, (uint64_t)i0);
    if (bits) std::fill(bits + i0 / 32, bits + (i1 + 31) / 32, 0u);
    for (int64_t i = i0; i < i1; i++) {
      const float u = alea::draw(w);
      const bool kept = std::floor(u + keep) != 0.f;
      y[i] = kept ? x[i] * scale : x[i] * 0.f;
      if (bits && kept) bits[i >> 5] |= 1u << (i & 31);
    }
  });
}

#ifdef PREFOPT_X86
// 16 elements a step, their 16 bits a mask register (i0 a multiple of 16: they share a word).
__attribute__((target("avx512f"))) int64_t dropout_bits_avx512(const float* x, int64_t i0, int64_t i1, const uint32_t* bits, float scale, float* y) {
  const __m512 s = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    __mmask16 m = (__mmask16)((bits[i >> 5] >> (i & 31)) & 0xffffu);
    __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(y + i, _mm512_mask_blend_ps(m, _mm512_mul_ps(v, zero), _mm512_mul_ps(v, s)));
  }
  return i;
}
#endif

void dropout_bits(const float* x, int64_t n, const uint32_t* bits, float keep, float* y) {
  const float scale = 1.f / keep;
  for_chunks(n, [&](int64_t, int64_t i0, int64_t i1) {
    int64_t i = i0;
#ifdef PREFOPT_X86
    if (g_isa == kAVX512 && i0 % 16 == 0) i = dropout_bits_avx512(x, i0, i1, bits, scale, y);
#endif
    for (; i < i1; i++) y[i] = (bits[i >> 5] >> (i & 31)) & 1u ? x[i] * scale : x[i] * 0.f;
  });
}

void swiglu(const float* g, const float* u, int64_t n, float* y) {
  over_sigmoid(g, n, [&](int64_t i0, int64_t m, const float* s) PREFOPT_INLINE {
    for (int64_t i = 0; i < m; i++) y[i0 + i] = g[i0 + i] * s[i] * u[i0 + i];
  });
}

// d/dg [g σ(g)] = σ(g) (1 + g (1 − σ(g))).
void swiglu_grad(const float* g, const float* u, const float* dy, int64_t n, float* dg, float* du) {
  over_sigmoid(g, n, [&](int64_t i0, int64_t m, const float* s) PREFOPT_INLINE {
    if (du)
      for (int64_t i = 0; i < m; i++) du[i0 + i] = dy[i0 + i] * g[i0 + i] * s[i];
    if (dg)
      for (int64_t i = 0; i < m; i++) dg[i0 + i] = dy[i0 + i] * u[i0 + i] * s[i] * (1.f + g[i0 + i] * (1.f - s[i]));
  });
}

// Forward: y_j = x_j c_j − x_{j+h} s_j, y_{j+h} = x_{j+h} c_{j+h} + x_j s_{j+h} (j < h = hd/2).
// Inverse (the transpose): x_j = y_j c_j + y_{j+h} s_{j+h}, x_{j+h} = y_{j+h} c_{j+h} − y_j s_j.
void rope(const float* x, const float* cos, const float* sin, int64_t rows, int64_t H, int64_t hd, bool inverse, float* y) {
  int64_t h = hd / 2;
  parallel((int)rows, threads_for(rows * H * hd), [&](int r0, int r1) {
    wide([&]() PREFOPT_INLINE {
      for (int r = r0; r < r1; r++) {
        const float* c = cos + (int64_t)r * hd;
        const float* s = sin + (int64_t)r * hd;
        for (int64_t head = 0; head < H; head++) {
          const float* xi = x + ((int64_t)r * H + head) * hd;
          float* yo = y + ((int64_t)r * H + head) * hd;
          if (!inverse) {
            for (int64_t j = 0; j < h; j++) {
              yo[j] = xi[j] * c[j] - xi[j + h] * s[j];
              yo[j + h] = xi[j + h] * c[j + h] + xi[j] * s[j + h];
            }
          } else {
            for (int64_t j = 0; j < h; j++) {
              yo[j] = xi[j] * c[j] + xi[j + h] * s[j + h];
              yo[j + h] = xi[j + h] * c[j + h] - xi[j] * s[j];
            }
          }
        }
      }
    });
  });
}

namespace {
// p = softmax(scale·s + m) over one row of Tk keys (p may alias s).
void softmax_row_plain(const float* s, const float* m, float scale, int64_t Tk, float* p) {
  for (int64_t j = 0; j < Tk; j++) p[j] = s[j] * scale + m[j];
  float mx = max_of(p, Tk);
  for (int64_t j = 0; j < Tk; j++) p[j] -= mx;
  exp_inplace(p, Tk);
  float inv = (float)(1.0 / sum_of(p, Tk));
  for (int64_t j = 0; j < Tk; j++) p[j] *= inv;
}

// ds = scale · p ⊙ (dp − Σ_j p dp) over one row (ds may alias dp).
void softmax_grad_row_plain(const float* p, const float* dp, float scale, int64_t Tk, float* ds) {
  double dot = 0;
  for (int64_t j = 0; j < Tk; j++) dot += (double)p[j] * dp[j];
  float fd = (float)dot;
  for (int64_t j = 0; j < Tk; j++) ds[j] = scale * p[j] * (dp[j] - fd);
}

#ifdef PREFOPT_X86
// The same two rows in 8 lanes (the scalar loops above ran at ~11 cycles a key, most of the
// attention's time at head size 32). A row's last partial vector is padded with values that
// drop out: −∞ scores (exp gives 0) and zero probabilities.
__attribute__((target("avx2,fma"))) inline __m256 load_part(const float* v, int64_t n, float fill) {
  if (n >= 8) return _mm256_loadu_ps(v);
  alignas(32) float t[8];
  for (int k = 0; k < 8; k++) t[k] = k < n ? v[k] : fill;
  return _mm256_load_ps(t);
}

__attribute__((target("avx2,fma"))) inline void store_part(float* v, int64_t n, __m256 x) {
  if (n >= 8) return _mm256_storeu_ps(v, x);
  alignas(32) float t[8];
  _mm256_store_ps(t, x);
  std::copy(t, t + n, v);
}

__attribute__((target("avx2,fma"))) void softmax_row_avx2(const float* s, const float* m, float scale, int64_t Tk, float* p) {
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < Tk; j += 8) {
    __m256 x = _mm256_add_ps(_mm256_mul_ps(load_part(s + j, Tk - j, 0.f), sc), load_part(m + j, Tk - j, -INFINITY));
    store_part(p + j, Tk - j, x);
    mx = _mm256_max_ps(mx, x);
  }
  alignas(32) float lane[8];
  _mm256_store_ps(lane, mx);
  const __m256 vmax = _mm256_set1_ps(*std::max_element(lane, lane + 8));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < Tk; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(load_part(p + j, Tk - j, -INFINITY), vmax));
    store_part(p + j, Tk - j, e);
    sum = _mm256_add_ps(sum, e);
  }
  _mm256_store_ps(lane, sum);
  double total = 0;
  for (float l : lane) total += l;
  const __m256 inv = _mm256_set1_ps((float)(1.0 / total));
  for (int64_t j = 0; j < Tk; j += 8) store_part(p + j, Tk - j, _mm256_mul_ps(load_part(p + j, Tk - j, 0.f), inv));
}

__attribute__((target("avx2,fma"))) void softmax_grad_row_avx2(const float* p, const float* dp, float scale, int64_t Tk, float* ds) {
  __m256d lo = _mm256_setzero_pd(), hi = lo;
  for (int64_t j = 0; j < Tk; j += 8) {
    __m256 a = load_part(p + j, Tk - j, 0.f), b = load_part(dp + j, Tk - j, 0.f);
    lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_castps256_ps128(b)), lo);
    hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)), hi);
  }
  alignas(32) double lane[4];
  _mm256_store_pd(lane, _mm256_add_pd(lo, hi));
  const __m256 fd = _mm256_set1_ps((float)(lane[0] + lane[1] + lane[2] + lane[3])), sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < Tk; j += 8) {
    __m256 a = load_part(p + j, Tk - j, 0.f), b = load_part(dp + j, Tk - j, 0.f);
    store_part(ds + j, Tk - j, _mm256_mul_ps(_mm256_mul_ps(sc, a), _mm256_sub_ps(b, fd)));
  }
}
#endif

#ifdef PREFOPT_X86
// softmax_row_avx2 16 lanes at a time (the softmax was a quarter of attention's time): the sum
// still runs in the 8 lanes and the order of the AVX2 form (each 16-lane vector adds its low
// half, then its high half), so the result is the same bits.
__attribute__((target("avx512f"))) void softmax_row_avx512(const float* s, const float* m, float scale, int64_t Tk, float* p) {
  const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
  __m512 mx = ninf;
  for (int64_t j = 0; j < Tk; j += 16) {
    __mmask16 k = lanes16(Tk - j);
    __m512 x = _mm512_add_ps(_mm512_mul_ps(_mm512_mask_loadu_ps(zero, k, s + j), sc), _mm512_mask_loadu_ps(ninf, k, m + j));
    _mm512_mask_storeu_ps(p + j, k, x);
    mx = _mm512_max_ps(mx, x);
  }
  const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < Tk; j += 16) {
    __mmask16 k = lanes16(Tk - j);
    __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, k, p + j), vmax));
    _mm512_mask_storeu_ps(p + j, k, e);
    sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
    if (Tk - j > 8) sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
  }
  alignas(32) float lane[8];
  _mm256_store_ps(lane, sum);
  double total = 0;
  for (float l : lane) total += l;
  const __m512 inv = _mm512_set1_ps((float)(1.0 / total));
  for (int64_t j = 0; j < Tk; j += 16) {
    __mmask16 k = lanes16(Tk - j);
    _mm512_mask_storeu_ps(p + j, k, _mm512_mul_ps(_mm512_mask_loadu_ps(zero, k, p + j), inv));
  }
}
#endif

void softmax_row(const float* s, const float* m, float scale, int64_t Tk, float* p) {
#ifdef PREFOPT_X86
  if (g_isa == kAVX512) return softmax_row_avx512(s, m, scale, Tk, p);
  if (g_isa >= kAVX2) return softmax_row_avx2(s, m, scale, Tk, p);
#endif
  softmax_row_plain(s, m, scale, Tk, p);
}

void softmax_grad_row(const float* p, const float* dp, float scale, int64_t Tk, float* ds) {
#ifdef PREFOPT_X86
  if (g_isa >= kAVX2) return softmax_grad_row_avx2(p, dp, scale, Tk, ds);
#endif
  softmax_grad_row_plain(p, dp, scale, Tk, ds);
}

// Where one query head's and one kv head's rows live: q, o [B, T, H, hd] and k, v [B, Tk, KV, hd].
struct AttnDims {
  int64_t B, T, Tk, H, KV, hd;
  int64_t q_at(int64_t b, int64_t h) const { return (b * T * H + h) * hd; }
  int64_t kv_at(int64_t b, int64_t g) const { return (b * Tk * KV + g) * hd; }
  const float* mask_row(const float* mask, int64_t b, int64_t t) const { return mask + (b * T + t) * Tk; }
};

// Query rows are taken kRowBlock at a time, and each block only over the keys [lo, hi) that
// some row of it may see: a causal mask leaves ~3/8 of the products and exponentials out at
// T = 128. A key is dead for a row when its mask is at most kDeadMask (attentionMask writes
// −1e9): its probability underflows to exactly 0 whatever the score, so leaving it out changes
// no bit of the forward pass. A row with no live key keeps every key (its softmax is uniform).
constexpr int64_t kRowBlock = 32;
constexpr float kDeadMask = -1e8f;

struct KeyRange {
  int64_t lo, hi;
  int64_t width() const { return hi - lo; }
};

KeyRange live_keys(const AttnDims& d, const float* mask, int64_t b, int64_t t0, int64_t t1) {
  KeyRange r{d.Tk, 0};
  for (int64_t t = t0; t < t1; t++) {
    const float* m = d.mask_row(mask, b, t);
    int64_t lo = 0, hi = d.Tk;
    while (lo < hi && m[lo] <= kDeadMask) lo++;
    while (hi > lo && m[hi - 1] <= kDeadMask) hi--;
    if (lo == hi) lo = 0, hi = d.Tk;
    r.lo = std::min(r.lo, lo);
    r.hi = std::max(r.hi, hi);
  }
  return r;
}

// The key ranges of every row block, batch row by batch row: ranges[b * blocks + i].
std::vector<KeyRange> block_ranges(const AttnDims& d, const float* mask) {
  std::vector<KeyRange> out;
  for (int64_t b = 0; b < d.B; b++)
    for (int64_t t0 = 0; t0 < d.T; t0 += kRowBlock) out.push_back(live_keys(d, mask, b, t0, std::min(d.T, t0 + kRowBlock)));
  return out;
}

// One kv head's keys or values x [Tk, hd] (rows KV·hd apart), packed once for the products of
// all its G query heads and row blocks (each product packed its own copy: 2–4 per block):
// as the right operand xᵀ [hd, Tk] of Q·Kᵀ and dO·Vᵀ (`t`), and as x itself for P·V and dS·K.
struct PackedKv {
  int nt, nr;  // panel widths of the two layouts
  std::vector<float> t, rows;
  PackedKv(const AttnDims& d) : nt(gemm_panel_width((int)d.Tk)), nr(gemm_panel_width((int)d.hd)),
      t((size_t)(d.Tk + nt - 1) / nt * nt * d.hd), rows((size_t)(d.hd + nr - 1) / nr * nr * d.Tk) {}
  void pack(const AttnDims& d, const float* x) {
    gemm_pack(true, (int)d.hd, (int)d.Tk, x, d.KV * d.hd, nt, t.data());
    gemm_pack(false, (int)d.Tk, (int)d.hd, x, d.KV * d.hd, nr, rows.data());
  }
  // C [n, r) = A [n, hd] · xᵀ[:, r): from the packed copy when r starts on a panel boundary
  // (always, unless rows are padded on the left), else packed anew; the same bits either way.
  void times_t(const AttnDims& d, const float* x, int n, const KeyRange& r, const float* a, int64_t lda, float* c, int64_t ldc) const {
    if (r.lo % nt == 0) gemm_packed(false, n, (int)r.width(), (int)d.hd, a, lda, t.data() + r.lo / nt * nt * d.hd, nt * d.hd, nt, c, ldc, false, 1);
    else gemm(false, true, n, (int)r.width(), (int)d.hd, a, lda, x + r.lo * d.KV * d.hd, d.KV * d.hd, c, ldc, false, 1);
  }
  // C [n, hd] = A [n, r) · x[r) (rows r of x).
  void times(const AttnDims& d, int n, const KeyRange& r, const float* a, int64_t lda, float* c, int64_t ldc) const {
    gemm_packed(false, n, (int)d.hd, (int)r.width(), a, lda, rows.data() + r.lo * nr, d.Tk * nr, nr, c, ldc, false, 1);
  }
};

// P[t0:t1, lo:hi] = softmax(scale · Q_h K_gᵀ + mask) for query head h of row b, into p (row
// stride Tk; columns outside [lo, hi) are not written); kp is K_g packed, k_g its rows.
void attn_probs(const AttnDims& d, const float* q, const PackedKv& kp, const float* k_g, const float* mask, float scale, int64_t b, int64_t h, int64_t t0, int64_t t1,
                const KeyRange& r, float* p) {
  kp.times_t(d, k_g, (int)(t1 - t0), r, q + d.q_at(b, h) + t0 * d.H * d.hd, d.H * d.hd, p + t0 * d.Tk + r.lo, d.Tk);
  for (int64_t t = t0; t < t1; t++) softmax_row(p + t * d.Tk + r.lo, d.mask_row(mask, b, t) + r.lo, scale, r.width(), p + t * d.Tk + r.lo);
}

// Zeroes rows [0, n) of a strided [n, w] slice.
void zero_rows(float* x, int64_t n, int64_t w, int64_t ld) {
  for (int64_t i = 0; i < n; i++) std::fill(x + i * ld, x + i * ld + w, 0.f);
}
}  // namespace

// Work is split by (row, kv head): each unit owns its slices of dK and dV and adds its G query
// heads and row blocks into them in order, so the sums never depend on the thread count.
void attention(const float* q, const float* k, const float* v, const float* mask, float scale, int64_t B, int64_t T, int64_t Tk, int64_t H, int64_t KV, int64_t hd, float* o) {
  AttnDims d{B, T, Tk, H, KV, hd};
  int64_t G = H / KV, blocks = (T + kRowBlock - 1) / kRowBlock;
  std::vector<KeyRange> ranges = block_ranges(d, mask);
  parallel((int)(B * KV), threads_for(B * H * T * Tk * 4), [&](int u0, int u1) {
    std::vector<float> p(T * Tk);
    PackedKv kp(d), vp(d);
    for (int u = u0; u < u1; u++) {
      int64_t b = u / KV, g = u % KV;
      const float* ku = k + d.kv_at(b, g);
      kp.pack(d, ku);
      vp.pack(d, v + d.kv_at(b, g));
      for (int64_t h = g * G; h < (g + 1) * G; h++)
        for (int64_t i = 0; i < blocks; i++) {
          int64_t t0 = i * kRowBlock, t1 = std::min(T, t0 + kRowBlock);
          const KeyRange& r = ranges[b * blocks + i];
          attn_probs(d, q, kp, ku, mask, scale, b, h, t0, t1, r, p.data());
          vp.times(d, (int)(t1 - t0), r, p.data() + t0 * Tk + r.lo, Tk, o + d.q_at(b, h) + t0 * H * hd, H * hd);
        }
    }
  });
}

// With P recomputed: dP = dO Vᵀ, dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), dQ = dS K, dK = Σ_h dSᵀ Q,
// dV = Σ_h Pᵀ dO.
void attention_grad(const float* q, const float* k, const float* v, const float* mask, float scale, int64_t B, int64_t T, int64_t Tk, int64_t H, int64_t KV, int64_t hd,
                    const float* dout, float* dq, float* dk, float* dv) {
  AttnDims d{B, T, Tk, H, KV, hd};
  int64_t G = H / KV, blocks = (T + kRowBlock - 1) / kRowBlock;
  std::vector<KeyRange> ranges = block_ranges(d, mask);
  parallel((int)(B * KV), threads_for(B * H * T * Tk * 8), [&](int u0, int u1) {
    std::vector<float> p(T * Tk), ds(T * Tk);
    PackedKv kp(d), vp(d);
    for (int u = u0; u < u1; u++) {
      int64_t b = u / KV, g = u % KV;
      float *dku = dk + d.kv_at(b, g), *dvu = dv + d.kv_at(b, g);
      const float *ku = k + d.kv_at(b, g), *vu = v + d.kv_at(b, g);
      kp.pack(d, ku);
      vp.pack(d, vu);
      zero_rows(dku, Tk, hd, KV * hd);  // keys no row may see get no gradient
      zero_rows(dvu, Tk, hd, KV * hd);
      for (int64_t h = g * G; h < (g + 1) * G; h++)
        for (int64_t i = 0; i < blocks; i++) {
          int64_t t0 = i * kRowBlock, t1 = std::min(T, t0 + kRowBlock), n = t1 - t0;
          const KeyRange& r = ranges[b * blocks + i];
          int w = (int)r.width();
          const float *qb = q + d.q_at(b, h) + t0 * H * hd, *dob = dout + d.q_at(b, h) + t0 * H * hd;
          float *pb = p.data() + t0 * Tk + r.lo, *dsb = ds.data() + t0 * Tk + r.lo;
          attn_probs(d, q, kp, ku, mask, scale, b, h, t0, t1, r, p.data());
          gemm(true, false, w, (int)hd, (int)n, pb, Tk, dob, H * hd, dvu + r.lo * KV * hd, KV * hd, true, 1);
          vp.times_t(d, vu, (int)n, r, dob, H * hd, dsb, Tk);
          for (int64_t t = 0; t < n; t++) softmax_grad_row(pb + t * Tk, dsb + t * Tk, scale, w, dsb + t * Tk);
          kp.times(d, (int)n, r, dsb, Tk, dq + d.q_at(b, h) + t0 * H * hd, H * hd);
          gemm(true, false, w, (int)hd, (int)n, dsb, Tk, qb, H * hd, dku + r.lo * KV * hd, KV * hd, true, 1);
        }
    }
  });
}

void split_qkv(float* qkv, int64_t N, int64_t KV, int64_t G, int64_t hd, float* q, float* k, float* v, bool merge) {
  const int64_t group = (G + 2) * hd;  // one kv head's G queries, key and value
  parallel((int)N, threads_for(N * KV * group), [&](int r0, int r1) {
    for (int64_t r = r0; r < r1; r++)
      for (int64_t g = 0; g < KV; g++) {
        float* src = qkv + (r * KV + g) * group;
        float* parts[3] = {q + (r * KV + g) * G * hd, k + (r * KV + g) * hd, v + (r * KV + g) * hd};
        int64_t len[3] = {G * hd, hd, hd};
        for (int i = 0; i < 3; src += len[i], i++) {
          if (merge) std::copy(parts[i], parts[i] + len[i], src);
          else std::copy(src, src + len[i], parts[i]);
        }
      }
  });
}

void embed(const void* table, Dt dt, int64_t D, const int32_t* ids, int64_t N, float* out) {
  parallel((int)N, threads_for(N * D), [&](int r0, int r1) {
    for (int r = r0; r < r1; r++) {
      int64_t at = (int64_t)ids[r] * D;
      if (dt == kF32) std::copy(static_cast<const float*>(table) + at, static_cast<const float*>(table) + at + D, out + (int64_t)r * D);
      else widen(static_cast<const uint16_t*>(table) + at, D, dt, out + (int64_t)r * D);
    }
  });
}

// Split by column so that every entry of dtable adds its rows in the same order on any thread count.
void embed_grad(const int32_t* ids, int64_t N, const float* dy, int64_t V, int64_t D, float* dtable) {
  parallel((int)D, threads_for(N * D), [&](int c0, int c1) {
    wide([&]() PREFOPT_INLINE {
      for (int64_t v = 0; v < V; v++) std::fill(dtable + v * D + c0, dtable + v * D + c1, 0.f);
      for (int64_t r = 0; r < N; r++) {
        const float* g = dy + r * D;
        float* d = dtable + (int64_t)ids[r] * D;
        for (int c = c0; c < c1; c++) d[c] += g[c];
      }
    });
  });
}

void bias_add(const float* x, const float* b, int64_t N, int64_t D, float* y) {
  parallel((int)N, threads_for(N * D), [&](int r0, int r1) {
    wide([&]() PREFOPT_INLINE {
      for (int64_t r = r0; r < r1; r++)
        for (int64_t c = 0; c < D; c++) y[r * D + c] = x[r * D + c] + b[c];
    });
  });
}

// Split by column: each sum runs over the rows in order, whatever the thread count.
void column_sum(const float* dy, int64_t N, int64_t D, float* out) {
  parallel((int)D, threads_for(N * D), [&](int c0, int c1) {
    wide([&]() PREFOPT_INLINE {
      std::fill(out + c0, out + c1, 0.f);
      for (int64_t r = 0; r < N; r++)
        for (int c = c0; c < c1; c++) out[c] += dy[r * D + c];
    });
  });
}

namespace {
// One chunk of AdamW (run 16 lanes wide by wide(): the square root and division dominate).
// p2, m2, v2 may be p, m, v themselves (the update in place): each element is read before it is
// written, and ivdep lets the compiler vectorize without checking the pointers for overlap.
PREFOPT_INLINE inline void adamw_span(const float* p, const float* g, const float* m, const float* v, int64_t i0, int64_t i1, const AdamWArgs& a, float* p2, float* m2,
                                      float* v2) {
#pragma GCC ivdep
  for (int64_t i = i0; i < i1; i++) {
    float gi = g[i] * a.gscale;
    float mi = m[i] * a.beta1 + gi * a.one_minus_beta1;
    float vi = v[i] * a.beta2 + gi * gi * a.one_minus_beta2;
    float next = p[i] - (mi / (std::sqrt(vi) / a.sqrt_bc2 + a.eps)) * a.step;
    if (a.decay != 0.f) next -= p[i] * a.decay;
    p2[i] = next;
    m2[i] = mi;
    v2[i] = vi;
  }
}
}  // namespace

void adamw(const float* p, const float* g, const float* m, const float* v, int64_t n, const AdamWArgs& a, float* p2, float* m2, float* v2) {
  for_chunks(n, [&](int64_t, int64_t i0, int64_t i1) { wide([&]() PREFOPT_INLINE { adamw_span(p, g, m, v, i0, i1, a, p2, m2, v2); }); });
}

void adamw_in_place(const AdamWTensor* ts, int count) {
  // Chunks of every tensor in one list, shared out over the pool in one call.
  std::vector<std::pair<int, int64_t>> chunks;
  int64_t total = 0;
  for (int t = 0; t < count; t++) {
    for (int64_t i0 = 0; i0 < ts[t].n; i0 += kChunk) chunks.emplace_back(t, i0);
    total += ts[t].n;
  }
  parallel((int)chunks.size(), threads_for(total), [&](int c0, int c1) {
    wide([&]() PREFOPT_INLINE {
      for (int c = c0; c < c1; c++) {
        const AdamWTensor& x = ts[chunks[c].first];
        int64_t i0 = chunks[c].second, i1 = std::min(x.n, i0 + kChunk);
        adamw_span(x.p, x.g, x.m, x.v, i0, i1, x.a, x.p, x.m, x.v);
      }
    });
  });
}

double sum_squares(const float* x, int64_t n) {
  std::vector<double> part((n + kChunk - 1) / kChunk);
  for_chunks(n, [&](int64_t c, int64_t i0, int64_t i1) {
    double s = 0;
    for (int64_t i = i0; i < i1; i++) s += (double)x[i] * x[i];
    part[c] = s;
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}

void transpose(const float* a, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t kTile = 64;
  int64_t tiles = (rows + kTile - 1) / kTile;
  parallel((int)tiles, threads_for(rows * cols), [&](int t0, int t1) {
    for (int64_t r0 = t0 * kTile; r0 < std::min(rows, (int64_t)t1 * kTile); r0 += kTile)
      for (int64_t c0 = 0; c0 < cols; c0 += kTile)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); c++)
          for (int64_t r = r0; r < std::min(rows, r0 + kTile); r++) out[c * rows + r] = a[r * cols + c];
  });
}

int64_t first_non_finite(const void* x, Dt dt, int64_t n) {
  int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> first(chunks, -1);
  // A 16-bit value is NaN or ±Inf when its exponent bits are all ones.
  const uint16_t all_ones = dt == kBF16 ? 0x7f80 : 0x7c00;
  for_chunks(n, [&](int64_t c, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
      if (dt == kF32 ? !std::isfinite(static_cast<const float*>(x)[i]) : (static_cast<const uint16_t*>(x)[i] & all_ones) == all_ones) {
        first[c] = i;
        return;
      }
  });
  for (int64_t f : first)
    if (f >= 0) return f;
  return -1;
}

void add(const float* a, const float* b, int64_t n, float* y) {
  for_chunks(n, [&](int64_t, int64_t i0, int64_t i1) {
    wide([&]() PREFOPT_INLINE {
      for (int64_t i = i0; i < i1; i++) y[i] = a[i] + b[i];
    });
  });
}

}  // namespace prefopt
