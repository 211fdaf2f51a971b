#include "cuda_device.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include "cuda_probe.h"
#include "kernels.h"

namespace prefopt {
namespace cuda {

// ---- the caching allocator ---------------------------------------------------------------------
// Small blocks in 512-byte steps, large ones in 2 MiB steps: few distinct sizes, so freed blocks
// are found again; at most 2 MiB of rounding per large block.
size_t Memory::round(size_t n) {
  const size_t small = 512, large = 2u << 20;
  if (n <= (1u << 20)) return std::max(small, (n + small - 1) / small * small);
  return (n + large - 1) / large * large;
}

uint64_t Memory::alloc(size_t bytes) {
  const size_t n = round(bytes);
  auto& list = free_[n];
  uint64_t p = 0;
  if (!list.empty()) {
    p = list.back();
    list.pop_back();
    cached_ -= n;
  } else if (!d_->raw_alloc(n, &p)) {
    trim();  // the cache holds other sizes: give them back and try once more
    if (!d_->raw_alloc(n, &p)) return 0;
  }
  size_[p] = n;
  live_ += n;
  peak_ = std::max(peak_, live_);
  return p;
}

bool Memory::free(uint64_t p) {
  auto it = size_.find(p);
  if (it == size_.end()) return false;
  free_[it->second].push_back(p);
  live_ -= it->second;
  cached_ += it->second;
  size_.erase(it);
  return true;
}

void Memory::trim() {
  for (auto& [n, list] : free_)
    for (uint64_t p : list) d_->raw_free(p);
  free_.clear();
  cached_ = 0;
}

namespace {

// ---- the emulated device -----------------------------------------------------------------------
class Emulated : public Device {
 public:
  explicit Emulated(bool dry) : dry_(dry) {}
  std::string name() const override { return dry_ ? "host emulation, kernels not run" : "host emulation"; }
  unsigned max_grid() const override { return 1; }  // one block's threads stride over everything
  bool raw_alloc(size_t n, uint64_t* out) override {
    void* p = std::aligned_alloc(256, (n + 255) / 256 * 256);
    *out = reinterpret_cast<uint64_t>(p);
    return p != nullptr;
  }
  void raw_free(uint64_t p) override { std::free(reinterpret_cast<void*>(p)); }
  bool upload(uint64_t dst, const void* src, size_t n) override { return std::memcpy(ptr(dst), src, n), true; }
  bool download(void* dst, uint64_t src, size_t n) override { return std::memcpy(dst, ptr(src), n), true; }
  bool copy(uint64_t dst, uint64_t src, size_t n) override { return std::memmove(ptr(dst), ptr(src), n), true; }
  bool launch(const KernelInfo& k, unsigned grid, unsigned block, void** args) override {
    if (!dry_) k.emulate(grid, block, args);
    return true;
  }
  // The addon's own product (exact float32, as cuBLASLt's CUBLAS_COMPUTE_32F), then alpha and beta.
  bool gemm(const Gemm& g) override {
    if (dry_) return true;
    std::vector<float> t((size_t)(g.batch * g.m * g.n)), wa, wb;
    const float* a = operand(g.a, g.adt, g.sa, g.batch, g.m * g.k, wa);
    const float* b = operand(g.b, g.bdt, g.sb, g.batch, g.k * g.n, wb);
    matmul(g.ta, g.tb, g.batch, g.m, g.n, g.k, a, g.sa, b, g.sb, t.data(), false);
    for (int64_t e = 0; e < g.batch; e++) {
      float* c = f(g.c) + e * g.sc;
      const float* s = t.data() + e * g.m * g.n;
      for (int64_t i = 0; i < g.m * g.n; i++) c[i] = g.beta == 0.f ? g.alpha * s[i] : g.alpha * s[i] + g.beta * c[i];
    }
    return true;
  }
  bool sync() override { return true; }
  void memory(size_t* free_bytes, size_t* total_bytes) override { *free_bytes = *total_bytes = 0; }

