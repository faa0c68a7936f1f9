// XXH64 (libxxhash), streamed: the checksum of snapshot memory ranges. It runs several times
// faster than CRC-32 or SHA-256 on real and on emulated CPUs, so checksumming guest RAM costs
// less than writing it. The hash state lives in a JavaScript-owned buffer: no handle to free.
#include "xxh64.h"

#include <stdint.h>
#include <stdio.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "common.h"

namespace tern {

namespace {

XXH64_state_t* StateOf(const Napi::CallbackInfo& info, const char* fn) {
  if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array ||
      info[0].As<Napi::Uint8Array>().ByteLength() != sizeof(XXH64_state_t)) {
    ThrowTypeError(info.Env(), std::string(fn) + ": expected a state from xxh64Init");
    return nullptr;
  }
  auto* state = reinterpret_cast<XXH64_state_t*>(info[0].As<Napi::Uint8Array>().Data());
  // The state is JavaScript's buffer: bytes that no xxh64Init made could make XXH64 copy past
  // its 32-byte stash.
  if (state->memsize >= sizeof state->mem64) {
    ThrowTypeError(info.Env(), std::string(fn) + ": expected a state from xxh64Init");
    return nullptr;
  }
  return state;
}

// xxh64Init(): Uint8Array, a fresh state (seed 0).
Napi::Value Xxh64Init(const Napi::CallbackInfo& info) {
  Napi::Uint8Array state = Napi::Uint8Array::New(info.Env(), sizeof(XXH64_state_t));
  XXH64_reset(reinterpret_cast<XXH64_state_t*>(state.Data()), 0);
  return state;
}

// xxh64Update(state, data: Uint8Array): feeds `data` into `state`.
Napi::Value Xxh64Update(const Napi::CallbackInfo& info) {
  XXH64_state_t* state = StateOf(info, "xxh64Update");
  if (!state) return info.Env().Undefined();
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(info.Env(), "xxh64Update: expected a Uint8Array of data");
    return info.Env().Undefined();
  }
  Napi::Uint8Array data = info[1].As<Napi::Uint8Array>();
  XXH64_update(state, data.Data(), data.ByteLength());
  return info.Env().Undefined();
}

// xxh64Digest(state): the 64-bit hash so far as 16 lowercase hex digits.
Napi::Value Xxh64Digest(const Napi::CallbackInfo& info) {
  XXH64_state_t* state = StateOf(info, "xxh64Digest");
  if (!state) return info.Env().Undefined();
  char hex[17];
  snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH64_digest(state)));
  return Napi::String::New(info.Env(), hex);
}

}  // namespace

void InitXxh64(Napi::Env env, Napi::Object exports) {
  exports.Set("xxh64Init", Napi::Function::New(env, Guarded<Xxh64Init>, "xxh64Init"));
  exports.Set("xxh64Update", Napi::Function::New(env, Guarded<Xxh64Update>, "xxh64Update"));
  exports.Set("xxh64Digest", Napi::Function::New(env, Guarded<Xxh64Digest>, "xxh64Digest"));
}

}  // namespace tern
