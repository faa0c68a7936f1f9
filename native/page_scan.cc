// Which 4 KiB pages of a buffer are all zero: the snapshot writer leaves those as holes. A
// per-page comparison from JavaScript costs a call per page; here it is one pass per buffer.
#include "page_scan.h"

#include <stdint.h>
#include <string.h>

#include "common.h"

namespace tern {

namespace {

constexpr size_t kPage = 4096;

bool PageIsZero(const uint8_t* p, size_t len) {
  // Word at a time; the buffers are page-aligned views over guest RAM or Node buffers.
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    if (w) return false;
  }
  for (; i < len; i++)
    if (p[i]) return false;
  return true;
}

// zeroPages(view: Uint8Array): Uint8Array with one byte per page of `view` (the last page may be
// partial), 1 where the page is all zero.
Napi::Value ZeroPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, "zeroPages: expected a Uint8Array");
    return env.Undefined();
  }
  Napi::Uint8Array view = info[0].As<Napi::Uint8Array>();
  const uint8_t* data = view.Data();
  size_t len = view.ByteLength();
  size_t pages = (len + kPage - 1) / kPage;
  Napi::Uint8Array out = Napi::Uint8Array::New(env, pages);
  for (size_t i = 0; i < pages; i++) {
    size_t n = len - i * kPage < kPage ? len - i * kPage : kPage;
    out[i] = PageIsZero(data + i * kPage, n) ? 1 : 0;
  }
  return out;
}

}  // namespace

void InitPageScan(Napi::Env env, Napi::Object exports) {
  exports.Set("zeroPages", Napi::Function::New(env, Guarded<ZeroPages>, "zeroPages"));
}

}  // namespace tern
