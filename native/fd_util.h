#pragma once

#include <napi.h>

namespace tern {

// Registers eventfd, eventfdRead, eventfdWrite, closeFd, flock, fallocate, alignedBuffer on `exports`.
void InitFdUtil(Napi::Env env, Napi::Object exports);

}  // namespace tern
