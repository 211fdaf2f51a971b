// prefopt's native matmul: C[b] = op(A[b]) · op(B[b]) in float32, row-major, on tensor memory
// handed over from JavaScript (usually views into the wasm heap, so nothing is copied). A system
// CBLAS (OpenBLAS, BLIS, MKL, Accelerate) is opened at run time with dlopen, so the build needs
// no BLAS headers and the addon still loads where none is installed; without one, prefopt's own
// AVX-512 or AVX2/FMA kernels (portable C++ elsewhere) run on all cores.
#include "kernels.h"
#include "parallel.h"
#include <dlfcn.h>
#include <algorithm>
#include <cmath>
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
Isa g_isa = kPortable;

Isa detect_isa() {
  Isa have = kPortable;
#ifdef PREFOPT_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) have = kAVX2;
  if (have == kAVX2 && __builtin_cpu_supports("avx512f")) have = kAVX512;
#endif
  const char* cap = getenv("PREFOPT_ISA");
  if (cap && strcmp(cap, "avx2") == 0) have = std::min(have, kAVX2);
  if (cap && strcmp(cap, "portable") == 0) have = kPortable;
  return have;
}

const char* isa_name(Isa isa) { return isa == kAVX512 ? "AVX-512" : isa == kAVX2 ? "AVX2/FMA" : "portable"; }

// ---- 16-bit weights -------------------------------------------------------------------------
float half_to_float(uint16_t h, Dt dt) {
  uint32_t bits;
  if (dt == kBF16) bits = (uint32_t)h << 16;
  else {
    // IEEE half: sign, 5 exponent bits (bias 15), 10 fraction bits; subnormals are f·2⁻²⁴.
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, f = h & 0x3ffu;
    if (e == 0) {
      float v = (float)f * 5.9604644775390625e-08f;
      memcpy(&bits, &v, 4);
      bits |= sign;
    } else if (e == 31) bits = sign | 0x7f800000u | (f << 13);
    else bits = sign | ((e + 112) << 23) | (f << 13);
  }
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

namespace {
#ifdef PREFOPT_X86
__attribute__((target("avx512f"))) int64_t widen_avx512(const uint16_t* src, int64_t n, Dt dt, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256((const __m256i*)(src + i));
    __m512 v = dt == kBF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
    _mm512_storeu_ps(dst + i, v);
  }
  return i;
}
__attribute__((target("avx2,f16c"))) int64_t widen_avx2(const uint16_t* src, int64_t n, Dt dt, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128((const __m128i*)(src + i));
    __m256 v = dt == kBF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
    _mm256_storeu_ps(dst + i, v);
  }
  return i;
}
#endif
}  // namespace

void widen(const uint16_t* src, int64_t n, Dt dt, float* dst) {
  int64_t i = 0;
#ifdef PREFOPT_X86
  if (g_isa == kAVX512) i = widen_avx512(src, n, dt, dst);
  else if (g_isa == kAVX2 && __builtin_cpu_supports("f16c")) i = widen_avx2(src, n, dt, dst);
#endif
  for (; i < n; i++) dst[i] = half_to_float(src[i], dt);
}

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
// Blocked like GotoBLAS: for each KC-slice of K, B is packed into NR-wide column panels
// (contiguous per k, whatever the transpose), and each MR×NR tile of C is accumulated in
// vector registers, reading its MR rows of op(A) in place when A is not transposed (packing
// them cost a fifth of the time of this project's small products), from a packed copy of the
// tile when it is (see gemm_block). Threads take disjoint column ranges of C (or row ranges
// when C is narrow) and pack what they read themselves.
// Every element of C is the same chain of fused multiply-adds in k order, KC at a time, in all
// three kernels below (AVX-512 12×32, AVX2 6×16, portable 6×16), so they give the same bits,
// and so does any thread count.
constexpr int KC = 256;


