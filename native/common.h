// Shared helpers for the Tern native addon: errno -> JS errors, base64, bigint conversion,
// per-environment constructor storage.
#pragma once

#include <napi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace tern {

// Per-addon-instance data: constructors of the wrapped classes.
struct AddonData {
  Napi::FunctionReference kvmCtor;
  Napi::FunctionReference vmCtor;
  Napi::FunctionReference vcpuCtor;
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

std::string Base64Encode(const void* data, size_t len);
// Returns false on malformed input.
bool Base64Decode(const std::string& in, std::vector<uint8_t>* out);

// Accept bigint or number (non-negative integers; negative numbers wrap to two's complement).
bool ToU64(Napi::Value v, uint64_t* out);
// Read obj[key] as u64 / u32; throw a TypeError naming the key and return false when missing.
bool GetU64(Napi::Object obj, const char* key, uint64_t* out);
bool GetU32(Napi::Object obj, const char* key, uint32_t* out);
// Kernel headers use unsigned long long for __u64.
inline bool GetU64(Napi::Object obj, const char* key, unsigned long long* out) {
  uint64_t v;
  if (!GetU64(obj, key, &v)) return false;
  *out = v;
  return true;
}
// Optional variants: leave *out untouched when the key is absent or undefined.
bool GetOptU64(Napi::Object obj, const char* key, uint64_t* out);
bool GetOptU32(Napi::Object obj, const char* key, uint32_t* out);

inline Napi::BigInt Big(Napi::Env env, uint64_t v) { return Napi::BigInt::New(env, v); }

// Internal token passed to wrapped-class constructors so JS cannot construct them directly.
extern const char* const kInternalToken;

// ioctl retried on EINTR (for everything except KVM_RUN).
int IoctlRetry(int fd, unsigned long req, void* arg);

}  // namespace tern
