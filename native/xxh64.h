#pragma once

#include <napi.h>

namespace tern {

// Registers xxh64Init, xxh64Update and xxh64Digest on `exports`.
void InitXxh64(Napi::Env env, Napi::Object exports);

}  // namespace tern
