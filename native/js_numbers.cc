// Numbers from JavaScript, checked at the boundary. A double cast to an integer type it does not
// fit is undefined behaviour in C++, and a static_cast to a narrower field silently drops bits
// (slot 2^32+1 would become slot 1): every integer argument goes through ToUint, which accepts
// only what fits the field exactly and otherwise throws an error that names the argument.
#include <cmath>
#include <cstdint>
#include <string>

#include "common.h"

namespace tern {

namespace {

// 2^53 - 1: above it a number may already be the rounding of a different integer.
constexpr double kMaxSafeInteger = 9007199254740991.0;

const char* TypeName(const Napi::Value& v) {
  switch (v.Type()) {
    case napi_undefined: return "undefined";
    case napi_null: return "null";
    case napi_boolean: return "a boolean";
    case napi_string: return "a string";
    case napi_symbol: return "a symbol";
    case napi_object: return "an object";
    case napi_function: return "a function";
    case napi_external: return "an external";
    default: return "a non-integer";
  }
}

void ThrowRangeError(Napi::Env env, const std::string& message) {
  Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
}

std::string RangeText(uint64_t max) { return "0.." + std::to_string(max); }

}  // namespace

bool ToUint(Napi::Env env, Napi::Value v, const std::string& what, uint64_t max, uint64_t* out) {
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) {
      // Either negative or wider than 64 bits: say which without printing the value.
      int sign = 0;
      size_t words = 1;
      uint64_t low = 0;
      napi_get_value_bigint_words(env, v, &sign, &words, &low);
      bool negative = sign != 0;
      ThrowRangeError(env, what + " must be in " + RangeText(max) + ", got " + (negative ? "a negative bigint" : "a bigint above 2^64-1"));
      return false;
    }
    if (x > max) {
      ThrowRangeError(env, what + " must be in " + RangeText(max) + ", got " + std::to_string(x));
      return false;
    }
    *out = x;
    return true;
  }
  if (!v.IsNumber()) {
    ThrowTypeError(env, what + " must be an integer (number or bigint), got " + TypeName(v));
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (std::isnan(d)) {
    ThrowTypeError(env, what + " must be an integer, got NaN");
    return false;
  }
  if (std::isfinite(d) && std::trunc(d) != d) {
    ThrowTypeError(env, what + " must be an integer, got a fraction");
    return false;
  }
  if (d < 0) {
    ThrowRangeError(env, what + " must be in " + RangeText(max) + ", got a negative number");
    return false;
  }
  if (!(d <= kMaxSafeInteger)) {  // also +Infinity
    ThrowRangeError(env, what + " must be in " + RangeText(max) +
                             (max > static_cast<uint64_t>(kMaxSafeInteger)
                                  ? ", got a number above 2^53-1 (pass a bigint)"
                                  : ", got a number above 2^53-1"));
    return false;
  }
  uint64_t x = static_cast<uint64_t>(d);  // exact: 0 <= d <= 2^53-1, integral
  if (x > max) {
    ThrowRangeError(env, what + " must be in " + RangeText(max) + ", got " + std::to_string(x));
    return false;
  }
  *out = x;
  return true;
}

bool ArgUint(const Napi::CallbackInfo& info, size_t i, const std::string& what, uint64_t max, uint64_t* out) {
  if (info.Length() <= i) {
    ThrowTypeError(info.Env(), what + " is missing");
    return false;
  }
  return ToUint(info.Env(), info[i], what, max, out);
}

bool ArgFd(const Napi::CallbackInfo& info, size_t i, const std::string& what, int* fd) {
  uint64_t x;
  if (!ArgUint(info, i, what, INT32_MAX, &x)) return false;
  *fd = static_cast<int>(x);
  return true;
}

bool GetUint(Napi::Object obj, const char* key, uint64_t max, uint64_t* out) {
  Napi::Value v = obj.Get(key);
  if (obj.Env().IsExceptionPending()) return false;
  return ToUint(obj.Env(), v, std::string("'") + key + "'", max, out);
}

bool GetOptUint(Napi::Object obj, const char* key, uint64_t max, uint64_t* out) {
  Napi::Value v = obj.Get(key);
  if (obj.Env().IsExceptionPending()) return false;
  if (v.IsUndefined() || v.IsNull()) return true;
  return ToUint(obj.Env(), v, std::string("'") + key + "'", max, out);
}

}  // namespace tern
