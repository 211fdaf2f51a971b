import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';

/*
 * Stand-ins for the three CUDA libraries the cuda backend opens, compiled here, so that the GPU
 * code path of native/cuda_device.cc — every entry point looked up, the context, NVRTC's compile
 * and the module's functions, launches with their parameter arrays, copies, and every cuBLASLt
 * descriptor — runs on a machine without one. Memory is host memory; a launch runs the addon's
 * emulated kernel of that name (the driver asks the addon for it: prefopt_standin_launcher);
 * cublasLtMatmul is written from cuBLASLt's documented contract — column-major layouts of rows ×
 * cols with a leading dimension, op(A) and op(B), strided batches, D = α·op(A)·op(B) + β·C —
 * in float64, bf16 or float32 operands, with TF32 inputs (10-bit mantissas) when that compute type
 * is asked for, and only
 * with an algorithm from its heuristic for buffers at least as aligned as the preference said.
 */
const DRIVER = String.raw`
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
typedef int (*launcher)(const char*, unsigned, unsigned, void**);
static launcher run_kernel;
void prefopt_standin_launcher(launcher f) { run_kernel = f; }
static char* image;
int cuInit(unsigned f) { return 0; }
int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
int cuDeviceGetCount(int* n) { *n = 1; return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return i == 0 ? 0 : 101; }
int cuDeviceGetName(char* s, int n, int d) { strncpy(s, "Stand-in GPU", n); return 0; }
int cuDeviceGetAttribute(int* v, int a, int d) { *v = a == 75 ? 9 : a == 76 ? 0 : a == 16 ? 2 : 0; return 0; }
int cuDeviceTotalMem_v2(size_t* b, int d) { *b = (size_t)1 << 30; return 0; }
int cuGetErrorString(int e, const char** s) { *s = e == 2 ? "out of memory" : e == 500 ? "named symbol not found" : e == 200 ? "device kernel image is invalid" : "invalid value"; return 0; }
int cuDevicePrimaryCtxRetain(void** c, int d) { *c = (void*)1; return 0; }
int cuCtxSetCurrent(void* c) { return c ? 0 : 1; }
int cuMemAlloc_v2(unsigned long long* p, size_t n) { void* m = aligned_alloc(256, (n + 255) / 256 * 256); if (!m) return 2; *p = (unsigned long long)m; return 0; }
int cuMemFree_v2(unsigned long long p) { free((void*)p); return 0; }
/*
 * The stream: asynchronous copies wait in a queue and run only when the stream must have reached
 * them — before a launch, a product or a synchronous copy, at a synchronize, or at an event
 * synchronize up to where the event was recorded — as late as a GPU may run them, so staging
 * memory refilled before its copy ran shows as wrong data. They are taken only from pinned memory.
 */
typedef struct { unsigned long long d; const char* s; size_t n; } pending;
static pending queue[1 << 16];
static long done, queued;
static char *pinned_at, *pinned_end;
static void run_to(long upto) { for (; done < upto; done++) { pending* p = &queue[done % (1 << 16)]; memcpy((void*)p->d, p->s, p->n); } }
void standin_flush(void) { run_to(queued); }
int cuMemAllocHost_v2(void** p, size_t n) { *p = pinned_at = malloc(n); pinned_end = pinned_at + n; return pinned_at ? 0 : 2; }
int cuMemcpyHtoDAsync_v2(unsigned long long d, const void* s, size_t n, void* stream) {
  if (stream || (const char*)s < pinned_at || (const char*)s + n > pinned_end) return 1;
  if (queued - done == (1 << 16)) run_to(done + 1);
  queue[queued++ % (1 << 16)] = (pending){d, s, n};
  return 0;
}
int cuEventCreate(void** e, unsigned flags) { *e = calloc(1, sizeof(long)); return 0; }
int cuEventRecord(void* e, void* stream) { *(long*)e = queued; return stream ? 1 : 0; }
int cuEventSynchronize(void* e) { run_to(*(long*)e); return 0; }
int cuMemcpyHtoD_v2(unsigned long long d, const void* s, size_t n) { standin_flush(); memcpy((void*)d, s, n); return 0; }
int cuMemcpyDtoH_v2(void* d, unsigned long long s, size_t n) { standin_flush(); memcpy(d, (void*)s, n); return 0; }
int cuMemcpyDtoD_v2(unsigned long long d, unsigned long long s, size_t n) { standin_flush(); memmove((void*)d, (void*)s, n); return 0; }
int cuMemGetInfo_v2(size_t* f, size_t* t) { *f = (size_t)1 << 29; *t = (size_t)1 << 30; return 0; }
/* The image the stand-in NVRTC made: its architecture line, then the source. */
int cuModuleLoadData(void** m, const void* im) { if (strncmp((const char*)im, "STANDIN-CUBIN sm_90\n", 20)) return 200; image = strdup((const char*)im); *m = image; return 0; }
int cuModuleGetFunction(void** f, void* m, const char* name) {
  char want[256];
  snprintf(want, sizeof want, "__global__ void %s(", name);
  if (m != image || !strstr(image, want)) return 500;
  *f = strdup(name);
  return 0;
}
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shm, void* stream, void** params, void** extra) {
  if (gy != 1 || gz != 1 || by != 1 || bz != 1 || bx > 1024 || extra || !params) return 1;
  standin_flush();
  return run_kernel && run_kernel((const char*)f, gx, bx, params) ? 0 : 500;
}
int cuCtxSynchronize(void) { standin_flush(); return 0; }
`;

