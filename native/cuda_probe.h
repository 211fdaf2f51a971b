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

// Each list holds candidates in order (full paths, or sonames for the loader's own search).
CudaProbe probe_cuda(const std::vector<std::string>& driver, const std::vector<std::string>& cublaslt, const std::vector<std::string>& nvrtc);

}  // namespace prefopt
