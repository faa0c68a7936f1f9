#pragma once

#include <napi.h>

namespace tern {

// Registers sendWithFds and recvWithFds (SCM_RIGHTS over a UNIX stream socket) on `exports`.
void InitFdPassing(Napi::Env env, Napi::Object exports);

}  // namespace tern
