// prefopt's native matmul: C[b] = op(A[b]) · op(B[b]) in float32, row-major, called
// synchronously from JavaScript on Float32Arrays (usually views into the wasm heap, so nothing
// is copied). A system CBLAS (OpenBLAS, BLIS, MKL, Accelerate) is opened at run time with
// dlopen, so the build needs no BLAS headers and the addon still loads where none is installed;
// without one, a packed AVX2/FMA kernel (portable C++ elsewhere) runs on all cores.
#include <node_api.h>
#include <dlfcn.h>
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PREFOPT_X86 1
#endif

namespace {

// ---- CBLAS through dlopen -------------------------------------------------------------------
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
typedef void (*set_threads_fn)(int);

sgemm_fn g_sgemm = nullptr;
std::string g_lib;
int g_threads = 1;

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
bool g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
bool g_avx2 = false;
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

template <class F>
void parallel(int n, int threads, F f) {
  if (threads <= 1 || n <= 1) {
    f(0, n);
    return;
  }
  threads = std::min(threads, n);
  std::vector<std::thread> ts;
  for (int t = 1; t < threads; t++) ts.emplace_back([=] { f((int)((int64_t)n * t / threads), (int)((int64_t)n * (t + 1) / threads)); });
  f(0, (int)((int64_t)n / threads));
  for (auto& t : ts) t.join();
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

// ---- N-API ----------------------------------------------------------------------------------
float* f32(napi_env env, napi_value v, size_t need, const char* what) {
  napi_typedarray_type type;
  size_t length;
  void* data;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &type, &length, &data, &ab, &off) != napi_ok || type != napi_float32_array) {
    napi_throw_type_error(env, nullptr, (std::string(what) + " must be a Float32Array").c_str());
    return nullptr;
  }
  if (length < need) {
    napi_throw_range_error(env, nullptr, (std::string(what) + " is shorter than the shapes say").c_str());
    return nullptr;
  }
  return static_cast<float*>(data);
}

int64_t i64(napi_env env, napi_value v) {
  int64_t x = 0;
  napi_get_value_int64(env, v, &x);
  return x;
}

// matmul(transA, transB, batch, M, N, K, A, strideA, B, strideB, C, useBlas): C[b] = op(A[b])·op(B[b]),
// A[b] at b·strideA (0 broadcasts one matrix over the batch), C dense [batch, M, N].
napi_value Matmul(napi_env env, napi_callback_info info) {
  size_t argc = 12;
  napi_value argv[12];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < 12) {
    napi_throw_type_error(env, nullptr, "matmul takes 12 arguments");
    return nullptr;
  }
  bool ta, tb, useBlas;
  napi_get_value_bool(env, argv[0], &ta);
  napi_get_value_bool(env, argv[1], &tb);
  napi_get_value_bool(env, argv[11], &useBlas);
  int64_t batch = i64(env, argv[2]), M = i64(env, argv[3]), N = i64(env, argv[4]), K = i64(env, argv[5]);
  int64_t sa = i64(env, argv[7]), sb = i64(env, argv[9]);
  if (batch < 0 || M < 0 || N < 0 || K < 0 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) {
    napi_throw_range_error(env, nullptr, "matmul: bad shape");
    return nullptr;
  }
  float* A = f32(env, argv[6], batch ? (batch - 1) * sa + M * K : 0, "A");
  if (!A) return nullptr;
  float* B = f32(env, argv[8], batch ? (batch - 1) * sb + K * N : 0, "B");
  if (!B) return nullptr;
  float* C = f32(env, argv[10], batch * M * N, "C");
  if (!C) return nullptr;
  if (useBlas && g_sgemm) {
    for (int64_t b = 0; b < batch; b++)
      g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, (int)M, (int)N, (int)K, 1.f, A + b * sa, ta ? (int)M : (int)K, B + b * sb,
              tb ? (int)K : (int)N, 0.f, C + b * M * N, (int)N);
    return nullptr;
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
  return nullptr;
}

// ---- log-softmax at the label --------------------------------------------------------------
// The language-model loss reads one log-probability per row of logits [N, V]; as separate wasm
// kernels (max, sub, exp, sum, log, one-hot, mul, sum and the same again backward) it cost as
// much as the matmuls of the lm head. Fused: one pass for the row's log-sum-exp, one for the
// gradient. Rows split over threads; each row is summed in order, so results are reproducible.
int32_t* i32(napi_env env, napi_value v, size_t need) {
  napi_typedarray_type type;
  size_t length;
  void* data;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &type, &length, &data, &ab, &off) != napi_ok || type != napi_int32_array || length < need) {
    napi_throw_type_error(env, nullptr, "labels must be an Int32Array as long as the rows");
    return nullptr;
  }
  return static_cast<int32_t*>(data);
}

