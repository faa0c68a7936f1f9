#pragma once

#include <napi.h>

namespace tern {

// Registers zeroPages on `exports`.
void InitPageScan(Napi::Env env, Napi::Object exports);

}  // namespace tern