const NVRTC = String.raw`
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
typedef struct { char* src; char arch[32]; } prog;
int nvrtcVersion(int* a, int* b) { *a = 13; *b = 0; return 0; }
int nvrtcCreateProgram(void** p, const char* src, const char* name, int nh, const char* const* h, const char* const* inc) {
  prog* q = calloc(1, sizeof *q);
  q->src = strdup(src);
  *p = q;
  return nh == 0 ? 0 : 7;
}
/* A source with an #include would not compile alone; the architecture must be a real sm_. */
int nvrtcCompileProgram(void* p, int n, const char* const* opts) {
  prog* q = p;
  const char* log = getenv("STANDIN_NVRTC_LOG"); /* a line per compile, for the cache's test */
  if (log) { FILE* f = fopen(log, "a"); if (f) { fputs("compile\n", f); fclose(f); } }
  for (int i = 0; i < n; i++)
    if (!strncmp(opts[i], "--gpu-architecture=sm_", 22)) snprintf(q->arch, sizeof q->arch, "%s", opts[i] + 19);
  return q->arch[0] && !strstr(q->src, "#include") ? 0 : 6;
}
int nvrtcGetProgramLogSize(void* p, size_t* n) { *n = 1; return 0; }
int nvrtcGetProgramLog(void* p, char* s) { s[0] = 0; return 0; }
int nvrtcGetCUBINSize(void* p, size_t* n) { prog* q = p; *n = strlen(q->arch) + strlen(q->src) + 16; return 0; }
int nvrtcGetCUBIN(void* p, char* out) { prog* q = p; sprintf(out, "STANDIN-CUBIN %s\n%s", q->arch, q->src); return 0; }
int nvrtcDestroyProgram(void** p) { prog* q = *p; free(q->src); free(q); *p = 0; return 0; }
const char* nvrtcGetErrorString(int r) { return r == 6 ? "NVRTC_ERROR_COMPILATION" : "NVRTC_ERROR_INVALID_INPUT"; }
`;

