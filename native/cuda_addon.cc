// N-API glue of the `cuda` backend's device (native/cuda_device.h): one device per process,
// opened by cudaOpen, addresses as JS numbers (below 2^53 on every platform CUDA runs on).
#include <node_api.h>

#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "cuda_device.h"
#include "napi_args.h"

namespace prefopt {
namespace {

using cuda::Device;
using cuda::KernelInfo;

std::unique_ptr<Device> g_device;
std::unique_ptr<cuda::Memory> g_memory;

// The profile (cudaProfile): per operation, how many and how long. Each operation is timed alone,
// the device synchronized before and after it, so the time includes its launch latency and none
// of the overlap a normal run has: a diagnosis of where a step's time goes, not its speed.
struct Timing {
  double count = 0, seconds = 0, work = 0;  // work: flops of a product, bytes of a copy
};
bool g_profiling = false;
// Times the host waited for the device's queued work to finish (cudaStats' `waits`): downloads,
// syncs and uploads too large to stage. Each one drains the queue, so the device idles while the
// host issues what comes next.
double g_waits = 0;
std::map<std::string, Timing> g_profile;

// Run the device operation f (which returns false on failure), timed under `key` when profiling.
template <class F>
bool timed(const std::string& key, double work, F&& f) {
  if (!g_profiling) return f();
  if (!g_device->sync()) return false;
  const auto t0 = std::chrono::steady_clock::now();
  if (!f() || !g_device->sync()) return false;
  Timing& t = g_profile[key];
  t.count++;
  t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t.work += work;
  return true;
}

napi_value throw_error(napi_env env, const std::string& msg) {
  napi_throw_error(env, nullptr, msg.c_str());
  return nullptr;
}

bool need_device(napi_env env) {
  if (g_device) return true;
  throw_error(env, "the CUDA device is not open (cudaOpen)");
  return false;
}

napi_value number(napi_env env, double x) {
  napi_value v;
  napi_create_double(env, x, &v);
  return v;
}

// cudaOpen(mode 'emulate' | 'dry' | 'gpu', driver[], cublasLt[], nvrtc[], source, tf32, cacheDir) → the
// device's name; throws with the reason it cannot open.
napi_value Open(napi_env env, napi_callback_info info) {
  Args a(env, info, 1, "cudaOpen");
  const std::string mode = a.str(0);
  if (!a.ok()) return nullptr;
  if (!g_device) {
    std::string why;
    if (mode == "emulate" || mode == "dry") g_device = cuda::open_emulated(mode == "dry");
    else {
      const auto driver = a.strs(1, "driver"), lt = a.strs(2, "cublasLt"), rtc = a.strs(3, "nvrtc");
      const std::string source = a.str(4), cache = a.str(6);
      const bool tf32 = a.flag(5);
      if (!a.ok()) return nullptr;
      g_device = cuda::open_gpu(driver, lt, rtc, source, tf32, cache, &why);
    }
    if (!g_device) return throw_error(env, why);
    g_memory = std::make_unique<cuda::Memory>(g_device.get());
  }
  napi_value o, v;
  napi_create_object(env, &o);
  napi_create_string_utf8(env, g_device->name().c_str(), NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, o, "name", v);
  napi_set_named_property(env, o, "maxGrid", number(env, g_device->max_grid()));
  return o;
}

// cudaAlloc(bytes) → address; throws when the device has no room.
napi_value Alloc(napi_env env, napi_callback_info info) {
  Args a(env, info, 1, "cudaAlloc");
  const uint64_t n = a.address(0);
  if (!a.ok() || !need_device(env)) return nullptr;
  uint64_t p = g_memory->alloc((size_t)std::max<uint64_t>(1, n));
  if (!p) {
    size_t fr = 0, total = 0;
    g_device->memory(&fr, &total);
    return throw_error(env, "CUDA out of memory: " + std::to_string((size_t)n >> 20) + " MiB asked, " + std::to_string(g_memory->live() >> 20) + " MiB in use by prefopt, " +
                                std::to_string(fr >> 20) + " of " + std::to_string(total >> 20) + " MiB free on the device");
  }
  return number(env, (double)p);
}

napi_value Free(napi_env env, napi_callback_info info) {
  Args a(env, info, 1, "cudaFree");
  const uint64_t p = a.address(0);
  if (!a.ok() || !need_device(env)) return nullptr;
  napi_value v;
  napi_get_boolean(env, g_memory->free(p), &v);
  return v;
}

// cudaUpload(address, typedArray) / cudaDownload(address, typedArray): the array's bytes, up
// (callback data non-null) or down.
napi_value Transfer(napi_env env, napi_callback_info info) {
  void* up = nullptr;
  napi_get_cb_info(env, info, nullptr, nullptr, nullptr, &up);
  Args a(env, info, 2, up ? "cudaUpload" : "cudaDownload");
  const uint64_t addr = a.address(0);
  size_t n = 0;
  void* data = a.bytes(1, &n, "argument 1");
  if (!a.ok() || !need_device(env)) return nullptr;
  if (!up || n > cuda::kStagedUploadMax) g_waits++;
  if (!timed(up ? "upload" : "download", (double)n, [&] { return up ? g_device->upload(addr, data, n) : g_device->download(data, addr, n); })) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaCopy(dst, src, bytes)
napi_value Copy(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "cudaCopy");
  const uint64_t dst = a.address(0), src = a.address(1), n = a.address(2);
  if (!a.ok() || !need_device(env)) return nullptr;
  if (!timed("copy", (double)n, [&] { return g_device->copy(dst, src, n); })) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaLaunch(kernel, grid, block, args[]): each argument converted to the kernel's parameter
// type (kernels() knows them); a count or a value that does not fit throws before any launch.
napi_value Launch(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "cudaLaunch");
  const std::string name = a.str(0);
  const double grid = a.real(1), block = a.real(2);
  const uint32_t argc = a.length(3, "the kernel's arguments");
  if (!a.ok() || !need_device(env)) return nullptr;
  const KernelInfo* k = cuda::find_kernel(name);
  if (!k) return throw_error(env, "cudaLaunch: no kernel " + name + " in native/cuda/kernels.cu");
  if (!(grid >= 1 && grid < 2147483648.0 && block >= 1 && block <= 1024)) return throw_error(env, "cudaLaunch " + name + ": grid or block out of range");
  if (argc != k->sig.size()) return throw_error(env, "cudaLaunch " + name + ": " + std::to_string(argc) + " arguments given, the kernel takes " + std::to_string(k->sig.size()));
  std::vector<cuda::DimsArg> dims(k->sig.size());
  std::vector<int64_t> words(k->sig.size());
  std::vector<void*> args(k->sig.size());
  for (uint32_t i = 0; i < argc; i++) {
    napi_value e;
    napi_get_element(env, a.arg(3), i, &e);
    const char t = k->sig[i];
    if (t == 'D') {
      uint32_t n = 0;
      if (napi_get_array_length(env, e, &n) != napi_ok || n > 18) return throw_error(env, "cudaLaunch " + name + ": argument " + std::to_string(i) + " must be an array of at most 18 integers");
      dims[i] = cuda::DimsArg{};
      for (uint32_t j = 0; j < n; j++) {
        napi_value x;
        napi_get_element(env, e, j, &x);
        napi_get_value_int64(env, x, &dims[i].v[j]);
      }
      args[i] = &dims[i];
      continue;
    }
    double x = NAN;
    if (napi_get_value_double(env, e, &x) != napi_ok || std::isnan(x)) return throw_error(env, "cudaLaunch " + name + ": argument " + std::to_string(i) + " is not a number");
    void* slot = &words[i];
    if (t == 'f') *static_cast<float*>(slot) = (float)x;
    else if (t == 'd') *static_cast<double*>(slot) = x;
    else if (t == 'i') *static_cast<int32_t*>(slot) = (int32_t)x;
    else if (t == 'u') *static_cast<uint32_t*>(slot) = (uint32_t)x;
    else if (t == 'p') *static_cast<uint64_t*>(slot) = (uint64_t)x;
    else *static_cast<int64_t*>(slot) = (int64_t)x;
    if ((t == 'p' || t == 'l' || t == 'i' || t == 'u') && x != std::floor(x)) return throw_error(env, "cudaLaunch " + name + ": argument " + std::to_string(i) + " is not an integer");
    args[i] = slot;
  }
  if (!timed(name, 0, [&] { return g_device->launch(*k, (unsigned)grid, (unsigned)block, args.data()); })) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaGemm([ta, tb, batch, m, n, k, a, sa, b, sb, c, sc, alpha, beta, adt, bdt]) — one array
// (one N-API value to read per product); adt, bdt: 0 float32, 1 bf16.
napi_value GemmCall(napi_env env, napi_callback_info info) {
  Args a(env, info, 1, "cudaGemm");
  if (a.length(0, "the product's numbers") != 16 && a.ok()) return throw_error(env, "cudaGemm: 16 numbers expected");
  if (!a.ok() || !need_device(env)) return nullptr;
  double v[16];
  for (uint32_t i = 0; i < 16; i++) {
    napi_value e;
    napi_get_element(env, a.arg(0), i, &e);
    v[i] = NAN;
    napi_get_value_double(env, e, &v[i]);
  }
  cuda::Gemm g{v[0] != 0, v[1] != 0, (int64_t)v[2], (int64_t)v[3], (int64_t)v[4], (int64_t)v[5], (uint64_t)v[6], (uint64_t)v[8], (uint64_t)v[10], (int64_t)v[7], (int64_t)v[9], (int64_t)v[11],
               (float)v[12], (float)v[13], v[14] == 1 ? 1 : 0, v[15] == 1 ? 1 : 0};
  const auto key = [&] {
    return std::string("gemm ") + (g.adt ? "bf16 " : "f32 ") + (g.ta ? "T" : "N") + (g.tb ? "T" : "N") + " " + std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k) +
           (g.batch > 1 ? " *" + std::to_string(g.batch) : "");
  };
  if (!timed(g_profiling ? key() : std::string(), 2.0 * (double)g.batch * (double)g.m * (double)g.n * (double)g.k, [&] { return g_device->gemm(g); })) return throw_error(env, g_device->error);
  return nullptr;
}

napi_value Sync(napi_env env, napi_callback_info) {
  if (!need_device(env)) return nullptr;
  g_waits++;
  if (!g_device->sync()) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaStats() → { live, cached, peak, free, total } bytes and the host's waits; cudaStats(true)
// restarts the peak from what is live and the waits from 0.
napi_value Stats(napi_env env, napi_callback_info info) {
  Args a(env, info, 0, "cudaStats");
  if (!need_device(env)) return nullptr;
  if (a.count() > 0 && a.flag(0)) g_memory->reset_peak(), g_waits = 0;
  size_t fr = 0, total = 0;
  g_device->memory(&fr, &total);
  napi_value o;
  napi_create_object(env, &o);
  napi_set_named_property(env, o, "live", number(env, (double)g_memory->live()));
  napi_set_named_property(env, o, "cached", number(env, (double)g_memory->cached()));
  napi_set_named_property(env, o, "peak", number(env, (double)g_memory->peak()));
  napi_set_named_property(env, o, "free", number(env, (double)fr));
  napi_set_named_property(env, o, "total", number(env, (double)total));
  napi_set_named_property(env, o, "waits", number(env, g_waits));
  return o;
}

// cudaProfile(on) → the profile so far as { key: { count, seconds, work } }, then cleared; on
// (true/false) starts or stops timing every device operation (see Timing).
napi_value Profile(napi_env env, napi_callback_info info) {
  Args a(env, info, 1, "cudaProfile");
  const bool on = a.flag(0);
  if (!a.ok()) return nullptr;
  napi_value o;
  napi_create_object(env, &o);
  for (const auto& [key, t] : g_profile) {
    napi_value e;
    napi_create_object(env, &e);
    napi_set_named_property(env, e, "count", number(env, t.count));
    napi_set_named_property(env, e, "seconds", number(env, t.seconds));
    napi_set_named_property(env, e, "work", number(env, t.work));
    napi_set_named_property(env, o, key.c_str(), e);
  }
  g_profile.clear();
  g_profiling = on;
  return o;
}

napi_value Trim(napi_env env, napi_callback_info) {
  if (g_memory) g_memory->trim();
  return nullptr;
}

// cudaKernels() → { name: signature } for every kernel of kernels.cu.
napi_value Kernels(napi_env env, napi_callback_info) {
  napi_value o, v;
  napi_create_object(env, &o);
  for (const auto& k : cuda::kernels()) {
    napi_create_string_utf8(env, k.sig.c_str(), NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, o, k.name, v);
  }
  return o;
}

// cudaAttentionRows(hd, block) → cuda::attention_rows: how the host sizes an attention launch's grid.
napi_value AttentionRows(napi_env env, napi_callback_info info) {
  Args a(env, info, 2, "cudaAttentionRows");
  const double hd = a.real(0), block = a.real(1);
  if (!a.ok()) return nullptr;
  if (!(hd >= 1 && hd < 1e9 && block >= 1 && block <= 1024)) return throw_error(env, "cudaAttentionRows: head_dim or block out of range");
  napi_value v;
  napi_create_int64(env, cuda::attention_rows((int64_t)hd, (unsigned)block), &v);
  return v;
}

// A function property of the exports.
napi_property_descriptor method(const char* name, napi_callback f, void* data = nullptr) { return {name, nullptr, f, nullptr, nullptr, nullptr, napi_default, data}; }

}  // namespace

void define_cuda(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      method("cudaOpen", Open),         method("cudaAlloc", Alloc),       method("cudaFree", Free),
      method("cudaUpload", Transfer, (void*)"up"), method("cudaDownload", Transfer), method("cudaCopy", Copy),
      method("cudaLaunch", Launch),     method("cudaGemm", GemmCall),     method("cudaSync", Sync),
      method("cudaStats", Stats),       method("cudaTrim", Trim),         method("cudaKernels", Kernels),
      method("cudaProfile", Profile),   method("cudaAttentionRows", AttentionRows),
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
}

}  // namespace prefopt
