// serveNetQueue: a virtio-net queue served by a native thread against a tap (net_queue.cc).
#pragma once

#include <napi.h>

namespace tern {

void InitNetQueue(Napi::Env env, Napi::Object exports);

}  // namespace tern
