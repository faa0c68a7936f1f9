// serveBlockQueue: a virtio-blk request queue served by a native thread (block_queue.cc).
#pragma once

#include <napi.h>

namespace tern {

void InitBlockQueue(Napi::Env env, Napi::Object exports);

}  // namespace tern