// Both loss functions start (logits, N, V, labels, …); false after throwing.
bool loss_args(napi_env env, napi_callback_info info, size_t n, napi_value* argv, int64_t& N, int64_t& V, float*& x, int32_t*& y) {
  size_t argc = n;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < n) {
    napi_throw_type_error(env, nullptr, "wrong number of arguments");
    return false;
  }
  N = i64(env, argv[1]);
  V = i64(env, argv[2]);
  x = f32(env, argv[0], N * V, "logits");
  if (!x) return false;
  y = i32(env, argv[3], N);
  return y != nullptr;
}

// labelLogProbs(x, N, V, labels, out, lse): out[i] = x[i, y_i] − lse_i (0 when y_i ∉ [0, V)).
napi_value LabelLogProbs(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  int64_t N, V;
  float* x;
  int32_t* y;
  if (!loss_args(env, info, 6, argv, N, V, x, y)) return nullptr;
  float* out = f32(env, argv[4], N, "out");
  if (!out) return nullptr;
  float* lse = f32(env, argv[5], N, "lse");
  if (!lse) return nullptr;
  parallel((int)N, N * V > 65536 ? g_threads : 1, [&](int r0, int r1) {
    for (int r = r0; r < r1; r++) {
      const float* row = x + (int64_t)r * V;
      float m = row[0];
      for (int64_t j = 1; j < V; j++) m = std::max(m, row[j]);
      double s = 0;
      for (int64_t j = 0; j < V; j++) s += std::exp(row[j] - m);
      lse[r] = m + (float)std::log(s);
      out[r] = y[r] >= 0 && y[r] < V ? row[y[r]] - lse[r] : 0.f;
    }
  });
  return nullptr;
}

// labelLogProbsGrad(x, N, V, labels, lse, dy, dx): dx[i, j] = dy_i · (1[j = y_i] − softmax(x_i)_j).
napi_value LabelLogProbsGrad(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  int64_t N, V;
  float* x;
  int32_t* y;
  if (!loss_args(env, info, 7, argv, N, V, x, y)) return nullptr;
  float* lse = f32(env, argv[4], N, "lse");
  if (!lse) return nullptr;
  float* dy = f32(env, argv[5], N, "dy");
  if (!dy) return nullptr;
  float* dx = f32(env, argv[6], N * V, "dx");
  if (!dx) return nullptr;
  parallel((int)N, N * V > 65536 ? g_threads : 1, [&](int r0, int r1) {
    for (int r = r0; r < r1; r++) {
      const float* row = x + (int64_t)r * V;
      float* d = dx + (int64_t)r * V;
      bool valid = y[r] >= 0 && y[r] < V;
      float g = valid ? dy[r] : 0.f;
      for (int64_t j = 0; j < V; j++) d[j] = -g * std::exp(row[j] - lse[r]);
      if (valid) d[y[r]] += g;
    }
  });
  return nullptr;
}

napi_value Info(napi_env env, napi_callback_info) {
  napi_value o, v;
  napi_create_object(env, &o);
  napi_create_string_utf8(env, g_lib.c_str(), NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, o, "blas", v);
  napi_create_int32(env, g_threads, &v);
  napi_set_named_property(env, o, "threads", v);
  napi_get_boolean(env, g_avx2, &v);
  napi_set_named_property(env, o, "avx2", v);
  return o;
}

napi_value Init(napi_env env, napi_value exports) {
  const char* t = getenv("PREFOPT_THREADS");
  g_threads = t && atoi(t) > 0 ? atoi(t) : std::max(1u, std::thread::hardware_concurrency());
  // The built-in AVX2 kernel measured faster than Debian's OpenBLAS 0.3.21 on this project's
  // machines (bench/RESULTS.md), so a system BLAS is used where that kernel cannot run, or when
  // PREFOPT_BLAS names one (openblas, blis, mkl_rt, Accelerate). Never chosen by timing: the
  // kernel decides the rounding, and the same seed must give the same result.
  const char* want = getenv("PREFOPT_BLAS");
  bool builtin_only = want && strcmp(want, "builtin") == 0;
  if (!builtin_only && ((want && *want) || !g_avx2)) open_blas(want);
  napi_property_descriptor props[] = {
      {"matmul", nullptr, Matmul, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"labelLogProbs", nullptr, LabelLogProbs, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"labelLogProbsGrad", nullptr, LabelLogProbsGrad, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"info", nullptr, Info, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, 4, props);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
