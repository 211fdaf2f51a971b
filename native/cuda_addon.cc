// N-API glue of the `cuda` backend's device (native/cuda_device.h): one device per process,
// opened by cudaOpen, addresses as JS numbers (below 2^53 on every platform CUDA runs on).
#include <node_api.h>

#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "cuda_device.h"

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

struct Call {
  napi_env env;
  size_t argc = 8;
  napi_value argv[8];
  Call(napi_env e, napi_callback_info info) : env(e) { napi_get_cb_info(e, info, &argc, argv, nullptr, nullptr); }
  double num(size_t i) {
    double x = NAN;
    if (i < argc) napi_get_value_double(env, argv[i], &x);
    return x;
  }
  std::string str(size_t i) {
    size_t n = 0;
    if (i >= argc || napi_get_value_string_utf8(env, argv[i], nullptr, 0, &n) != napi_ok) return "";
    std::string s(n, '\0');
    napi_get_value_string_utf8(env, argv[i], s.data(), n + 1, &n);
    return s;
  }
  std::vector<std::string> strs(size_t i) {
    std::vector<std::string> out;
    uint32_t n = 0;
    if (i >= argc || napi_get_array_length(env, argv[i], &n) != napi_ok) return out;
    for (uint32_t k = 0; k < n; k++) {
      napi_value e;
      napi_get_element(env, argv[i], k, &e);
      size_t len = 0;
      napi_get_value_string_utf8(env, e, nullptr, 0, &len);
      std::string s(len, '\0');
      napi_get_value_string_utf8(env, e, s.data(), len + 1, &len);
      out.push_back(s);
    }
    return out;
  }
  // A typed array's bytes.
  bool bytes(size_t i, void** data, size_t* n) {
    napi_typedarray_type t;
    size_t len;
    napi_value ab;
    size_t off;
    if (i >= argc || napi_get_typedarray_info(env, argv[i], &t, &len, data, &ab, &off) != napi_ok) return false;
    size_t el = t == napi_int8_array || t == napi_uint8_array || t == napi_uint8_clamped_array ? 1 : t == napi_int16_array || t == napi_uint16_array ? 2 : t == napi_float64_array || t == napi_bigint64_array || t == napi_biguint64_array ? 8 : 4;
    *n = len * el;
    return true;
  }
};

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