struct Op {
  const float* p;
  bool trans;
  int64_t ld;
  // A 16-bit B operand (a frozen weight as the checkpoint stores it): its bits, read through
  // at() and pack_b, never through p.
  const uint16_t* h = nullptr;
  Dt dt = kF32;
  float at(int r, int c) const {
    size_t i = trans ? (size_t)c * ld + r : (size_t)r * ld + c;
    return h ? half_to_float(h[i], dt) : p[i];
  }
  // Strides of op(A) rows and columns in memory.
  int64_t rs() const { return trans ? 1 : ld; }
  int64_t cs() const { return trans ? ld : 1; }
};

#ifdef PREFOPT_X86
// dst[k][c] = src[c·ld + k] for a 16×16 block (k, c < 16), dst rows `stride` apart. A transposed
// B (dy·Wᵀ in every linear layer's backward, LoRA's included; the tied LM head) was gathered one
// float at a time: one thread, 13×129×64 ran at 31 GFLOP/s so against 46 now, 37×70×300 59 → 73.
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t ld, float* dst, int64_t stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4q + m] holds, for each 128-bit lane L, the values of k = 4L + m from columns 4q … 4q+3.
  for (int m = 0; m < 4; m++) {
    __m512 a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), b = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    __m512 c = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88), d = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    t[m] = _mm512_shuffle_f32x4(a, c, 0x88);       // k = m
    t[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);   // k = 8 + m
    t[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);   // k = 4 + m
    t[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);  // k = 12 + m
  }
  for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * stride, t[i]);
}
#endif

// Bp as pack_b below, for a 16-bit B: rows of op(B) widened in place of the copy; a transposed
// B (x·Wᵀ on the checkpoint's [out, in] weights) 16 columns at a time, widened into a 16×16
// block and transposed as the float32 path does (the same values, so the same bits).
template <int NR>
void pack_b_half(const Op& B, int k0, int kb, int N, int p0, int p1, float* Bp) {
  for (int p = p0; p < p1; p++) {
    float* dst = Bp + (size_t)(p - p0) * kb * NR;
    int j0 = p * NR, jn = std::min(NR, N - j0);
    int k = 0;
#ifdef PREFOPT_X86
    if (B.trans && jn == NR && NR % 16 == 0 && g_isa == kAVX512) {
      alignas(64) float blk[16 * 16];
      for (; k + 16 <= kb; k += 16)
        for (int c = 0; c < NR; c += 16) {
          for (int i = 0; i < 16; i++) widen(B.h + (size_t)(j0 + c + i) * B.ld + k0 + k, 16, B.dt, blk + i * 16);
          transpose16(blk, 16, dst + (size_t)k * NR + c, NR);
        }
    }
#endif
    for (; k < kb; k++) {
      float* d = dst + (size_t)k * NR;
      if (!B.trans && jn == NR) widen(B.h + (size_t)(k0 + k) * B.ld + j0, NR, B.dt, d);
      else {
        for (int j = 0; j < jn; j++) d[j] = B.at(k0 + k, j0 + j);
        for (int j = jn; j < NR; j++) d[j] = 0.f;
      }
    }
  }
}

// Bp[panel - p0][k][0..NR) for panels [p0, p1), k in [k0, k0+kb), zero-padded past N.
template <int NR>
void pack_b(const Op& B, int k0, int kb, int N, int p0, int p1, float* Bp) {
  if (B.h) return pack_b_half<NR>(B, k0, kb, N, p0, p1, Bp);
  for (int p = p0; p < p1; p++) {
    float* dst = Bp + (size_t)(p - p0) * kb * NR;
    int j0 = p * NR, jn = std::min(NR, N - j0);
    int k = 0;
#ifdef PREFOPT_X86
    if (B.trans && jn == NR && NR % 16 == 0 && g_isa == kAVX512)
      for (; k + 16 <= kb; k += 16)
        for (int c = 0; c < NR; c += 16) transpose16(B.p + (size_t)(j0 + c) * B.ld + k0 + k, B.ld, dst + (size_t)k * NR + c, NR);
#endif
    for (; k < kb; k++) {
      float* d = dst + (size_t)k * NR;
      if (!B.trans && jn == NR) memcpy(d, B.p + (size_t)(k0 + k) * B.ld + j0, NR * sizeof(float));
      else {
        for (int j = 0; j < jn; j++) d[j] = B.at(k0 + k, j0 + j);
        for (int j = jn; j < NR; j++) d[j] = 0.f;
      }
    }
  }
}