const CUBLASLT = String.raw`
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
typedef struct { int compute, ta, tb; } desc;
typedef struct { unsigned long long rows, cols; long long ld, stride; int batch, type; } layout;
size_t cublasLtGetVersion(void) { return 130100; }
int cublasLtCreate(void** h) { *h = (void*)3; return 0; }
int cublasLtMatmulDescCreate(void** d, int compute, int scale) {
  if ((compute != 68 && compute != 77) || scale != 0) return 7;
  desc* x = calloc(1, sizeof *x);
  x->compute = compute;
  *d = x;
  return 0;
}
int cublasLtMatmulDescSetAttribute(void* d, int attr, const void* buf, size_t n) {
  desc* x = d;
  if (n != sizeof(int)) return 7;
  int op = *(const int*)buf;
  if (op != 0 && op != 1) return 7;
  if (attr == 3) x->ta = op; else if (attr == 4) x->tb = op; else return 7;
  return 0;
}
int cublasLtMatmulDescDestroy(void* d) { free(d); return 0; }
int cublasLtMatrixLayoutCreate(void** l, int type, unsigned long long rows, unsigned long long cols, long long ld) {
  if ((type != 0 && type != 14) || ld < (long long)rows) return 7; /* CUDA_R_32F, CUDA_R_16BF */
  layout* x = calloc(1, sizeof *x);
  x->rows = rows, x->cols = cols, x->ld = ld, x->batch = 1, x->type = type;
  *l = x;
  return 0;
}
int cublasLtMatrixLayoutSetAttribute(void* l, int attr, const void* buf, size_t n) {
  layout* x = l;
  if (attr == 5 && n == 4) x->batch = *(const int*)buf;
  else if (attr == 6 && n == 8) x->stride = *(const long long*)buf;
  else return 7;
  return 0;
}
int cublasLtMatrixLayoutDestroy(void* l) { free(l); return 0; }
static double in(float v, int tf32) {
  if (!tf32) return v;
  uint32_t u;
  memcpy(&u, &v, 4);
  u = (u + 0x1000u) & ~0x1fffu; /* to the nearest 10-bit mantissa */
  memcpy(&v, &u, 4);
  return v;
}
/* Preferences: the workspace and the four buffers' alignments, which the algorithm found keeps. */
typedef struct { unsigned long long ws; unsigned align[4]; } pref;
int cublasLtMatmulPreferenceCreate(void** p) { pref* x = calloc(1, sizeof *x); for (int i = 0; i < 4; i++) x->align[i] = 256; *p = x; return 0; }
int cublasLtMatmulPreferenceSetAttribute(void* p, int attr, const void* buf, size_t n) {
  pref* x = p;
  if (attr == 1 && n == 8) x->ws = *(const unsigned long long*)buf;
  else if (attr >= 5 && attr <= 8 && n == 4) x->align[attr - 5] = *(const unsigned*)buf;
  else return 7;
  return 0;
}
int cublasLtMatmulPreferenceDestroy(void* p) { free(p); return 0; }
typedef struct { unsigned long long algo[8]; size_t ws; int state; float waves; int reserved[4]; } heuristic;
int cublasLtMatmulAlgoGetHeuristic(void* h, void* d, void* a, void* b, void* c, void* dd, void* p, int want, heuristic* out, int* found) {
  pref* x = p;
  if (want < 1) return 7;
  memset(out, 0, sizeof *out);
  out->algo[0] = 0x5151; /* a mark: this algorithm came from here */
  for (int i = 0; i < 4; i++) out->algo[1 + i] = x->align[i];
  *found = 1;
  return 0;
}
static int aligned(const void* ptr, unsigned long long a) { return ((uintptr_t)ptr % a) == 0; }
/* Element e of an operand of layout l: float32, or bf16 widened (exact). */
static double at(const void* p, const layout* l, long long e, int tf32) {
  if (l->type == 0) return in(((const float*)p)[e], tf32);
  uint32_t u = (uint32_t)((const uint16_t*)p)[e] << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
void standin_flush(void); /* the stand-in driver's stream, which a product comes after */
int cublasLtMatmul(void* h, void* dd, const void* alpha, const void* A, void* Ad, const void* B, void* Bd, const void* beta, const void* C, void* Cd, void* D, void* Dd, const void* algo, void* ws, size_t wss, void* stream) {
  standin_flush();
  desc* x = dd;
  layout *a = Ad, *b = Bd, *c = Cd, *d = Dd;
  long long m = d->rows, n = d->cols, k = x->ta ? a->rows : a->cols;
  if ((x->ta ? a->cols : a->rows) != m || (x->tb ? b->rows : b->cols) != n || (x->tb ? b->cols : b->rows) != k) return 7;
  if (c->rows != d->rows || c->cols != d->cols || a->batch != d->batch || b->batch != d->batch || c->batch != d->batch) return 7;
  /* A and B of one type; C and D float32; bf16 inputs only with CUBLAS_COMPUTE_32F. */
  if (a->type != b->type || c->type != 0 || d->type != 0 || (a->type == 14 && x->compute != 68)) return 15;
  const long long ea = a->type == 14 ? 2 : 4, eb = b->type == 14 ? 2 : 4;
  /* An algorithm from the heuristic, for buffers at least as aligned as it was told they are. */
  const unsigned long long* g = algo;
  if (!g || g[0] != 0x5151 || !aligned(A, g[1]) || !aligned(B, g[2]) || !aligned(C, g[3]) || !aligned(D, g[4])) return 7;
  float al = *(const float*)alpha, be = *(const float*)beta;
  int tf32 = x->compute == 77;
  for (int e = 0; e < d->batch; e++) {
    const char* Ae = (const char*)A + e * a->stride * ea;
    const char* Be = (const char*)B + e * b->stride * eb;
    const float* Ce = (const float*)C + e * c->stride;
    float* De = (float*)D + e * d->stride;
    for (long long j = 0; j < n; j++)
      for (long long i = 0; i < m; i++) {
        double s = 0;
        for (long long p = 0; p < k; p++) s += at(Ae, a, x->ta ? p + i * a->ld : i + p * a->ld, tf32) * at(Be, b, x->tb ? j + p * b->ld : p + j * b->ld, tf32);
        De[i + j * d->ld] = (float)(al * s + (be != 0.f ? be * Ce[i + j * c->ld] : 0.0));
      }
  }
  return 0;
}
`;

/** The three libraries compiled into a fresh directory (for PREFOPT_CUDA_LIBS), or null without a C compiler. */
export function buildCudaStandIns(): string | null {
  if (spawnSync('cc', ['--version']).status !== 0) return null;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-standin-'));
  for (const [name, src] of [['libcuda.so.1', DRIVER], ['libnvrtc.so.13', NVRTC], ['libcublasLt.so.13', CUBLASLT]]) {
    const c = path.join(dir, `${name}.c`);
    fs.writeFileSync(c, src);
    // cuBLASLt's stand-in runs on the driver's stream: linked to that very file.
    const link = name.startsWith('libcublasLt') ? [path.join(dir, 'libcuda.so.1')] : [];
    const r = spawnSync('cc', ['-O2', '-shared', '-fPIC', '-o', path.join(dir, name), c, ...link], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`${name}: ${r.stderr}`);
  }
  return dir;
}
