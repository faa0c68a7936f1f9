// watchEventfds: a native thread per watcher waits on eventfds (the virtio doorbells KVM
// signals through ioeventfds) so that no JavaScript-side thread has to block on them.
#pragma once

#include <napi.h>

namespace tern {

// Registers watchEventfds on `exports`.
void InitEventfdWatcher(Napi::Env env, Napi::Object exports);

}  // namespace tern