#ifdef PREFOPT_X86
// prefetchw: fetch the line in a state to be written (every x86 with AVX2 has it; older ones
// may fault on it, so it runs only there).
inline void prefetch_w(const float* p) { asm volatile("prefetchw %0" : : "m"(*(const char*)p)); }
#endif

// Tile arguments: a = op(A)[i][k0] with strides rs (rows) and cs (k); rows ≤ MR of them are
// real (the others repeat the last row and are not stored); bp the packed panel; c the tile of
// C (row stride ldc), of which rows×cols are written, added to what is there when acc.
struct Tile {
  const float* a;
  int64_t rs, cs;
  const float* bp;
  int kb;
  float* c;
  int ldc, rows, cols;
  bool acc;
  const float* row(int r) const { return a + (int64_t)std::min(r, rows - 1) * rs; }
};

// Writes the MR×NR accumulator tile t (row-major scratch) into C.
template <int MR, int NR>
void store_tile(const Tile& t, const float* acc) {
  for (int r = 0; r < t.rows; r++) {
    float* cr = t.c + (size_t)r * t.ldc;
    const float* s = acc + r * NR;
    if (t.acc)
      for (int j = 0; j < t.cols; j++) cr[j] += s[j];
    else
      memcpy(cr, s, t.cols * sizeof(float));
  }
}

#ifdef PREFOPT_X86
// MR rows of the tile in registers; tile_avx512 picks the fewest that cover t.rows (a short last
// tile — decoding one token per sequence, attention over one query row, LoRA's rank-16
// products — would otherwise compute 12 rows for 1–4). Each row is the same chain whatever MR.
template <int MR>
__attribute__((target("avx512f"))) void tile_avx512_rows(const Tile& t) {
  constexpr int NR = 32;
  __m512 c[MR][2];
  for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
  const float* a[MR];
  for (int r = 0; r < MR; r++) a[r] = t.row(r);
  const float* bp = t.bp;
  for (int k = 0; k < t.kb; k++, bp += NR) {
    __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
    int64_t o = k * t.cs;
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
      __m512 x = _mm512_set1_ps(a[r][o]);
      c[r][0] = _mm512_fmadd_ps(x, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(x, b1, c[r][1]);
    }
  }
  if (t.rows == MR && t.cols == NR) {
    for (int r = 0; r < MR; r++) {
      float* cr = t.c + (size_t)r * t.ldc;
      if (t.acc) {
        c[r][0] = _mm512_add_ps(c[r][0], _mm512_loadu_ps(cr));
        c[r][1] = _mm512_add_ps(c[r][1], _mm512_loadu_ps(cr + 16));
      }
      _mm512_storeu_ps(cr, c[r][0]);
      _mm512_storeu_ps(cr + 16, c[r][1]);
    }
    return;
  }
  alignas(64) float s[MR * NR];
  for (int r = 0; r < MR; r++) {
    _mm512_store_ps(s + r * NR, c[r][0]);
    _mm512_store_ps(s + r * NR + 16, c[r][1]);
  }
  store_tile<MR, NR>(t, s);
}

__attribute__((target("avx512f"))) void tile_avx512(const Tile& t) {
  if (t.rows <= 1) return tile_avx512_rows<1>(t);
  if (t.rows <= 4) return tile_avx512_rows<4>(t);
  if (t.rows <= 8) return tile_avx512_rows<8>(t);
  tile_avx512_rows<12>(t);
}

