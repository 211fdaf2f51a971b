// The `cuda` backend's device (docs/REFERENCE.md §11): memory, copies, kernel launches and
// products, either on an NVIDIA GPU through the driver API, NVRTC and cuBLASLt (opened with
// dlopen: nothing CUDA is needed to build the addon), or emulated on the CPU — host memory, the
// kernels of native/cuda/kernels.cu compiled for the host (native/cuda/emulate.h), the addon's own
// GEMM — so that everything above the device is tested on any machine. Device addresses are
// 64-bit integers either way.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace prefopt {
namespace cuda {

// A kernel of kernels.cu: its name, its parameters as one character each (p pointer, l int64,
// i int, u unsigned, f float, d double, D the Dims struct) and its host-compiled form for the emulation.
struct KernelInfo {
  const char* name;
  std::string sig;
  void (*emulate)(unsigned grid, unsigned block, void** args);
};
// The kernels.cu entry point named `name`, or nullptr (native/cuda_emulated.cc).
const KernelInfo* find_kernel(const std::string& name);
const std::vector<KernelInfo>& kernels();
// Rows of one head that an attention block of `block` threads covers (kernels.cu: attn_group's
// threads a row), or 0 where head_dim is more than a group holds.
int64_t attention_rows(int64_t hd, unsigned block);
// kernels.cu's Dims, as the launcher packs it: shape, then two operands' strides.
struct DimsArg {
  int64_t v[18];
};

// C [m, n] (+ batch·sc) = alpha·op(A)·op(B) + beta·C, row-major, batch entries sa/sb/sc elements
// apart (0: the same matrix for every entry). C is float32; A and B both float32 (adt = bdt = 0)
// or both bf16 (1), accumulated in float32.
struct Gemm {
  bool ta, tb;
  int64_t batch, m, n, k;
  uint64_t a, b, c;
  int64_t sa, sb, sc;
  float alpha, beta;
  int adt = 0, bdt = 0;
};

// Uploads up to kStagedUploadMax queue behind the device's work (a GPU stages them in pinned
// memory, kStagedUpload at a time); larger ones wait for it. A step's rotary tables (2 MiB each
// for 4 rows of 2,048 tokens of head_dim 64) are under it; weights are over it, uploaded once.
constexpr size_t kStagedUpload = 1u << 20;
constexpr size_t kStagedUploadMax = 4u << 20;

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  // Blocks for a grid-stride launch: enough to fill the device.
  virtual unsigned max_grid() const = 0;
  virtual bool raw_alloc(size_t bytes, uint64_t* out) = 0;
  virtual void raw_free(uint64_t p) = 0;
  virtual bool upload(uint64_t dst, const void* src, size_t n) = 0;
  virtual bool download(void* dst, uint64_t src, size_t n) = 0;
  virtual bool copy(uint64_t dst, uint64_t src, size_t n) = 0;
  virtual bool launch(const KernelInfo& k, unsigned grid, unsigned block, void** args) = 0;
  virtual bool gemm(const Gemm& g) = 0;
  // Wait for the device; false with `error` set when earlier work failed.
  virtual bool sync() = 0;
  virtual void memory(size_t* free_bytes, size_t* total_bytes) = 0;
  std::string error;
};

// dry: launches and products are issued but do nothing (copies still happen) — what the host
// alone spends issuing work, the floor under a GPU's time for the same work.
std::unique_ptr<Device> open_emulated(bool dry = false);
// The first library of each list that loads; null with *why saying what is missing or failed.
// cache_dir (may be empty: none) keeps the compiled kernels between processes.
std::unique_ptr<Device> open_gpu(const std::vector<std::string>& driver, const std::vector<std::string>& cublas_lt, const std::vector<std::string>& nvrtc, const std::string& source,
                                 bool tf32, const std::string& cache_dir, std::string* why);

// A caching allocator over a device: freed blocks wait in per-size lists for reuse (device
// allocation synchronizes the GPU, so a training step must not allocate afresh), and go back
// when an allocation fails or on trim(). One stream, so reuse in program order is safe.
class Memory {
 public:
  explicit Memory(Device* d) : d_(d) {}
  ~Memory() { trim(); }
  // 0 when the device has no room even after the cache is emptied.
  uint64_t alloc(size_t bytes);
  bool free(uint64_t p);
  void trim();
  size_t live() const { return live_; }
  size_t cached() const { return cached_; }
  size_t peak() const { return peak_; }
  // Restart the peak from what is live now.
  void reset_peak() { peak_ = live_; }

 private:
  static size_t round(size_t n);
  Device* d_;
  std::unordered_map<size_t, std::vector<uint64_t>> free_;
  std::unordered_map<uint64_t, size_t> size_;
  size_t live_ = 0, cached_ = 0, peak_ = 0;
};

}  // namespace cuda
}  // namespace prefopt
