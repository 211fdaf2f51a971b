// N-API argument checking shared by the addon's two glue files (addon.cc: the host kernels;
// cuda_addon.cc: the CUDA device): each accessor checks its argument, and the first problem
// throws a JS error naming the function and makes ok() false, so a call checks everything before
// any work.
#pragma once
#include <node_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"

namespace prefopt {

// The arguments of one call; the first problem throws a JS error and makes ok() false.
class Args {
 public:
  Args(napi_env env, napi_callback_info info, size_t want, const char* fn) : env_(env), fn_(fn) {
    napi_get_cb_info(env, info, &argc_, argv_, nullptr, &data_);
    if (argc_ < want) fail("wrong number of arguments", napi_throw_type_error);
  }
  bool ok() const { return ok_; }
  size_t count() const { return argc_; }
  napi_value arg(int i) const { return argv_[i]; }
  int64_t num(int i) {
    int64_t x = 0;
    if (ok_ && (napi_get_value_int64(env_, argv_[i], &x) != napi_ok || x < 0 || x > INT32_MAX)) fail("a size is not a non-negative 32-bit integer", napi_throw_range_error);
    return x;
  }
  double real(int i) {
    double x = 0;
    if (ok_ && napi_get_value_double(env_, argv_[i], &x) != napi_ok) fail("a scalar argument is not a number", napi_throw_type_error);
    return x;
  }
  bool flag(int i) {
    bool x = false;
    if (ok_) napi_get_value_bool(env_, argv_[i], &x);
    return x;
  }
  float* f32(int i, int64_t need, const char* what) { return static_cast<float*>(array(i, need, what, napi_float32_array, "Float32Array")); }
  // An output the caller may not want: null gives nullptr.
  float* f32_or_null(int i, int64_t need, const char* what) {
    napi_valuetype t;
    if (ok_ && napi_typeof(env_, argv_[i], &t) == napi_ok && t == napi_null) return nullptr;
    return f32(i, need, what);
  }
  // Element k of argument i, a JS array of Float32Arrays, at least `need` long; its length goes
  // to *len when asked.
  float* f32_at(int i, uint32_t k, int64_t need, const char* what, int64_t* len = nullptr) {
    napi_value e = nullptr;
    if (ok_ && napi_get_element(env_, argv_[i], k, &e) != napi_ok) fail((std::string(what) + " must be an array").c_str(), napi_throw_type_error);
    float* data = ok_ ? static_cast<float*>(typed(e, need, what, napi_float32_array, "Float32Array")) : nullptr;
    size_t n = 0;
    if (data && len) {
      napi_get_typedarray_info(env_, e, nullptr, &n, nullptr, nullptr, nullptr);
      *len = (int64_t)n;
    }
    return data;
  }
  // The length of argument i, a JS array.
  uint32_t length(int i, const char* what) {
    uint32_t n = 0;
    if (ok_ && napi_get_array_length(env_, argv_[i], &n) != napi_ok) fail((std::string(what) + " must be an array").c_str(), napi_throw_type_error);
    return n;
  }
  double* f64(int i, int64_t need, const char* what) { return static_cast<double*>(array(i, need, what, napi_float64_array, "Float64Array")); }
  int32_t* i32(int i, int64_t need, const char* what) { return static_cast<int32_t*>(array(i, need, what, napi_int32_array, "Int32Array")); }
  uint32_t* u32(int i, int64_t need, const char* what) { return static_cast<uint32_t*>(array(i, need, what, napi_uint32_array, "Uint32Array")); }
  uint64_t* u64(int i, int64_t need, const char* what) { return static_cast<uint64_t*>(array(i, need, what, napi_biguint64_array, "BigUint64Array")); }
  // A Uint32Array of at least `need` values, or nullptr for null.
  uint32_t* u32_or_null(int i, int64_t need, const char* what) {
    napi_valuetype t;
    if (ok_ && napi_typeof(env_, argv_[i], &t) == napi_ok && t == napi_null) return nullptr;
    return u32(i, need, what);
  }
  // A storage type (argument i: 0 float32, 1 bf16, 2 f16).
  Dt dtype(int i) {
    int64_t d = num(i);
    if (ok_ && d > 2) fail("a dtype code is not 0 (float32), 1 (bf16) or 2 (f16)", napi_throw_range_error);
    return (Dt)d;
  }
  // A weight of `need` values stored as `dt`: a Float32Array, or a Uint16Array of 16-bit bits.
  const void* weight(int i, int64_t need, Dt dt, const char* what) {
    if (dt == kF32) return f32(i, need, what);
    return array(i, need, what, napi_uint16_array, "Uint16Array");
  }
  // A device address or byte count: a non-negative integer a double holds exactly (below 2⁵³).
  uint64_t address(int i) {
    double x = real(i);
    if (ok_ && !(x >= 0 && x < 9007199254740992.0 && x == (double)(uint64_t)x)) fail("an address or size is not a non-negative integer below 2^53", napi_throw_range_error);
    return ok_ ? (uint64_t)x : 0;
  }
  std::string str(int i) {
    size_t n = 0;
    if (ok_ && napi_get_value_string_utf8(env_, argv_[i], nullptr, 0, &n) != napi_ok) fail("a name is not a string", napi_throw_type_error);
    if (!ok_) return "";
    std::string s(n, '\0');
    napi_get_value_string_utf8(env_, argv_[i], s.data(), n + 1, &n);
    return s;
  }
  // Argument i, an array of strings.
  std::vector<std::string> strs(int i, const char* what) {
    std::vector<std::string> out;
    const uint32_t n = length(i, what);
    for (uint32_t k = 0; ok_ && k < n; k++) {
      napi_value e;
      size_t len = 0;
      if (napi_get_element(env_, argv_[i], k, &e) != napi_ok || napi_get_value_string_utf8(env_, e, nullptr, 0, &len) != napi_ok) {
        fail((std::string(what) + " must be an array of strings").c_str(), napi_throw_type_error);
        break;
      }
      std::string s(len, '\0');
      napi_get_value_string_utf8(env_, e, s.data(), len + 1, &len);
      out.push_back(s);
    }
    return out;
  }
  // Any typed array's bytes.
  void* bytes(int i, size_t* n, const char* what) {
    napi_typedarray_type t;
    size_t len = 0;
    void* data = nullptr;
    napi_value ab;
    size_t off;
    if (ok_ && napi_get_typedarray_info(env_, argv_[i], &t, &len, &data, &ab, &off) != napi_ok) fail((std::string(what) + " must be a typed array").c_str(), napi_throw_type_error);
    const size_t el = t == napi_int8_array || t == napi_uint8_array || t == napi_uint8_clamped_array ? 1 : t == napi_int16_array || t == napi_uint16_array ? 2 : t == napi_float64_array || t == napi_bigint64_array || t == napi_biguint64_array ? 8 : 4;
    *n = ok_ ? len * el : 0;
    return ok_ ? data : nullptr;
  }
  // The data pointer napi_define_properties attached to the function.
  void* data() const { return data_; }
  // A condition on the shapes; false throws `msg` (a RangeError naming the function).
  bool require(bool cond, const char* msg) {
    if (ok_ && !cond) fail(msg, napi_throw_range_error);
    return ok_;
  }

 private:
  void* array(int i, int64_t need, const char* what, napi_typedarray_type want, const char* tname) { return typed(argv_[i], need, what, want, tname); }
  void* typed(napi_value v, int64_t need, const char* what, napi_typedarray_type want, const char* tname) {
    if (!ok_) return nullptr;
    napi_typedarray_type type;
    size_t length;
    void* data;
    napi_value ab;
    size_t off;
    if (napi_get_typedarray_info(env_, v, &type, &length, &data, &ab, &off) != napi_ok || type != want) {
      fail((std::string(what) + " must be a " + tname).c_str(), napi_throw_type_error);
      return nullptr;
    }
    if ((int64_t)length < need) {
      fail((std::string(what) + " is shorter than the shapes say").c_str(), napi_throw_range_error);
      return nullptr;
    }
    return data;
  }
  void fail(const char* msg, napi_status (*thrower)(napi_env, const char*, const char*)) {
    if (!ok_) return;
    ok_ = false;
    thrower(env_, nullptr, (std::string(fn_) + ": " + msg).c_str());
  }
  napi_env env_;
  const char* fn_;
  size_t argc_ = 20;
  napi_value argv_[20];
  void* data_ = nullptr;
  bool ok_ = true;
};

}  // namespace prefopt