// cudaOpen(mode 'emulate' | 'gpu', driver[], cublasLt[], nvrtc[], source, tf32, cacheDir) → the
// device's name; throws with the reason it cannot open.
napi_value Open(napi_env env, napi_callback_info info) {
  Call c(env, info);
  std::string mode = c.str(0);
  if (!g_device) {
    std::string why;
    bool tf32 = false;
    if (c.argc > 5) napi_get_value_bool(env, c.argv[5], &tf32);
    g_device = mode == "emulate" ? cuda::open_emulated() : cuda::open_gpu(c.strs(1), c.strs(2), c.strs(3), c.str(4), tf32, c.str(6), &why);
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
  Call c(env, info);
  if (!need_device(env)) return nullptr;
  double n = c.num(0);
  if (!(n >= 0)) return throw_error(env, "cudaAlloc: the size is not a non-negative number");
  uint64_t p = g_memory->alloc((size_t)std::max(1.0, n));
  if (!p) {
    size_t fr = 0, total = 0;
    g_device->memory(&fr, &total);
    return throw_error(env, "CUDA out of memory: " + std::to_string((size_t)n >> 20) + " MiB asked, " + std::to_string(g_memory->live() >> 20) + " MiB in use by prefopt, " +
                                std::to_string(fr >> 20) + " of " + std::to_string(total >> 20) + " MiB free on the device");
  }
  return number(env, (double)p);
}

napi_value Free(napi_env env, napi_callback_info info) {
  Call c(env, info);
  if (!need_device(env)) return nullptr;
  napi_value v;
  napi_get_boolean(env, g_memory->free((uint64_t)c.num(0)), &v);
  return v;
}

// cudaUpload(address, typedArray) / cudaDownload(address, typedArray): the array's bytes, up
// (callback data non-null) or down.
napi_value Transfer(napi_env env, napi_callback_info info) {
  Call c(env, info);
  void* up = nullptr;
  napi_get_cb_info(env, info, nullptr, nullptr, nullptr, &up);
  const char* fn = up ? "cudaUpload" : "cudaDownload";
  void* data;
  size_t n;
  if (!need_device(env)) return nullptr;
  if (!c.bytes(1, &data, &n)) return throw_error(env, std::string(fn) + ": argument 1 is not a typed array");
  const uint64_t addr = (uint64_t)c.num(0);
  if (!timed(up ? "upload" : "download", (double)n, [&] { return up ? g_device->upload(addr, data, n) : g_device->download(data, addr, n); })) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaCopy(dst, src, bytes)
napi_value Copy(napi_env env, napi_callback_info info) {
  Call c(env, info);
  if (!need_device(env)) return nullptr;
  const size_t n = (size_t)c.num(2);
  if (!timed("copy", (double)n, [&] { return g_device->copy((uint64_t)c.num(0), (uint64_t)c.num(1), n); })) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaLaunch(kernel, grid, block, args[]): each argument converted to the kernel's parameter
// type (kernels() knows them); a count or a value that does not fit throws before any launch.
napi_value Launch(napi_env env, napi_callback_info info) {
  Call c(env, info);
  if (!need_device(env)) return nullptr;
  const std::string name = c.str(0);
  const KernelInfo* k = cuda::find_kernel(name);
  if (!k) return throw_error(env, "cudaLaunch: no kernel " + name + " in native/cuda/kernels.cu");
  double grid = c.num(1), block = c.num(2);
  if (!(grid >= 1 && grid < 2147483648.0 && block >= 1 && block <= 1024)) return throw_error(env, "cudaLaunch " + name + ": grid or block out of range");
  uint32_t argc = 0;
  napi_get_array_length(env, c.argv[3], &argc);
  if (argc != k->sig.size()) return throw_error(env, "cudaLaunch " + name + ": " + std::to_string(argc) + " arguments given, the kernel takes " + std::to_string(k->sig.size()));
  std::vector<cuda::DimsArg> dims(k->sig.size());
  std::vector<int64_t> words(k->sig.size());
  std::vector<void*> args(k->sig.size());
  for (uint32_t i = 0; i < argc; i++) {
    napi_value e;
    napi_get_element(env, c.argv[3], i, &e);
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

// cudaGemm([ta, tb, batch, m, n, k, a, sa, b, sb, c, sc, alpha, beta, adt, bdt]) — more than
// Call's 8 arguments, so they come as one array; adt, bdt: 0 float32, 1 bf16.
napi_value GemmCall(napi_env env, napi_callback_info info) {
  Call c(env, info);
  if (!need_device(env)) return nullptr;
  double v[16];
  for (uint32_t i = 0; i < 16; i++) {
    napi_value e;
    napi_get_element(env, c.argv[0], i, &e);
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
  if (!g_device->sync()) return throw_error(env, g_device->error);
  return nullptr;
}

// cudaStats() → { live, cached, peak, free, total } bytes; cudaStats(true) restarts the peak.
napi_value Stats(napi_env env, napi_callback_info info) {
  Call c(env, info);
  if (!need_device(env)) return nullptr;
  bool reset = false;
  if (c.argc > 0) napi_get_value_bool(env, c.argv[0], &reset);
  if (reset) g_memory->reset_peak();
  size_t fr = 0, total = 0;
  g_device->memory(&fr, &total);
  napi_value o;
  napi_create_object(env, &o);
  napi_set_named_property(env, o, "live", number(env, (double)g_memory->live()));
  napi_set_named_property(env, o, "cached", number(env, (double)g_memory->cached()));
  napi_set_named_property(env, o, "peak", number(env, (double)g_memory->peak()));
  napi_set_named_property(env, o, "free", number(env, (double)fr));
  napi_set_named_property(env, o, "total", number(env, (double)total));
  return o;
}

// cudaProfile(on) → the profile so far as { key: { count, seconds, work } }, then cleared; on
// (true/false) starts or stops timing every device operation (see Timing).
napi_value Profile(napi_env env, napi_callback_info info) {
  Call c(env, info);
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
  if (c.argc > 0) napi_get_value_bool(env, c.argv[0], &g_profiling);
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

// A function property of the exports.
napi_property_descriptor method(const char* name, napi_callback f, void* data = nullptr) { return {name, nullptr, f, nullptr, nullptr, nullptr, napi_default, data}; }

}  // namespace

void define_cuda(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      method("cudaOpen", Open),         method("cudaAlloc", Alloc),       method("cudaFree", Free),
      method("cudaUpload", Transfer, (void*)"up"), method("cudaDownload", Transfer), method("cudaCopy", Copy),
      method("cudaLaunch", Launch),     method("cudaGemm", GemmCall),     method("cudaSync", Sync),
      method("cudaStats", Stats),       method("cudaTrim", Trim),         method("cudaKernels", Kernels),
      method("cudaProfile", Profile),
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
}

}  // namespace prefopt