// Named accumulators: with only 16 ymm registers GCC kept an accumulator array in memory.
__attribute__((target("avx2,fma"))) void tile_avx2(const Tile& t) {
  constexpr int MR = 6, NR = 16;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = t.row(0), *a1 = t.row(1), *a2 = t.row(2), *a3 = t.row(3), *a4 = t.row(4), *a5 = t.row(5);
  const float* bp = t.bp;
  const int kb = t.kb;
  const int64_t cs = t.cs;
  for (int k = 0; k < kb; k++, bp += NR) {
    __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), x;
    int64_t o = k * cs;
    x = _mm256_broadcast_ss(a0 + o); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + o); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + o); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + o); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a4 + o); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a5 + o); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  __m256 c[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (t.rows == MR && t.cols == NR) {
    for (int r = 0; r < MR; r++) {
      float* cr = t.c + (size_t)r * t.ldc;
      if (t.acc) {
        c[r][0] = _mm256_add_ps(c[r][0], _mm256_loadu_ps(cr));
        c[r][1] = _mm256_add_ps(c[r][1], _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, c[r][0]);
      _mm256_storeu_ps(cr + 8, c[r][1]);
    }
    return;
  }
  alignas(32) float s[MR * NR];
  for (int r = 0; r < MR; r++) {
    _mm256_store_ps(s + r * NR, c[r][0]);
    _mm256_store_ps(s + r * NR + 8, c[r][1]);
  }
  store_tile<MR, NR>(t, s);
}
#endif

void tile_plain(const Tile& t) {
  constexpr int MR = 6, NR = 16;
  float s[MR * NR] = {};
  for (int k = 0; k < t.kb; k++)
    for (int r = 0; r < MR; r++) {
      float x = t.row(r)[k * t.cs];
      for (int j = 0; j < NR; j++) s[r * NR + j] = std::fma(x, t.bp[k * NR + j], s[r * NR + j]);
    }
  store_tile<MR, NR>(t, s);
}

// C and whether to add to it: row stride ldc; acc adds the product to what C holds.
struct Out {
  float* p;
  int64_t ld;
  bool acc;
};

// One product op(A)·op(B) of a sum C = Σ op(A_i)·op(B_i); B already packed when `packed` (see
// gemm_pack: panel p's row k at packed + p·ps + k·NR).
struct Term {
  Op a, b;
  int K;
  const float* packed = nullptr;
  int64_t ps = 0;
};

// The block of C with rows [r0, r1) (multiples of MR) and panels [p0, p1). Each term's K runs in
// KC-slices after the previous term's, as if the terms were one product over the concatenated K:
// LoRA's update costs one more slice over C, not a second product and an add.
// kmax is the longest slice (the packed B's depth).
template <int MR, int NR, void (*TILE)(const Tile&)>
void gemm_block(const Term* terms, int nterms, int kmax, int M, int N, const Out& C, int r0, int r1, int p0, int p1) {
  if (r0 >= r1 || p0 >= p1) return;
  // Per-thread scratch, grown when needed and never cleared: attention makes many small products.
  thread_local std::vector<float> bp;
  size_t need = (size_t)(p1 - p0) * kmax * NR;
  if (bp.size() < need) bp.resize(need);
  alignas(64) float ap[MR * KC];
  bool acc = C.acc;
  for (int s = 0; s < nterms; s++) {
    const Op &A = terms[s].a, &B = terms[s].b;
    for (int k0 = 0; k0 < terms[s].K; k0 += KC) {
      int kb = std::min(KC, terms[s].K - k0);
      const float* packed = terms[s].packed;
      if (!packed) pack_b<NR>(B, k0, kb, N, p0, p1, bp.data());
      for (int i = r0; i < r1; i += MR) {
        Tile t{A.p + i * A.rs() + k0 * A.cs(), A.rs(), A.cs(), nullptr, kb, nullptr, (int)C.ld, std::min(MR, M - i), 0, acc};
        if (A.trans && p1 - p0 > 1) {
          // A transposed (weight gradients): a tile's k-th values lie one row of A apart, 1 KB or
          // more, so the lines of one tile fall into a few L1 sets and were fetched again from L2
          // for every panel. Copied to [kb][MR] they are contiguous. (With one panel, as in
          // attention's dK and dV, the copy is not repaid: 7% slower there.)
          for (int k = 0; k < kb; k++) std::copy(t.a + (int64_t)k * A.ld, t.a + (int64_t)k * A.ld + t.rows, ap + (size_t)k * MR);
          t.a = ap;
          t.rs = 1;
          t.cs = MR;
        }
        // The next row tile's lines of A, a share after each panel's tile: A is the previous
        // kernel's output or another layer's, mostly not in this core's caches, and rows of one
        // slice (K ≤ KC) are too short for the hardware's prefetcher to follow (one thread,
        // products in turn on separate operands: +2–4% at K = 256; at K = 704, 2% slower; in
        // attention's products of a few row tiles, whose A is at hand, 2–3% slower).
        int next = !A.trans && terms[s].K <= KC && r1 - r0 >= 8 * MR && i + MR < r1 ? std::min(MR, M - i - MR) : 0;
        int lines = (kb * (int)sizeof(float) + 63) / 64, todo = next * lines, per = (todo + (p1 - p0) - 1) / (p1 - p0), done = 0;
        const float* na = next ? A.p + (i + MR) * A.rs() + k0 * A.cs() : nullptr;
        for (int p = p0; p < p1; p++) {
#ifdef PREFOPT_X86
          for (int e = std::min(done + per, todo); done < e; done++) _mm_prefetch((const char*)(na + (done / lines) * A.rs()) + (done % lines) * 64, _MM_HINT_T0);
#endif
          t.cols = std::min(NR, N - p * NR);
          t.c = C.p + i * C.ld + p * NR;
#ifdef PREFOPT_X86
          // C is usually a fresh output not in this core's caches: its lines are requested for
          // writing now, while the tile computes, not when the tile is stored (one thread, 16
          // products in turn on separate operands: 1024×256×256 +3–4%).
          if (g_isa >= kAVX2)
            for (int r = 0; r < t.rows; r++)
              for (int j = 0; j < t.cols; j += 16) prefetch_w(t.c + (size_t)r * C.ld + j);
#endif
          t.bp = packed ? packed + p * terms[s].ps + (int64_t)k0 * NR : bp.data() + (size_t)(p - p0) * kb * NR;
          TILE(t);
        }
      }
      acc = true;
    }
  }
}

// Threads take row ranges of C where each one's copy of the packed B (all panels, one KC-slice)
// fits in L2 beside its rows of A: every thread then reads only its share of A, and each row
// tile of A serves every panel (with column ranges, a transposed A — weight gradients — was
// reloaded from scattered lines for every 4 panels at N = 256: 140 against 230 GFLOP/s).
// Wider products split by columns.
constexpr size_t kPackedBPerThread = 1 << 20;

template <int MR, int NR, void (*TILE)(const Tile&)>
void gemm_with(const Term* terms, int nterms, int M, int N, const Out& C, int threads) {
  int panels = (N + NR - 1) / NR, tiles = (M + MR - 1) / MR, kb = 0;
  for (int s = 0; s < nterms; s++) kb = std::max(kb, std::min(KC, terms[s].K));
  bool by_rows = tiles >= 2 * threads ? (size_t)panels * kb * NR * sizeof(float) <= kPackedBPerThread : tiles > panels;
  if (by_rows)
    parallel(tiles, threads, [&](int t0, int t1) { gemm_block<MR, NR, TILE>(terms, nterms, kb, M, N, C, t0 * MR, std::min(M, t1 * MR), 0, panels); });
  else
    parallel(panels, threads, [&](int p0, int p1) { gemm_block<MR, NR, TILE>(terms, nterms, kb, M, N, C, 0, M, p0, p1); });
}

// The kernel for panels nr wide (see gemm_panel_width): the packed B of gemm_pack must meet
// the kernel it was packed for.
void run_terms(const Term* t, int n, int M, int N, const Out& c, int threads, int nr) {
#ifdef PREFOPT_X86
  if (nr == 32) return gemm_with<12, 32, tile_avx512>(t, n, M, N, c, threads);
  if (g_isa >= kAVX2) return gemm_with<6, 16, tile_avx2>(t, n, M, N, c, threads);
#endif
  gemm_with<6, 16, tile_plain>(t, n, M, N, c, threads);
}
}  // namespace

