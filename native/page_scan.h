#pragma once

#include <napi.h>

namespace tern {

// Registers zeroPages and dirtyRuns on `exports`.
void InitPageScan(Napi::Env env, Napi::Object exports);

}  // namespace tern
