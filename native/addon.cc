// Module entry: openKvm plus the eventfd, eventfd-watcher, fd-passing, file-writing and block-queue helpers.
#include <napi.h>

#include "block_queue.h"
#include "net_queue.h"
#include "tap.h"
#include "common.h"
#include "eventfd_watcher.h"
#include "fd_passing.h"
#include "fd_util.h"
#include "page_scan.h"
#include "pwrite_runs.h"
#include "xxh64.h"
#include "kvm_objects.h"

namespace tern {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  data->kvmCtor = Napi::Persistent(Kvm::Define(env));
  data->vmCtor = Napi::Persistent(Vm::Define(env));
  data->vcpuCtor = Napi::Persistent(Vcpu::Define(env));
  env.SetInstanceData<AddonData>(data);
  exports.Set("openKvm", Napi::Function::New(env, Guarded<Kvm::Open>, "openKvm"));
  InitFdUtil(env, exports);
  InitEventfdWatcher(env, exports);
  InitFdPassing(env, exports);
  InitPageScan(env, exports);
  InitPwriteRuns(env, exports);
  InitXxh64(env, exports);
  InitBlockQueue(env, exports);
  InitNetQueue(env, exports);
  InitTap(env, exports);
  return exports;
}

}  // namespace tern

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return tern::Init(env, exports); }

NODE_API_MODULE(tern_native, InitModule)
