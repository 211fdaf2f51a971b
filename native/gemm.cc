// prefopt's native matmul: C[b] = op(A[b]) · op(B[b]) in float32, row-major, on tensor memory
// handed over from JavaScript (usually views into the wasm heap, so nothing is copied). A system
// CBLAS (OpenBLAS, BLIS, MKL, Accelerate) is opened at run time with dlopen, so the build needs
// no BLAS headers and the addon still loads where none is installed; without one, a packed
// AVX2/FMA kernel (portable C++ elsewhere) runs on all cores.
#include "kernels.h"
#include "parallel.h"
#include <dlfcn.h>
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PREFOPT_X86 1
#endif

namespace prefopt {

std::string g_lib;
#ifdef PREFOPT_X86
bool g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
bool g_avx2 = false;
#endif

namespace {

// ---- CBLAS through dlopen -------------------------------------------------------------------
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
typedef void (*set_threads_fn)(int);

sgemm_fn g_sgemm = nullptr;

}  // namespace

void open_blas(const char* want) {
  const char* candidates[] = {
      "libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so", "libblis.so.4", "libblis.so", "libmkl_rt.so", "libmkl_rt.so.2",
      "libopenblas.dylib", "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
      "/System/Library/Frameworks/Accelerate.framework/Accelerate"};
  for (const char* name : candidates) {
    if (want && *want && !strstr(name, want)) continue;
    void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!h) continue;
    auto f = reinterpret_cast<sgemm_fn>(dlsym(h, "cblas_sgemm"));
    if (!f) {
      dlclose(h);
      continue;
    }
    g_sgemm = f;
    g_lib = name;
    // Use every core, and the same count on every call so that results are reproducible.
    if (auto st = reinterpret_cast<set_threads_fn>(dlsym(h, "openblas_set_num_threads"))) st(g_threads);
    else if (auto bt = reinterpret_cast<set_threads_fn>(dlsym(h, "bli_thread_set_num_threads"))) bt(g_threads);
    return;
  }
}

