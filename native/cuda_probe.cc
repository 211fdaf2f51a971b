#include "cuda_probe.h"

#include <dlfcn.h>
#include <link.h>

#include <cstring>

namespace prefopt {

// "Not found" is said once for the whole list; a candidate that exists but fails to load is the
// more useful message, so it wins.
void* open_first(const std::vector<std::string>& names, LibProbe& out) {
  std::string failed;
  for (const auto& n : names) {
    void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h) {
      link_map* lm = nullptr;
      out.path = dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name && *lm->l_name ? lm->l_name : n;
      return h;
    }
    const char* e = dlerror();
    if (e && !strstr(e, "No such file or directory") && failed.empty()) failed = e;
  }
  out.error = failed.empty() ? "not found" : failed;
  return nullptr;
}

void* find_symbol(void* lib, const char* name, LibProbe& out) {
  void* f = dlsym(lib, name);
  if (!f && out.error.empty()) out.error = std::string("has no ") + name;
  return f;
}

namespace {

void probe_driver(const std::vector<std::string>& names, CudaProbe& p) {
  void* h = open_first(names, p.driver);
  if (!h) return;
  using init_fn = int (*)(unsigned);
  using int_fn = int (*)(int*);
  using get_fn = int (*)(int*, int);
  using name_fn = int (*)(char*, int, int);
  using attr_fn = int (*)(int*, int, int);
  using mem_fn = int (*)(size_t*, int);
  using err_fn = int (*)(int, const char**);
  auto init = symbol<init_fn>(h, "cuInit", p.driver);
  auto version = symbol<int_fn>(h, "cuDriverGetVersion", p.driver);
  auto count = symbol<int_fn>(h, "cuDeviceGetCount", p.driver);
  auto get = symbol<get_fn>(h, "cuDeviceGet", p.driver);
  auto name = symbol<name_fn>(h, "cuDeviceGetName", p.driver);
  auto attr = symbol<attr_fn>(h, "cuDeviceGetAttribute", p.driver);
  auto mem = symbol<mem_fn>(h, "cuDeviceTotalMem_v2", p.driver);
  auto err = reinterpret_cast<err_fn>(dlsym(h, "cuGetErrorString"));
  if (!p.driver.error.empty()) return;
  int v = 0;
  if (version(&v) == 0) p.driver.version = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  if (int r = init(0)) {
    const char* s = nullptr;
    p.driver.error = "cuInit failed: " + std::string(err && err(r, &s) == 0 && s ? s : "error " + std::to_string(r));
    return;
  }
  int n = 0;
  count(&n);
  for (int i = 0; i < n; i++) {
    int dev = 0;
    if (get(&dev, i)) continue;
    CudaDevice d;
    char buf[256] = {0};
    name(buf, sizeof buf - 1, dev);
    d.name = buf;
    attr(&d.major, 75, dev);  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    attr(&d.minor, 76, dev);  // …_MINOR
    mem(&d.memory, dev);
    p.devices.push_back(d);
  }
  if (p.devices.empty()) p.driver.error = "the driver sees no CUDA device";
}

}  // namespace

CudaProbe probe_cuda(const std::vector<std::string>& driver, const std::vector<std::string>& cublaslt, const std::vector<std::string>& nvrtc) {
  CudaProbe p;
  probe_driver(driver, p);
  if (void* h = open_first(cublaslt, p.cublaslt)) {
    if (auto v = symbol<size_t (*)()>(h, "cublasLtGetVersion", p.cublaslt)) {
      size_t n = v();  // major * 10000 + minor * 100 + patch
      p.cublaslt.version = std::to_string(n / 10000) + "." + std::to_string(n / 100 % 100) + "." + std::to_string(n % 100);
    }
  }
  if (void* h = open_first(nvrtc, p.nvrtc)) {
    if (auto v = symbol<int (*)(int*, int*)>(h, "nvrtcVersion", p.nvrtc)) {
      int major = 0, minor = 0;
      if (v(&major, &minor) == 0) p.nvrtc.version = std::to_string(major) + "." + std::to_string(minor);
    }
  }
  return p;
}

}  // namespace prefopt
