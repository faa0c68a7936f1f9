// Scans over pages: which 4 KiB pages of a buffer are all zero (the snapshot writer leaves those
// as holes), and which pages dirty bitmaps mark (a migration round sends those). From
// JavaScript either costs a step per page or word; here it is one pass per buffer.
#include "page_scan.h"

#include <stdint.h>
#include <string.h>

#include <vector>

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

// dirtyRuns(pages: number, bitmaps: Uint8Array[]): Uint32Array of [firstPage, count] pairs, the
// runs of pages below `pages` whose bit (bit p&7 of byte p>>3, as KVM's dirty log has it) is set
// in any of the bitmaps. Each bitmap must cover `pages`.
Napi::Value DirtyRuns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsArray()) {
    ThrowTypeError(env, "dirtyRuns: expected (pages, Uint8Array[])");
    return env.Undefined();
  }
  double pagesArg = info[0].As<Napi::Number>().DoubleValue();
  if (!(pagesArg >= 0 && pagesArg <= 4294967295.0) || pagesArg != static_cast<double>(static_cast<uint64_t>(pagesArg))) {
    Napi::RangeError::New(env, "dirtyRuns: pages must be a whole number below 2^32").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  const size_t pages = static_cast<size_t>(pagesArg);
  Napi::Array list = info[1].As<Napi::Array>();
  std::vector<const uint8_t*> maps;
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      ThrowTypeError(env, "dirtyRuns: every bitmap must be a Uint8Array");
      return env.Undefined();
    }
    Napi::Uint8Array m = v.As<Napi::Uint8Array>();
    if (m.ByteLength() < (pages + 7) / 8) {
      Napi::RangeError::New(env, "dirtyRuns: a bitmap is shorter than its pages").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    maps.push_back(m.Data());
  }
  auto bitAt = [&](size_t p) {
    uint8_t b = 0;
    for (const uint8_t* m : maps) b |= m[p >> 3];
    return (b >> (p & 7)) & 1;
  };
  std::vector<uint32_t> runs;
  for (size_t p = 0; p < pages;) {
    // (whole zero bytes of every bitmap are skipped 8 pages at a time: most of an idle guest's)
    if ((p & 7) == 0 && p + 8 <= pages) {
      uint8_t any = 0;
      for (const uint8_t* m : maps) any |= m[p >> 3];
      if (!any) {
        p += 8;
        continue;
      }
    }
    if (!bitAt(p)) {
      p++;
      continue;
    }
    size_t q = p + 1;
    while (q < pages && bitAt(q)) q++;
    runs.push_back(static_cast<uint32_t>(p));
    runs.push_back(static_cast<uint32_t>(q - p));
    p = q;
  }
  Napi::Uint32Array out = Napi::Uint32Array::New(env, runs.size());
  if (!runs.empty()) memcpy(out.Data(), runs.data(), runs.size() * sizeof(uint32_t));
  return out;
}

}  // namespace

void InitPageScan(Napi::Env env, Napi::Object exports) {
  exports.Set("zeroPages", Napi::Function::New(env, Guarded<ZeroPages>, "zeroPages"));
  exports.Set("dirtyRuns", Napi::Function::New(env, Guarded<DirtyRuns>, "dirtyRuns"));
}

}  // namespace tern