namespace {

// ---- built-in kernel ------------------------------------------------------------------------
// Blocked like GotoBLAS: for each KC-slice of K, B is packed into 16-wide column panels and A
// into 6-row panels (both contiguous per k, whatever the transposes), and each 6x16 tile of C
// is accumulated in 12 vector registers. Threads take disjoint column ranges of C (or row
// ranges when C is narrow) and pack what they read themselves: one parallel region per call,
// no sharing, and every element of C is summed in the same order whatever the thread count.
constexpr int MR = 6, NR = 16, KC = 256;

struct Op {
  const float* p;
  bool trans;
  int ld;
  float at(int r, int c) const { return trans ? p[(size_t)c * ld + r] : p[(size_t)r * ld + c]; }
};

// Bp[panel - p0][k][0..NR) for panels [p0, p1), k in [k0, k0+kb), zero-padded past N.
void pack_b(const Op& B, int k0, int kb, int N, int p0, int p1, float* Bp) {
  for (int p = p0; p < p1; p++) {
    float* dst = Bp + (size_t)(p - p0) * kb * NR;
    int j0 = p * NR, jn = std::min(NR, N - j0);
    for (int k = 0; k < kb; k++) {
      float* d = dst + (size_t)k * NR;
      if (!B.trans && jn == NR) memcpy(d, B.p + (size_t)(k0 + k) * B.ld + j0, NR * sizeof(float));
      else {
        for (int j = 0; j < jn; j++) d[j] = B.at(k0 + k, j0 + j);
        for (int j = jn; j < NR; j++) d[j] = 0.f;
      }
    }
  }
}

// Ap[k][0..MR) = op(A)[i + r][k0 + k], zero past M.
void pack_a(const Op& A, int i, int M, int k0, int kb, float* Ap) {
  int rows = std::min(MR, M - i);
  if (A.trans) {
    for (int k = 0; k < kb; k++) {
      const float* src = A.p + (size_t)(k0 + k) * A.ld + i;
      float* d = Ap + k * MR;
      for (int r = 0; r < rows; r++) d[r] = src[r];
      for (int r = rows; r < MR; r++) d[r] = 0.f;
    }
  } else {
    for (int r = 0; r < MR; r++) {
      const float* src = A.p + (size_t)(i + std::min(r, rows - 1)) * A.ld + k0;
      float keep = r < rows ? 1.f : 0.f;
      for (int k = 0; k < kb; k++) Ap[k * MR + r] = src[k] * keep;
    }
  }
}

#ifdef PREFOPT_X86
__attribute__((target("avx2,fma"))) void tile_avx2(const float* ap, const float* bp, int kb, float* c, int ldc, int rows, int cols, bool acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kb; k++, ap += MR, bp += NR) {
    __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
    __m256 x;
    x = _mm256_broadcast_ss(ap + 0); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(ap + 1); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(ap + 2); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(ap + 3); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(ap + 4); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(ap + 5); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  if (rows == MR && cols == NR) {
    __m256 v[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < MR; r++) {
      float* cr = c + (size_t)r * ldc;
      if (acc) {
        v[r][0] = _mm256_add_ps(v[r][0], _mm256_loadu_ps(cr));
        v[r][1] = _mm256_add_ps(v[r][1], _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, v[r][0]);
      _mm256_storeu_ps(cr + 8, v[r][1]);
    }
    return;
  }
  alignas(32) float t[MR][NR];
  _mm256_store_ps(t[0], c00); _mm256_store_ps(t[0] + 8, c01);
  _mm256_store_ps(t[1], c10); _mm256_store_ps(t[1] + 8, c11);
  _mm256_store_ps(t[2], c20); _mm256_store_ps(t[2] + 8, c21);
  _mm256_store_ps(t[3], c30); _mm256_store_ps(t[3] + 8, c31);
  _mm256_store_ps(t[4], c40); _mm256_store_ps(t[4] + 8, c41);
  _mm256_store_ps(t[5], c50); _mm256_store_ps(t[5] + 8, c51);
  for (int r = 0; r < rows; r++) {
    float* cr = c + (size_t)r * ldc;
    if (acc) for (int j = 0; j < cols; j++) cr[j] += t[r][j];
    else memcpy(cr, t[r], cols * sizeof(float));
  }
}
#endif

void tile_plain(const float* ap, const float* bp, int kb, float* c, int ldc, int rows, int cols, bool acc) {
  float t[MR][NR] = {};
  for (int k = 0; k < kb; k++)
    for (int r = 0; r < MR; r++) {
      float x = ap[k * MR + r];
      for (int j = 0; j < NR; j++) t[r][j] += x * bp[k * NR + j];
    }
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < cols; j++) c[(size_t)r * ldc + j] = (acc ? c[(size_t)r * ldc + j] : 0.f) + t[r][j];
}

// The block of C with rows [r0, r1) (multiples of MR) and panels [p0, p1).
void gemm_block(const Op& A, const Op& B, int M, int N, int K, float* C, int r0, int r1, int p0, int p1) {
  if (r0 >= r1 || p0 >= p1) return;
  std::vector<float> bp((size_t)(p1 - p0) * std::min(KC, K) * NR);
  alignas(32) float ap[MR * KC];
  for (int k0 = 0; k0 < K; k0 += KC) {
    int kb = std::min(KC, K - k0);
    pack_b(B, k0, kb, N, p0, p1, bp.data());
    for (int i = r0; i < r1; i += MR) {
      pack_a(A, i, M, k0, kb, ap);
      int rows = std::min(MR, M - i);
      for (int p = p0; p < p1; p++) {
        int cols = std::min(NR, N - p * NR);
        float* c = C + (size_t)i * N + p * NR;
        const float* b = bp.data() + (size_t)(p - p0) * kb * NR;
#ifdef PREFOPT_X86
        if (g_avx2) {
          tile_avx2(ap, b, kb, c, N, rows, cols, k0 > 0);
          continue;
        }
#endif
        tile_plain(ap, b, kb, c, N, rows, cols, k0 > 0);
      }
    }
  }
}

// One product C[M,N] = op(A)·op(B) on `threads` threads.
void gemm_builtin(bool ta, bool tb, int M, int N, int K, const float* A, const float* B, float* C, int threads) {
  if (K == 0) {
    memset(C, 0, sizeof(float) * M * N);
    return;
  }
  Op a{A, ta, ta ? M : K}, b{B, tb, tb ? K : N};
  int panels = (N + NR - 1) / NR, tiles = (M + MR - 1) / MR;
  if (panels >= 2 * threads || panels >= tiles)
    parallel(panels, threads, [&](int p0, int p1) { gemm_block(a, b, M, N, K, C, 0, M, p0, p1); });
  else
    parallel(tiles, threads, [&](int t0, int t1) { gemm_block(a, b, M, N, K, C, t0 * MR, std::min(M, t1 * MR), 0, panels); });
}

}  // namespace

void matmul(bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K, const float* A, int64_t sa, const float* B, int64_t sb, float* C, bool useBlas) {
  if (useBlas && g_sgemm) {
    for (int64_t b = 0; b < batch; b++)
      g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, (int)M, (int)N, (int)K, 1.f, A + b * sa, ta ? (int)M : (int)K, B + b * sb,
              tb ? (int)K : (int)N, 0.f, C + b * M * N, (int)N);
    return;
  }
  // Small products are not worth a thread; many of them split over the batch instead.
  double work = (double)M * N * K;
  if (batch > 1 && work * batch > 2e5) {
    parallel((int)batch, g_threads, [&](int b0, int b1) {
      for (int b = b0; b < b1; b++) gemm_builtin(ta, tb, (int)M, (int)N, (int)K, A + b * sa, B + b * sb, C + (int64_t)b * M * N, 1);
    });
  } else {
    for (int64_t b = 0; b < batch; b++) gemm_builtin(ta, tb, (int)M, (int)N, (int)K, A + b * sa, B + b * sb, C + b * M * N, work > 2e5 ? g_threads : 1);
  }
}

bool blas_loaded() { return g_sgemm != nullptr; }

}  // namespace prefopt
