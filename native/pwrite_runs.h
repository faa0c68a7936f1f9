#pragma once

#include <napi.h>

namespace tern {

// Registers pwriteRuns on `exports`.
void InitPwriteRuns(Napi::Env env, Napi::Object exports);

}  // namespace tern