 private:
  bool dry_;
  static void* ptr(uint64_t p) { return reinterpret_cast<void*>(p); }
  static float* f(uint64_t p) { return reinterpret_cast<float*>(p); }
  // A product's operand as float32: itself, or its bf16 values widened (exact) into `keep`.
  static const float* operand(uint64_t p, int dt, int64_t stride, int64_t batch, int64_t size, std::vector<float>& keep) {
    if (dt == 0) return f(p);
    const int64_t n = stride ? (batch - 1) * stride + size : size;
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    keep.resize((size_t)n);
    for (int64_t i = 0; i < n; i++) {
      uint32_t u = (uint32_t)h[i] << 16;
      std::memcpy(&keep[(size_t)i], &u, 4);
    }
    return keep.data();
  }
};

// ---- the GPU -----------------------------------------------------------------------------------
// The few driver, NVRTC and cuBLASLt entry points used, declared here with the C types they have
// in cuda.h, nvrtc.h and cublasLt.h (the constants are those headers' values).
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using Handle = void*;
constexpr int kAttrSMs = 16, kAttrMajor = 75, kAttrMinor = 76;             // CU_DEVICE_ATTRIBUTE_*
constexpr int kDescTransA = 3, kDescTransB = 4;                           // CUBLASLT_MATMUL_DESC_*
constexpr int kLayoutBatch = 5, kLayoutStride = 6;                        // CUBLASLT_MATRIX_LAYOUT_*
constexpr int kR32F = 0, kR16BF = 14, kCompute32F = 68, kCompute32FFastTF32 = 77;  // CUDA_R_*, CUBLAS_COMPUTE_*
constexpr int kPrefWorkspace = 1, kPrefAlignA = 5;                         // CUBLASLT_MATMUL_PREF_* (A, B, C, D: 5–8)
constexpr size_t kWorkspace = 32u << 20;

// cublasLtMatmulHeuristicResult_t: the algorithm (64 bytes), its workspace, its state.
struct Heuristic {
  uint64_t algo[8];
  size_t workspace;
  int state;
  float waves;
  int reserved[4];
};

struct Driver {
  CUresult (*init)(unsigned);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*attribute)(int*, int, CUdevice);
  CUresult (*name)(char*, int, CUdevice);
  CUresult (*primary_ctx)(Handle*, CUdevice);
  CUresult (*set_ctx)(Handle);
  CUresult (*mem_alloc)(CUdeviceptr*, size_t);
  CUresult (*mem_free)(CUdeviceptr);
  CUresult (*htod)(CUdeviceptr, const void*, size_t);
  CUresult (*dtoh)(void*, CUdeviceptr, size_t);
  CUresult (*dtod)(CUdeviceptr, CUdeviceptr, size_t);
  CUresult (*mem_info)(size_t*, size_t*);
  CUresult (*module_load)(Handle*, const void*);
  CUresult (*get_function)(Handle*, Handle, const char*);
  CUresult (*launch)(Handle, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, Handle, void**, void**);
  CUresult (*synchronize)();
  CUresult (*error_string)(CUresult, const char**);
  CUresult (*host_alloc)(void**, size_t);
  CUresult (*htod_async)(CUdeviceptr, const void*, size_t, Handle);
  CUresult (*event_create)(Handle*, unsigned);
  CUresult (*event_record)(Handle, Handle);
  CUresult (*event_sync)(Handle);
};

struct Nvrtc {
  int (*create)(Handle*, const char*, const char*, int, const char* const*, const char* const*);
  int (*compile)(Handle, int, const char* const*);
  int (*log_size)(Handle, size_t*);
  int (*log)(Handle, char*);
  int (*cubin_size)(Handle, size_t*);
  int (*cubin)(Handle, char*);
  int (*destroy)(Handle*);
  const char* (*error_string)(int);
  int (*version)(int*, int*);
};

struct Lt {
  int (*create)(Handle*);
  int (*desc_create)(Handle*, int, int);
  int (*desc_set)(Handle, int, const void*, size_t);
  int (*desc_destroy)(Handle);
  int (*layout_create)(Handle*, int, uint64_t, uint64_t, int64_t);
  int (*layout_set)(Handle, int, const void*, size_t);
  int (*layout_destroy)(Handle);
  int (*matmul)(Handle, Handle, const void*, const void*, Handle, const void*, Handle, const void*, const void*, Handle, void*, Handle, const void*, void*, size_t, Handle);
  int (*pref_create)(Handle*);
  int (*pref_set)(Handle, int, const void*, size_t);
  int (*pref_destroy)(Handle);
  int (*heuristic)(Handle, Handle, Handle, Handle, Handle, Handle, Handle, int, Heuristic*, int*);
};

// The largest power of two (up to 256) dividing an address: what cuBLASLt may assume of it. A
// bf16 operand may start 2 bytes into a word (a row of an odd-width matrix).
uint32_t alignment(uint64_t p) {
  uint32_t a = 256;
  while (a > 1 && p % a) a >>= 1;
  return a;
}

bool emulated_launch(const char* name, unsigned grid, unsigned block, void** args) {
  const KernelInfo* k = find_kernel(name);
  if (k) k->emulate(grid, block, args);
  return k != nullptr;
}

class Gpu : public Device {
 public:
  bool open(const std::vector<std::string>& driver, const std::vector<std::string>& cublas_lt, const std::vector<std::string>& nvrtc, const std::string& source, bool tf32,
            const std::string& cache_dir, std::string* why) {
    tf32_ = tf32;
    cache_dir_ = cache_dir;
    // Each library found by the probe's own rules (native/cuda_probe.cc), every entry point
    // resolved; the first problem, in the order driver, NVRTC, cuBLASLt, is the reason.
    LibProbe dp, lp, np;
    const auto missing = [&](const LibProbe& p, const char* what) { return *why = p.error == "not found" ? std::string(what) + " not found" : p.error, false; };
    void* dl = open_first(driver, dp);
    if (!dl) return missing(dp, "libcuda.so.1");
    void* ll = open_first(cublas_lt, lp);
    if (!ll) return missing(lp, "libcublasLt");
    void* nl = open_first(nvrtc, np);
    if (!nl) return missing(np, "libnvrtc");
    const auto d = [&](auto& f, const char* name) { resolve(dl, name, f, dp); };
    const auto l = [&](auto& f, const char* name) { resolve(ll, name, f, lp); };
    const auto n = [&](auto& f, const char* name) { resolve(nl, name, f, np); };
    d(cu_.init, "cuInit"), d(cu_.device_get, "cuDeviceGet"), d(cu_.attribute, "cuDeviceGetAttribute"), d(cu_.name, "cuDeviceGetName");
    d(cu_.primary_ctx, "cuDevicePrimaryCtxRetain"), d(cu_.set_ctx, "cuCtxSetCurrent"), d(cu_.mem_alloc, "cuMemAlloc_v2"), d(cu_.mem_free, "cuMemFree_v2");
    d(cu_.htod, "cuMemcpyHtoD_v2"), d(cu_.dtoh, "cuMemcpyDtoH_v2"), d(cu_.dtod, "cuMemcpyDtoD_v2"), d(cu_.mem_info, "cuMemGetInfo_v2");
    d(cu_.module_load, "cuModuleLoadData"), d(cu_.get_function, "cuModuleGetFunction"), d(cu_.launch, "cuLaunchKernel"), d(cu_.synchronize, "cuCtxSynchronize");
    d(cu_.error_string, "cuGetErrorString"), d(cu_.host_alloc, "cuMemAllocHost_v2"), d(cu_.htod_async, "cuMemcpyHtoDAsync_v2");
    d(cu_.event_create, "cuEventCreate"), d(cu_.event_record, "cuEventRecord"), d(cu_.event_sync, "cuEventSynchronize");
    n(rtc_.create, "nvrtcCreateProgram"), n(rtc_.compile, "nvrtcCompileProgram"), n(rtc_.log_size, "nvrtcGetProgramLogSize"), n(rtc_.log, "nvrtcGetProgramLog");
    n(rtc_.cubin_size, "nvrtcGetCUBINSize"), n(rtc_.cubin, "nvrtcGetCUBIN"), n(rtc_.destroy, "nvrtcDestroyProgram"), n(rtc_.error_string, "nvrtcGetErrorString");
    n(rtc_.version, "nvrtcVersion");
    l(lt_.create, "cublasLtCreate"), l(lt_.desc_create, "cublasLtMatmulDescCreate"), l(lt_.desc_set, "cublasLtMatmulDescSetAttribute"), l(lt_.desc_destroy, "cublasLtMatmulDescDestroy");
    l(lt_.layout_create, "cublasLtMatrixLayoutCreate"), l(lt_.layout_set, "cublasLtMatrixLayoutSetAttribute"), l(lt_.layout_destroy, "cublasLtMatrixLayoutDestroy"), l(lt_.matmul, "cublasLtMatmul");
    l(lt_.pref_create, "cublasLtMatmulPreferenceCreate"), l(lt_.pref_set, "cublasLtMatmulPreferenceSetAttribute"), l(lt_.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    l(lt_.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    for (const LibProbe* p : {&dp, &np, &lp})
      if (!p->error.empty()) return *why = p->error, false;
    // The stand-in driver of test/cuda-standin.test.ts (host memory, no GPU) runs launches through
    // the emulated kernels: it asks for them here. A real driver has no such symbol.
    using launcher = bool (*)(const char*, unsigned, unsigned, void**);
    if (auto hook = reinterpret_cast<void (*)(launcher)>(dlsym(dl, "prefopt_standin_launcher"))) hook(&emulated_launch);
    CUdevice dev = 0;
    Handle ctx = nullptr;
    char name[256] = {0};
    int major = 0, minor = 0;
    if (!ok(cu_.init(0), "cuInit") || !ok(cu_.device_get(&dev, 0), "cuDeviceGet") || !ok(cu_.primary_ctx(&ctx, dev), "cuDevicePrimaryCtxRetain") || !ok(cu_.set_ctx(ctx), "cuCtxSetCurrent") ||
        !ok(cu_.name(name, sizeof name - 1, dev), "cuDeviceGetName") || !ok(cu_.attribute(&major, kAttrMajor, dev), "cuDeviceGetAttribute") ||
        !ok(cu_.attribute(&minor, kAttrMinor, dev), "cuDeviceGetAttribute") || !ok(cu_.attribute(&sms_, kAttrSMs, dev), "cuDeviceGetAttribute")) {
      *why = error;
      return false;
    }
    name_ = std::string(name) + " (sm_" + std::to_string(major * 10 + minor) + ")";
    if (!compile(source, major * 10 + minor, why)) return false;
    if (lt_.create(&lt_handle_) != 0) return *why = "cublasLtCreate failed", false;
    if (!ok(cu_.mem_alloc(&workspace_, kWorkspace), "cuMemAlloc (cuBLASLt workspace)")) return *why = error, false;
    if (!ok(cu_.host_alloc(reinterpret_cast<void**>(&stage_), kStageSegments * kStagedUpload), "cuMemAllocHost (upload staging)")) return *why = error, false;
    for (Handle& e : stage_done_)
      if (!ok(cu_.event_create(&e, kEventDisableTiming), "cuEventCreate")) return *why = error, false;
    return true;
  }

  std::string name() const override { return name_; }
  unsigned max_grid() const override { return (unsigned)sms_ * 16; }
  bool raw_alloc(size_t n, uint64_t* out) override {
    CUdeviceptr p = 0;
    if (cu_.mem_alloc(&p, n) != 0) return false;
    *out = p;
    return true;
  }
  void raw_free(uint64_t p) override { cu_.mem_free(p); }
  // A copy from pageable memory first waits for all the device's work (CUDA's API synchronization
  // rules): small uploads go through pinned staging instead and queue behind that work. The
  // staging is a ring of segments; the event recorded as one is left says when its copies are
  // done, and it is refilled only after. An upload larger than a segment goes a segment at a time.
  bool upload(uint64_t dst, const void* src, size_t n) override {
    if (n > kStagedUploadMax) return ok(cu_.htod(dst, src, n), "cuMemcpyHtoD");
    for (size_t at = 0; at < n; at += kStagedUpload)
      if (!staged(dst + at, static_cast<const char*>(src) + at, std::min(kStagedUpload, n - at))) return false;
    return true;
  }
  bool download(void* dst, uint64_t src, size_t n) override { return ok(cu_.dtoh(dst, src, n), "cuMemcpyDtoH"); }
  bool copy(uint64_t dst, uint64_t src, size_t n) override { return ok(cu_.dtod(dst, src, n), "cuMemcpyDtoD"); }
  bool launch(const KernelInfo& k, unsigned grid, unsigned block, void** args) override {
    Handle f = function(k.name);
    return f && ok(cu_.launch(f, grid, 1, 1, block, 1, 1, 0, nullptr, args, nullptr), k.name);
  }
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLASLt's A is our B and its B
  // our A, each seen column-major (a row-major [r, c] matrix is a column-major [c, r] one).
  bool gemm(const Gemm& g) override {
    Handle desc = nullptr, la = nullptr, lb = nullptr, lc = nullptr;
    const int opa = g.tb ? 1 : 0, opb = g.ta ? 1 : 0;
    // bf16 operands accumulate in float32 (CUBLAS_COMPUTE_32F); TF32 applies to float32 ones.
    const int compute = g.adt || g.bdt ? kCompute32F : tf32_ ? kCompute32FFastTF32 : kCompute32F;
    bool good = g.adt == g.bdt && lt_.desc_create(&desc, compute, kR32F) == 0 && lt_.desc_set(desc, kDescTransA, &opa, sizeof opa) == 0 &&
                lt_.desc_set(desc, kDescTransB, &opb, sizeof opb) == 0 && layout(&la, g.bdt, g.tb ? g.k : g.n, g.tb ? g.n : g.k, g.batch, g.sb) &&
                layout(&lb, g.adt, g.ta ? g.m : g.k, g.ta ? g.k : g.m, g.batch, g.sa) && layout(&lc, 0, g.n, g.m, g.batch, g.sc);
    const Heuristic* h = good ? algorithm(g, desc, la, lb, lc) : nullptr;
    good = h != nullptr;
    if (good)
      good = lt_.matmul(lt_handle_, desc, &g.alpha, reinterpret_cast<void*>(g.b), la, reinterpret_cast<void*>(g.a), lb, &g.beta, reinterpret_cast<void*>(g.c), lc, reinterpret_cast<void*>(g.c), lc,
                        h->algo, reinterpret_cast<void*>(workspace_), kWorkspace, nullptr) == 0;
    if (!good) error = "cublasLtMatmul failed (" + std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k) + ", batch " + std::to_string(g.batch) + ")";
    for (Handle h : {la, lb, lc})
      if (h) lt_.layout_destroy(h);
    if (desc) lt_.desc_destroy(desc);
    return good;
  }
  bool sync() override { return ok(cu_.synchronize(), "a kernel or copy"); }
  void memory(size_t* free_bytes, size_t* total_bytes) override {
    if (cu_.mem_info(free_bytes, total_bytes) != 0) *free_bytes = *total_bytes = 0;
  }

 private:
  // One staging segment's piece of an upload (see upload).
  bool staged(uint64_t dst, const void* src, size_t n) {
    if (stage_at_ + n > kStagedUpload) {
      if (!ok(cu_.event_record(stage_done_[stage_seg_], nullptr), "cuEventRecord")) return false;
      stage_pending_[stage_seg_] = true;
      stage_seg_ = (stage_seg_ + 1) % kStageSegments;
      stage_at_ = 0;
      if (stage_pending_[stage_seg_] && !ok(cu_.event_sync(stage_done_[stage_seg_]), "cuEventSynchronize")) return false;
      stage_pending_[stage_seg_] = false;
    }
    char* at = stage_ + stage_seg_ * kStagedUpload + stage_at_;
    std::memcpy(at, src, n);
    stage_at_ = (stage_at_ + n + 15) / 16 * 16;
    return ok(cu_.htod_async(dst, at, n, nullptr), "cuMemcpyHtoDAsync");
  }
  // cuBLASLt's best algorithm for this product's shapes and its operands' actual alignments
  // (its default preference assumes 256-byte aligned buffers, which a batch entry or a view
  // need not be), found once per distinct product.
  const Heuristic* algorithm(const Gemm& g, Handle desc, Handle la, Handle lb, Handle lc) {
    const uint32_t al[4] = {alignment(g.b), alignment(g.a), alignment(g.c), alignment(g.c)};
    char key[256];
    snprintf(key, sizeof key, "%d%d%d%d %lld %lld %lld %lld %lld %lld %lld %u %u %u", g.ta, g.tb, g.adt, g.bdt, (long long)g.batch, (long long)g.m, (long long)g.n, (long long)g.k, (long long)g.sa, (long long)g.sb,
             (long long)g.sc, al[0], al[1], al[2]);
    auto it = algos_.find(key);
    if (it != algos_.end()) return &it->second;
    Handle pref = nullptr;
    Heuristic h{};
    int found = 0;
    const uint64_t ws = kWorkspace;
    bool good = lt_.pref_create(&pref) == 0 && lt_.pref_set(pref, kPrefWorkspace, &ws, sizeof ws) == 0;
    for (int i = 0; i < 4 && good; i++) good = lt_.pref_set(pref, kPrefAlignA + i, &al[i], sizeof al[i]) == 0;
    if (good) good = lt_.heuristic(lt_handle_, desc, la, lb, lc, lc, pref, 1, &h, &found) == 0 && found > 0;
    if (pref) lt_.pref_destroy(pref);
    if (!good) return nullptr;
    return &(algos_[key] = h);
  }
  // A column-major layout of rows × cols (leading dimension rows) of float32 or bf16 (dt 1), batched.
  bool layout(Handle* l, int dt, int64_t rows, int64_t cols, int64_t batch, int64_t stride) {
    if (lt_.layout_create(l, dt ? kR16BF : kR32F, (uint64_t)rows, (uint64_t)cols, rows) != 0) return false;
    if (batch == 1) return true;
    int32_t b = (int32_t)batch;
    return lt_.layout_set(*l, kLayoutBatch, &b, sizeof b) == 0 && lt_.layout_set(*l, kLayoutStride, &stride, sizeof stride) == 0;
  }
  bool ok(CUresult r, const char* what) {
    if (r == 0) return true;
    const char* s = nullptr;
    error = std::string(what) + " failed: " + (cu_.error_string && cu_.error_string(r, &s) == 0 && s ? s : "CUDA error " + std::to_string(r));
    return false;
  }
  // kernels.cu through NVRTC, for this GPU's architecture, loaded as a module. The CUBIN is kept
  // in cache_dir under a hash of everything it depends on (source, options, NVRTC's version), so
  // later processes load it instead of compiling; a cached file that does not load is rebuilt.
  bool compile(const std::string& source, int arch, std::string* why) {
    const std::string gpu = "--gpu-architecture=sm_" + std::to_string(arch);
    const char* opts[] = {gpu.c_str(), "--fmad=false", "--std=c++17"};
    int major = 0, minor = 0;
    rtc_.version(&major, &minor);
    const std::string cached = cache_dir_.empty() ? "" : cache_dir_ + "/kernels-" + hash_hex(source + "\n" + gpu + " --fmad=false --std=c++17 nvrtc " + std::to_string(major) + "." + std::to_string(minor)) + ".cubin";
    std::string cubin;
    if (!cached.empty() && read_file(cached, &cubin) && cu_.module_load(&module_, cubin.data()) == 0) return true;
    Handle prog = nullptr;
    if (rtc_.create(&prog, source.c_str(), "kernels.cu", 0, nullptr, nullptr) != 0) return *why = "nvrtcCreateProgram failed", false;
    int r = rtc_.compile(prog, 3, opts);
    if (r != 0) {
      size_t n = 0;
      rtc_.log_size(prog, &n);
      std::string log(n, '\0');
      if (n) rtc_.log(prog, log.data());
      *why = std::string("NVRTC could not compile native/cuda/kernels.cu for sm_") + std::to_string(arch) + ": " + rtc_.error_string(r) + "\n" + log;
      rtc_.destroy(&prog);
      return false;
    }
    size_t n = 0;
    rtc_.cubin_size(prog, &n);
    cubin.assign(n, '\0');
    rtc_.cubin(prog, cubin.data());
    rtc_.destroy(&prog);
    if (!ok(cu_.module_load(&module_, cubin.data()), "cuModuleLoadData")) return *why = error, false;
    if (!cached.empty()) write_file_atomic(cached, cubin);  // a cache: failing to write it is no error
    return true;
  }
  static std::string hash_hex(const std::string& s) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    char out[17];
    snprintf(out, sizeof out, "%016llx", (unsigned long long)h);
    return out;
  }
  static bool read_file(const std::string& path, std::string* out) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return false;
    char buf[1 << 16];
    size_t n;
    out->clear();
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
    fclose(f);
    return !out->empty();
  }
  static void write_file_atomic(const std::string& path, const std::string& data) {
    const std::string tmp = path + ".tmp" + std::to_string((long)getpid());
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) return;
    bool good = fwrite(data.data(), 1, data.size(), f) == data.size();
    good = fclose(f) == 0 && good;
    if (!good || rename(tmp.c_str(), path.c_str()) != 0) remove(tmp.c_str());
  }
  Handle function(const char* name) {
    auto it = functions_.find(name);
    if (it != functions_.end()) return it->second;
    Handle f = nullptr;
    if (!ok(cu_.get_function(&f, module_, name), name)) return nullptr;
    return functions_[name] = f;
  }
  Driver cu_{};
  Nvrtc rtc_{};
  Lt lt_{};
  Handle lt_handle_ = nullptr, module_ = nullptr;
  CUdeviceptr workspace_ = 0;
  static constexpr int kStageSegments = 16;
  static constexpr unsigned kEventDisableTiming = 2;  // CU_EVENT_DISABLE_TIMING
  char* stage_ = nullptr;
  Handle stage_done_[kStageSegments] = {};
  bool stage_pending_[kStageSegments] = {};
  int stage_seg_ = 0;
  size_t stage_at_ = 0;
  int sms_ = 1;
  bool tf32_ = true;
  std::string name_, cache_dir_;
  std::unordered_map<std::string, Handle> functions_;
  std::unordered_map<std::string, Heuristic> algos_;
};

}  // namespace

std::unique_ptr<Device> open_emulated(bool dry) { return std::make_unique<Emulated>(dry); }

std::unique_ptr<Device> open_gpu(const std::vector<std::string>& driver, const std::vector<std::string>& cublas_lt, const std::vector<std::string>& nvrtc, const std::string& source,
                                 bool tf32, const std::string& cache_dir, std::string* why) {
  auto g = std::make_unique<Gpu>();
  if (!g->open(driver, cublas_lt, nvrtc, source, tf32, cache_dir, why)) return nullptr;
  return g;
}

}  // namespace cuda
}  // namespace prefopt
