// Finding the CUDA driver and the libraries prefopt's CUDA backend needs (docs/REFERENCE.md §11),
// by opening them: a file that exists but cannot load (wrong architecture, a missing dependency)
// is reported with the loader's own words.
#pragma once
#include <string>
#include <vector>

namespace prefopt {

struct LibProbe {
  std::string path;   // the file that loaded, or empty
  std::string error;  // why none did, or why the loaded one is unusable
  std::string version;
};

struct CudaDevice {
  std::string name;
  int major = 0, minor = 0;
  size_t memory = 0;
};

struct CudaProbe {
  LibProbe driver, cublaslt, nvrtc;
  std::vector<CudaDevice> devices;
};

// The first of `names` that loads (its handle, out.path set), or nullptr with out.error: "not
// found" for the whole list, or the loader's own reason for a file that exists but failed.
void* open_first(const std::vector<std::string>& names, LibProbe& out);
// The library's entry point `name`, or nullptr with out.error naming it (if none is named yet).
void* find_symbol(void* lib, const char* name, LibProbe& out);
template <typename F>
F symbol(void* lib, const char* name, LibProbe& out) {
  return reinterpret_cast<F>(find_symbol(lib, name, out));
}
template <typename F>
void resolve(void* lib, const char* name, F& f, LibProbe& out) {
  f = symbol<F>(lib, name, out);
}

// Each list holds candidates in order (full paths, or sonames for the loader's own search).
CudaProbe probe_cuda(const std::vector<std::string>& driver, const std::vector<std::string>& cublaslt, const std::vector<std::string>& nvrtc);

}  // namespace prefopt