// Narrow products (LoRA's rank-16 factors) would leave half of a 32-wide tile empty; the
// 16-wide kernel computes the same bits.
int gemm_panel_width(int N) { return g_isa == kAVX512 && N > 16 ? 32 : 16; }

namespace {
#ifdef PREFOPT_X86
__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int K) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int k = 0;
  for (; k + 32 <= K; k += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), s1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; k < K; k++) s = std::fma(a[k], b[k], s);
  return s;
}
#endif
float dot(const float* a, const float* b, int K) {
#ifdef PREFOPT_X86
  if (g_isa == kAVX512) return dot_avx512(a, b, K);
#endif
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int k = 0;
  for (; k + 4 <= K; k += 4) {
    s0 = std::fma(a[k], b[k], s0);
    s1 = std::fma(a[k + 1], b[k + 1], s1);
    s2 = std::fma(a[k + 2], b[k + 2], s2);
    s3 = std::fma(a[k + 3], b[k + 3], s3);
  }
  float s = (s0 + s1) + (s2 + s3);
  for (; k < K; k++) s = std::fma(a[k], b[k], s);
  return s;
}

// Rows of C at most this many take x·Wᵀ for a 16-bit W [N, K] as dot products (gemv_half).
constexpr int kGemvRows = 4;

// C[m][j] (+)= Σ_k A[m][k]·W[j][k] for a 16-bit W stored [N, K] (x·Wᵀ: every frozen linear and
// the tied head when decoding, a few rows at a time). Each row of W is widened once into a
// scratch row and dotted with the M rows of A: the weights are read once, at 2 bytes a value,
// where packing them into panels for one row tile cost more than the arithmetic (decoding 4
// samples of the 0.5B model: see bench/RESULTS.md). Each output is one dot product in a fixed
// order, so any thread count gives the same bits; they differ from the tiled kernel's (another
// summation order) in float32 rounding only.
void gemv_half(int M, int N, int K, const float* A, int64_t lda, const uint16_t* W, int64_t ldw, Dt dt, float* C, int64_t ldc, bool acc, int threads) {
  parallel(N, threads, [&](int j0, int j1) {
    thread_local std::vector<float> row;
    if ((int)row.size() < K) row.resize(K);
    for (int j = j0; j < j1; j++) {
      widen(W + (size_t)j * ldw, K, dt, row.data());
      for (int m = 0; m < M; m++) {
        float v = dot(A + m * lda, row.data(), K);
        float& c = C[m * ldc + j];
        c = acc ? c + v : v;
      }
    }
  });
}
}  // namespace

