// Shared helpers for the Tern native addon: errno -> JS errors, base64, bigint conversion,
// per-environment constructor storage.
#pragma once

#include <napi.h>
#include <pthread.h>
#include <time.h>

#include <cstdint>
#include <exception>
#include <limits>
#include <new>
#include <type_traits>
#include <string>
#include <vector>

namespace tern {

// Per-addon-instance data: constructors of the wrapped classes.
struct AddonData {
  Napi::FunctionReference kvmCtor;
  Napi::FunctionReference vmCtor;
  Napi::FunctionReference vcpuCtor;
  Napi::FunctionReference blockQueueCtor;
  Napi::FunctionReference netQueueCtor;
};

inline AddonData* GetAddonData(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

// Symbolic errno name ("EINVAL"), or "E<number>" if unknown.
std::string ErrnoName(int err);

// Build "<what> failed: <strerror> (<ENAME>)" with .code = ENAME and .errno = err.
Napi::Error ErrnoError(Napi::Env env, const std::string& what, int err);

// Throw ErrnoError as a pending JS exception.
void ThrowErrno(Napi::Env env, const std::string& what, int err);

// Throw a plain Error with an optional code.
void ThrowError(Napi::Env env, const std::string& message, const char* code = nullptr);
void ThrowTypeError(Napi::Env env, const std::string& message);

// What a JavaScript callback threw, as a message (its .message, or the value as a string;
// `fallback` when neither can be had), leaving no exception pending.
std::string DescribeException(Napi::Env env, const Napi::Error& e, const std::string& fallback);

std::string Base64Encode(const void* data, size_t len);
// Returns false on malformed input.
bool Base64Decode(const std::string& in, std::vector<uint8_t>* out);

// Integers from JavaScript, range-checked (js_numbers.cc). A number must be a non-negative
// integer no greater than 2^53-1 (pass a bigint above that), a bigint must lie in 0..max; any
// other value throws a TypeError (not a number or bigint, NaN, a fraction) or a RangeError
// (negative, too large) whose message names `what`, and the function returns false.
bool ToUint(Napi::Env env, Napi::Value v, const std::string& what, uint64_t max, uint64_t* out);
// info[i]; a missing argument is a TypeError.
bool ArgUint(const Napi::CallbackInfo& info, size_t i, const std::string& what, uint64_t max, uint64_t* out);
// A file descriptor: 0..INT32_MAX.
bool ArgFd(const Napi::CallbackInfo& info, size_t i, const std::string& what, int* fd);
// obj[key]; GetOptUint leaves *out untouched when the key is absent, undefined or null.
bool GetUint(Napi::Object obj, const char* key, uint64_t max, uint64_t* out);
bool GetOptUint(Napi::Object obj, const char* key, uint64_t max, uint64_t* out);

// Typed forms of GetUint/ArgUint for the field they fill: the field's width is the range.
template <typename T>
inline bool GetField(Napi::Object obj, const char* key, T* out) {
  static_assert(std::is_unsigned<T>::value, "unsigned fields only");
  uint64_t v;
  if (!GetUint(obj, key, static_cast<uint64_t>(std::numeric_limits<T>::max()), &v)) return false;
  *out = static_cast<T>(v);
  return true;
}
template <typename T>
inline bool GetOptField(Napi::Object obj, const char* key, T* out) {
  uint64_t v = static_cast<uint64_t>(*out);
  if (!GetOptUint(obj, key, static_cast<uint64_t>(std::numeric_limits<T>::max()), &v)) return false;
  *out = static_cast<T>(v);
  return true;
}
template <typename T>
inline bool ArgField(const Napi::CallbackInfo& info, size_t i, const std::string& what, T* out) {
  uint64_t v;
  if (!ArgUint(info, i, what, static_cast<uint64_t>(std::numeric_limits<T>::max()), &v)) return false;
  *out = static_cast<T>(v);
  return true;
}

// Run the body of an N-API callback so that no C++ exception leaves it: one that did would
// reach V8's C frames and terminate the process. std::bad_alloc becomes an Error with code
// ENOMEM, any other exception an Error with its what(); both through the C API, which does
// not allocate on the C++ heap.
template <typename F>
inline Napi::Value GuardCall(Napi::Env env, F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    napi_throw_error(env, "ENOMEM", "out of memory in the native addon");
  } catch (const std::exception& e) {
    napi_throw_error(env, nullptr, e.what());
  } catch (...) {
    napi_throw_error(env, nullptr, "unknown native exception");
  }
  return Napi::Value();
}

// A free callback with GuardCall around it: Napi::Function::New(env, Guarded<Fn>, "name").
template <Napi::Value (*Fn)(const Napi::CallbackInfo&)>
Napi::Value Guarded(const Napi::CallbackInfo& info) {
  return GuardCall(info.Env(), [&] { return Fn(info); });
}

// The same for the instance methods of an ObjectWrap class: InstanceMethod<&Cls::Guarded<&Cls::M>>.
#define TERN_GUARDED_METHODS(Cls)                                                          \
  template <Napi::Value (Cls::*M)(const Napi::CallbackInfo&)>                              \
  Napi::Value Guarded(const Napi::CallbackInfo& info) {                                    \
    return ::tern::GuardCall(info.Env(), [&] { return (this->*M)(info); });                \
  }

inline Napi::BigInt Big(Napi::Env env, uint64_t v) { return Napi::BigInt::New(env, v); }

// The monotonic clock in milliseconds (deadlines, the age of a health report's last event).
inline int64_t MonotonicMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// Name the calling thread for top -H, perf and /proc/PID/task/*/comm. Linux keeps 15 bytes of a
// name and refuses a longer one outright, so the name is cut to fit.
inline void NameThisThread(const std::string& name) { pthread_setname_np(pthread_self(), name.substr(0, 15).c_str()); }

// Internal token passed to wrapped-class constructors so JS cannot construct them directly.
extern const char* const kInternalToken;

// ioctl retried on EINTR (for everything except KVM_RUN).
int IoctlRetry(int fd, unsigned long req, void* arg);

}  // namespace tern