void gemm_sum(int M, int N, const GemmTerm* terms, int nterms, float* C, int64_t ldc, bool accumulate, int threads) {
  // Decoding: leading terms of x·Wᵀ on a 16-bit W go through gemv_half, the rest add to them.
  if (M <= kGemvRows)
    for (; nterms > 0 && (terms[0].K == 0 || (terms[0].bdt != kF32 && terms[0].tb && !terms[0].ta)); terms++, nterms--) {
      if (terms[0].K == 0) continue;
      gemv_half(M, N, terms[0].K, terms[0].A, terms[0].lda, static_cast<const uint16_t*>(terms[0].B), terms[0].ldb, terms[0].bdt, C, ldc, accumulate, threads);
      accumulate = true;
    }
  Out c{C, ldc, accumulate};
  Term t[kMaxTerms];  // on the stack: attention calls this hundreds of times per head
  int n = 0;
  for (int i = 0; i < nterms && n < kMaxTerms; i++)
    if (terms[i].K > 0) {
      const GemmTerm& g = terms[i];
      Op b = g.bdt == kF32 ? Op{static_cast<const float*>(g.B), g.tb, g.ldb} : Op{nullptr, g.tb, g.ldb, static_cast<const uint16_t*>(g.B), g.bdt};
      t[n++] = Term{Op{g.A, g.ta, g.lda}, b, g.K};
    }
  if (n == 0) {
    if (!accumulate)
      for (int i = 0; i < M; i++) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  run_terms(t, n, M, N, c, threads, gemm_panel_width(N));
}

void gemm(bool ta, bool tb, int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate, int threads) {
  GemmTerm t{ta, tb, K, A, lda, B, ldb};
  gemm_sum(M, N, &t, 1, C, ldc, accumulate, threads);
}

void gemm_pack(bool tb, int K, int N, const float* B, int64_t ldb, int nr, float* Bp) {
  Op b{B, tb, ldb};
  int panels = (N + nr - 1) / nr;
  if (nr == 32) pack_b<32>(b, 0, K, N, 0, panels, Bp);
  else pack_b<16>(b, 0, K, N, 0, panels, Bp);
}

void gemm_packed(bool ta, int M, int N, int K, const float* A, int64_t lda, const float* Bp, int64_t ps, int nr, float* C, int64_t ldc, bool accumulate, int threads) {
  if (K <= 0) return gemm(ta, false, M, N, 0, A, lda, Bp, 0, C, ldc, accumulate, threads);
  Term t{Op{A, ta, lda}, Op{nullptr, false, 0}, K, Bp, ps};
  run_terms(&t, 1, M, N, Out{C, ldc, accumulate}, threads, nr);
}

namespace {
// One dense product C[M,N] = op(A)·op(B).
void gemm_builtin(bool ta, bool tb, int M, int N, int K, const float* A, const float* B, float* C, int threads) {
  gemm(ta, tb, M, N, K, A, ta ? M : K, B, tb ? K : N, C, N, false, threads);
}

// Small products are not worth waking a second thread.
bool worth_threads(double work) { return work > 2e5; }
}  // namespace

void matmul(bool ta, bool tb, int64_t batch, int64_t M, int64_t N, int64_t K, const float* A, int64_t sa, const float* B, int64_t sb, float* C, bool useBlas) {
  if (useBlas && g_sgemm) {
    for (int64_t b = 0; b < batch; b++)
      g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, (int)M, (int)N, (int)K, 1.f, A + b * sa, ta ? (int)M : (int)K, B + b * sb,
              tb ? (int)K : (int)N, 0.f, C + b * M * N, (int)N);
    return;
  }
  // Many small products split over the batch instead.
  double work = (double)M * N * K;
  if (batch > 1 && worth_threads(work * batch)) {
    parallel((int)batch, g_threads, [&](int b0, int b1) {
      for (int b = b0; b < b1; b++) gemm_builtin(ta, tb, (int)M, (int)N, (int)K, A + b * sa, B + b * sb, C + (int64_t)b * M * N, 1);
    });
  } else {
    for (int64_t b = 0; b < batch; b++) gemm_builtin(ta, tb, (int)M, (int)N, (int)K, A + b * sa, B + b * sb, C + b * M * N, worth_threads(work) ? g_threads : 1);
  }
}

void matmul2(int64_t M, int64_t N, const DenseTerm& t1, const DenseTerm& t2, float* C) {
  // Dense operands: a row of op(A) is K long unless A is transposed (then M), and so on.
  auto term = [&](const DenseTerm& t) { return GemmTerm{t.ta, t.tb, (int)t.K, t.A, t.ta ? M : t.K, t.B, t.tb ? t.K : N, t.bdt}; };
  GemmTerm ts[2] = {term(t1), term(t2)};
  gemm_sum((int)M, (int)N, ts, 2, C, N, false, worth_threads((double)M * N * (t1.K + t2.K)) ? g_threads : 1);
}

}  // namespace prefopt
