// vCPU: register access and the native thread that loops on KVM_RUN and hands exits to
// JavaScript through a thread-safe function.
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <system_error>
#include <vector>

#include "kvm_abi.h"
#include "kvm_objects.h"
#include "vcpu_seccomp.h"

namespace tern {

namespace {

// Real-time signal used only to kick a vCPU thread out of KVM_RUN (Node owns SIGUSR1).
int KickSignal() { return SIGRTMIN + 3; }

void NoopHandler(int) {}

void InstallKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = NoopHandler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(KickSignal(), &sa, nullptr);
  });
}

enum class VState { Idle, Running, InHandler, Parked, Finished };

}  // namespace

struct ExitMsg;
static void CallJs(Napi::Env env, Napi::Function fn, std::nullptr_t* ctx, ExitMsg* msg);
using ExitTsfn = Napi::TypedThreadSafeFunction<std::nullptr_t, ExitMsg, CallJs>;

struct VcpuCore {
  int fd = -1;
  kvm_run* run = nullptr;
  size_t runSize = 0;

  std::mutex mu;
  std::condition_variable cv;
  VState state = VState::Idle;  // guarded by mu
  std::atomic<bool> stopReq{false};
  std::atomic<bool> pauseReq{false};
  pthread_t tid{};
  ExitTsfn tsfn;
  // Set by start() for the thread it creates.
  std::vector<sock_filter> seccompProgram;
  bool probeForbiddenSyscall = false;

  ~VcpuCore() { CloseFds(); }

  void CloseFds() {
    if (run) munmap(run, runSize);
    run = nullptr;
    if (fd >= 0) close(fd);
    fd = -1;
  }

  void SetImmediateExit(uint8_t v) { __atomic_store_n(&run->immediate_exit, v, __ATOMIC_SEQ_CST); }

  // Caller holds mu.
  void KickLocked() {
    if (state == VState::Running || state == VState::InHandler) {
      SetImmediateExit(1);
      pthread_kill(tid, KickSignal());
    }
  }

  void RequestStop() {
    std::lock_guard<std::mutex> lk(mu);
    stopReq = true;
    KickLocked();
    cv.notify_all();
  }

  // The thread's body: RunLoop, with no exception let out (one would terminate the process).
  // `stopped` is allocated by start() so that ending never needs memory.
  void ThreadMain(std::shared_ptr<VcpuCore> self, ExitMsg* stopped) noexcept;
  void RunLoop(const std::shared_ptr<VcpuCore>& self);
  bool Report(ExitMsg& m);
  void ReportAsync(ExitMsg* m);
  void Park(const std::shared_ptr<VcpuCore>& self);
};

struct ExitMsg {
  enum Kind { kIo, kMmio, kHlt, kShutdown, kSystemEvent, kFailEntry, kInternalError, kUnknown, kPaused, kStopped, kError, kProbe };
  Kind kind = kUnknown;
  bool flag = false;  // io: out, mmio: write
  uint32_t port = 0;
  uint32_t size = 0;
  uint64_t address = 0;
  uint64_t data = 0;
  uint32_t num = 0;    // system_event type, internal_error suberror, unknown reason
  uint64_t num64 = 0;  // fail_entry reason
  std::vector<uint64_t> extra;
  std::string message;
  // Filled by the JavaScript side.
  uint64_t reply = 0;
  bool stop = false;
  std::atomic<bool> done{false};
  bool owned = false;  // heap-allocated and not waited for: deleted after delivery
  std::shared_ptr<VcpuCore> core;
};

static Napi::Object BuildExit(Napi::Env env, const ExitMsg& m) {
  Napi::Object o = Napi::Object::New(env);
  auto kind = [&](const char* k) { o.Set("kind", Napi::String::New(env, k)); };
  switch (m.kind) {
    case ExitMsg::kIo:
      kind("io");
      o.Set("direction", Napi::String::New(env, m.flag ? "out" : "in"));
      o.Set("port", Napi::Number::New(env, m.port));
      o.Set("size", Napi::Number::New(env, m.size));
      o.Set("data", Napi::Number::New(env, static_cast<double>(m.data)));
      break;
    case ExitMsg::kMmio:
      kind("mmio");
      o.Set("direction", Napi::String::New(env, m.flag ? "write" : "read"));
      o.Set("address", Big(env, m.address));
      o.Set("size", Napi::Number::New(env, m.size));
      o.Set("data", Big(env, m.data));
      break;
    case ExitMsg::kHlt: kind("hlt"); break;
    case ExitMsg::kShutdown: kind("shutdown"); break;
    case ExitMsg::kSystemEvent: {
      kind("system_event");
      o.Set("type", Napi::Number::New(env, m.num));
      Napi::Array a = Napi::Array::New(env, m.extra.size());
      for (size_t i = 0; i < m.extra.size(); i++) a.Set(i, Big(env, m.extra[i]));
      o.Set("data", a);
      break;
    }
    case ExitMsg::kFailEntry:
      kind("fail_entry");
      o.Set("reason", Big(env, m.num64));
      break;
    case ExitMsg::kInternalError: {
      kind("internal_error");
      o.Set("suberror", Napi::Number::New(env, m.num));
      Napi::Array a = Napi::Array::New(env, m.extra.size());
      for (size_t i = 0; i < m.extra.size(); i++) a.Set(i, Big(env, m.extra[i]));
      o.Set("data", a);
      break;
    }
    case ExitMsg::kUnknown:
      kind("unknown");
      o.Set("reason", Napi::Number::New(env, m.num));
      break;
    case ExitMsg::kPaused: kind("paused"); break;
    case ExitMsg::kStopped: kind("stopped"); break;
    case ExitMsg::kError:
      kind("error");
      o.Set("message", Napi::String::New(env, m.message));
      break;
    case ExitMsg::kProbe:
      kind("probe");
      o.Set("syscall", Napi::String::New(env, "socket"));
      o.Set("result", Napi::String::New(env, m.num == 0 ? "ok" : ErrnoName(static_cast<int>(m.num))));
      break;
  }
  return o;
}

static void Finish(ExitMsg* m) {
  if (m->owned) {
    delete m;
    return;
  }
  // The waiting thread owns m (and may drop the core) once done is seen: notify under the
  // lock so neither is touched after it is released.
  VcpuCore* c = m->core.get();
  std::lock_guard<std::mutex> lk(c->mu);
  m->done = true;
  c->cv.notify_all();
}

// The handler failed (threw, or returned what no register can hold): it gets one 'error'
// exit naming the fault, then the vCPU stops.
static void HandlerFailed(Napi::Env env, Napi::Function fn, ExitMsg* m) {
  std::string message = DescribeException(env, env.GetAndClearPendingException(), "exception in vCPU exit handler");
  m->stop = true;
  if (m->kind != ExitMsg::kStopped && m->kind != ExitMsg::kError) {
    ExitMsg err;
    err.kind = ExitMsg::kError;
    err.message = message;
    fn.Call({BuildExit(env, err)});
    if (env.IsExceptionPending()) env.GetAndClearPendingException();
  }
  if (m->core && m->kind != ExitMsg::kStopped) m->core->RequestStop();
}

static void CallJs(Napi::Env env, Napi::Function fn, std::nullptr_t*, ExitMsg* m) {
  if (m == nullptr) return;
  if (env == nullptr || fn.IsEmpty()) {  // environment teardown
    m->stop = true;
    Finish(m);
    return;
  }
  // Runs on the JavaScript thread from libuv: nothing may be thrown past it, and the vCPU
  // thread waits for Finish whatever happens here.
  try {
    Napi::HandleScope scope(env);
    Napi::Value r = fn.Call({BuildExit(env, *m)});
    if (!env.IsExceptionPending()) {
      if (r.IsString()) {
        if (r.As<Napi::String>().Utf8Value() == "stop") m->stop = true;
      } else if (r.IsNumber() || r.IsBigInt()) {
        uint64_t v;
        if (ToUint(env, r, "the vCPU exit handler's return value", UINT64_MAX, &v)) m->reply = v;
      }
    }
    if (env.IsExceptionPending()) HandlerFailed(env, fn, m);
  } catch (...) {
    m->stop = true;
    if (env.IsExceptionPending()) env.GetAndClearPendingException();
    try {
      if (m->core && m->kind != ExitMsg::kStopped) m->core->RequestStop();
    } catch (...) {
      // m->stop alone ends the thread after this exit.
    }
  }
  Finish(m);
}

bool VcpuCore::Report(ExitMsg& m) {
  {
    std::lock_guard<std::mutex> lk(mu);
    state = VState::InHandler;
  }
  if (tsfn.BlockingCall(&m) != napi_ok) {
    std::lock_guard<std::mutex> lk(mu);
    state = VState::Running;
    m.stop = true;
    return false;
  }
  std::unique_lock<std::mutex> lk(mu);
  cv.wait(lk, [&] { return m.done.load(); });
  state = VState::Running;
  return true;
}

void VcpuCore::ReportAsync(ExitMsg* m) {
  m->owned = true;
  if (tsfn.BlockingCall(m) != napi_ok) delete m;
}

void VcpuCore::Park(const std::shared_ptr<VcpuCore>& self) {
  {
    std::lock_guard<std::mutex> lk(mu);
    if (stopReq) return;
    // A resume() since the request was read withdrew it: run on (the loop clears a kick's
    // immediate_exit on the EINTR it causes).
    if (!pauseReq) return;
    state = VState::Parked;
    pauseReq = false;
  }
  auto* m = new ExitMsg();
  m->kind = ExitMsg::kPaused;
  m->core = self;
  ReportAsync(m);
  {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return state != VState::Parked || stopReq; });
    state = VState::Running;
  }
  // Clear only after waking and before the flags are read again, so a racing
  // requestPause() is never lost.
  SetImmediateExit(0);
}

void VcpuCore::ThreadMain(std::shared_ptr<VcpuCore> self, ExitMsg* stopped) noexcept {
  // Copied while the exception is alive, without allocating.
  char failure[160] = "";
  try {
    RunLoop(self);
  } catch (const std::bad_alloc&) {
    snprintf(failure, sizeof failure, "%s", "out of memory");
  } catch (const std::exception& e) {
    snprintf(failure, sizeof failure, "%s", e.what());
  } catch (...) {
    snprintf(failure, sizeof failure, "%s", "unknown exception");
  }
  if (failure[0]) {
    try {
      ExitMsg m;
      m.kind = ExitMsg::kError;
      m.message = std::string("vCPU thread failed: ") + failure;
      m.core = self;
      Report(m);
    } catch (...) {
      // No memory even for the report: 'stopped' below still tells JavaScript the thread ended.
    }
  }
  try {
    std::lock_guard<std::mutex> lk(mu);
    state = VState::Finished;
  } catch (...) {
    state = VState::Finished;
  }
  ReportAsync(stopped);
  tsfn.Release();
}

void VcpuCore::RunLoop(const std::shared_ptr<VcpuCore>& self) {
  sigset_t set;
  sigfillset(&set);
  sigdelset(&set, KickSignal());
  sigdelset(&set, SIGSYS);  // a seccomp trap reports itself (InstallSigsysReporter)
  pthread_sigmask(SIG_SETMASK, &set, nullptr);

  // From here on this thread may only make the calls the vCPU filter allows.
  if (int err = InstallSeccompFilter(seccompProgram)) {
    ExitMsg m;
    m.kind = ExitMsg::kError;
    m.message = std::string("installing the vCPU seccomp filter failed: ") + strerror(err) + " (" + ErrnoName(err) + ")";
    m.core = self;
    Report(m);
    return;
  }
  if (probeForbiddenSyscall) {
    ExitMsg m;
    m.kind = ExitMsg::kProbe;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    m.num = fd < 0 ? static_cast<uint32_t>(errno) : 0;
    if (fd >= 0) close(fd);  // only reached without a filter, or with one that logs
    m.core = self;
    Report(m);
    if (m.stop) return;
  }

  // After an I/O or MMIO exit the instruction is completed by the next KVM_RUN; before
  // parking or stopping, run once with immediate_exit so the saved state is consistent.
  bool pendingCompletion = false;
  for (;;) {
    bool stopping = stopReq;
    bool pausing = pauseReq;
    if (stopping || pausing) {
      if (!pendingCompletion) {
        if (stopping) break;
        Park(self);
        continue;
      }
      SetImmediateExit(1);
    }
    int rc = ioctl(fd, KVM_RUN, 0UL);
    int err = errno;
    pendingCompletion = false;
    if (rc < 0) {
      if (err == EINTR || err == EAGAIN) {
        SetImmediateExit(0);
        continue;
      }
      ExitMsg m;
      m.kind = ExitMsg::kError;
      m.message = std::string("KVM_RUN failed: ") + strerror(err) + " (" + ErrnoName(err) + ")";
      m.core = self;
      Report(m);
      return;
    }

    bool terminal = false;
    bool stopAfter = false;
    kvm_run* r = run;
    switch (r->exit_reason) {
      case KVM_EXIT_IO: {
        uint8_t* base = reinterpret_cast<uint8_t*>(r) + r->io.data_offset;
        uint32_t size = r->io.size;
        for (uint32_t i = 0; i < r->io.count && !stopAfter; i++) {
          uint8_t* p = base + i * size;
          ExitMsg m;
          m.kind = ExitMsg::kIo;
          m.flag = r->io.direction == KVM_EXIT_IO_OUT;
          m.port = r->io.port;
          m.size = size;
          if (m.flag) {
            uint64_t v = 0;
            memcpy(&v, p, size);
            m.data = v;
          }
          m.core = self;
          Report(m);
          if (!m.flag) memcpy(p, &m.reply, size);
          if (m.stop) stopAfter = true;
        }
        pendingCompletion = true;
        break;
      }
      case KVM_EXIT_MMIO: {
        ExitMsg m;
        m.kind = ExitMsg::kMmio;
        m.flag = r->mmio.is_write;
        m.address = r->mmio.phys_addr;
        m.size = r->mmio.len;
        if (m.flag) {
          uint64_t v = 0;
          memcpy(&v, r->mmio.data, std::min<uint32_t>(r->mmio.len, 8));
          m.data = v;
        }
        m.core = self;
        Report(m);
        if (!m.flag) memcpy(r->mmio.data, &m.reply, std::min<uint32_t>(r->mmio.len, 8));
        if (m.stop) stopAfter = true;
        pendingCompletion = true;
        break;
      }
      case KVM_EXIT_HLT: {
        ExitMsg m;
        m.kind = ExitMsg::kHlt;
        m.core = self;
        Report(m);
        if (m.stop) stopAfter = true;
        break;
      }
      case KVM_EXIT_INTR:
        SetImmediateExit(0);
        break;
      case KVM_EXIT_SHUTDOWN:
      case KVM_EXIT_SYSTEM_EVENT:
      case KVM_EXIT_FAIL_ENTRY:
      case KVM_EXIT_INTERNAL_ERROR:
      default: {
        ExitMsg m;
        m.core = self;
        if (r->exit_reason == KVM_EXIT_SHUTDOWN) {
          m.kind = ExitMsg::kShutdown;
        } else if (r->exit_reason == KVM_EXIT_SYSTEM_EVENT) {
          m.kind = ExitMsg::kSystemEvent;
          m.num = r->system_event.type;
          for (uint32_t i = 0; i < r->system_event.ndata && i < 16; i++) m.extra.push_back(r->system_event.data[i]);
        } else if (r->exit_reason == KVM_EXIT_FAIL_ENTRY) {
          m.kind = ExitMsg::kFailEntry;
          m.num64 = r->fail_entry.hardware_entry_failure_reason;
        } else if (r->exit_reason == KVM_EXIT_INTERNAL_ERROR) {
          m.kind = ExitMsg::kInternalError;
          m.num = r->internal.suberror;
          for (uint32_t i = 0; i < r->internal.ndata && i < 16; i++) m.extra.push_back(r->internal.data[i]);
        } else {
          m.kind = ExitMsg::kUnknown;
          m.num = r->exit_reason;
        }
        Report(m);
        terminal = true;
        break;
      }
    }
    if (terminal) return;
    if (stopAfter) {
      std::lock_guard<std::mutex> lk(mu);
      stopReq = true;
    }
  }
}

// ---- conversions ----------------------------------------------------------------------------

namespace {

#define TERN_REGS(X) \
  X(rax) X(rbx) X(rcx) X(rdx) X(rsi) X(rdi) X(rsp) X(rbp) X(r8) X(r9) X(r10) X(r11) X(r12) X(r13) X(r14) X(r15) X(rip) X(rflags)

Napi::Object SegmentToJs(Napi::Env env, const kvm_segment& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("base", Big(env, s.base));
  o.Set("limit", Napi::Number::New(env, s.limit));
  o.Set("selector", Napi::Number::New(env, s.selector));
  o.Set("type", Napi::Number::New(env, s.type));
  o.Set("present", Napi::Number::New(env, s.present));
  o.Set("dpl", Napi::Number::New(env, s.dpl));
  o.Set("db", Napi::Number::New(env, s.db));
  o.Set("s", Napi::Number::New(env, s.s));
  o.Set("l", Napi::Number::New(env, s.l));
  o.Set("g", Napi::Number::New(env, s.g));
  o.Set("avl", Napi::Number::New(env, s.avl));
  o.Set("unusable", Napi::Number::New(env, s.unusable));
  return o;
}

bool SegmentFromJs(Napi::Env env, Napi::Value v, const char* name, kvm_segment* s) {
  if (!v.IsObject()) {
    ThrowTypeError(env, std::string("setSregs: '") + name + "' must be an object");
    return false;
  }
  Napi::Object o = v.As<Napi::Object>();
  s->unusable = 0;
  return GetField(o, "base", &s->base) && GetField(o, "limit", &s->limit) && GetField(o, "selector", &s->selector) &&
         GetField(o, "type", &s->type) && GetField(o, "present", &s->present) && GetField(o, "dpl", &s->dpl) &&
         GetField(o, "db", &s->db) && GetField(o, "s", &s->s) && GetField(o, "l", &s->l) && GetField(o, "g", &s->g) &&
         GetField(o, "avl", &s->avl) && GetOptField(o, "unusable", &s->unusable);
}

Napi::Object DtableToJs(Napi::Env env, const kvm_dtable& d) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("base", Big(env, d.base));
  o.Set("limit", Napi::Number::New(env, d.limit));
  return o;
}

bool DtableFromJs(Napi::Env env, Napi::Value v, const char* name, kvm_dtable* d) {
  if (!v.IsObject()) {
    ThrowTypeError(env, std::string("setSregs: '") + name + "' must be an object");
    return false;
  }
  return GetField(v.As<Napi::Object>(), "base", &d->base) && GetField(v.As<Napi::Object>(), "limit", &d->limit);
}

bool ObjectArg(const Napi::CallbackInfo& info, const char* what, Napi::Object* out) {
  if (info.Length() < 1 || !info[0].IsObject()) {
    ThrowTypeError(info.Env(), std::string(what) + ": expected an object");
    return false;
  }
  *out = info[0].As<Napi::Object>();
  return true;
}

// KVM takes at most 256 CPUID entries and 256 MSRs per call; refusing far longer arrays here
// keeps a caller from sizing a native buffer.
constexpr uint32_t kMaxEntries = 4096;

bool CheckEntryCount(Napi::Env env, const char* what, uint32_t n) {
  if (n <= kMaxEntries) return true;
  Napi::RangeError::New(env, std::string(what) + ": at most " + std::to_string(kMaxEntries) + " entries, got " + std::to_string(n))
      .ThrowAsJavaScriptException();
  return false;
}

bool DecodeArg(const Napi::CallbackInfo& info, const char* what, std::vector<uint8_t>* out) {
  if (info.Length() < 1 || !info[0].IsString() || !Base64Decode(info[0].As<Napi::String>().Utf8Value(), out)) {
    ThrowTypeError(info.Env(), std::string(what) + ": expected a base64 string");
    return false;
  }
  return true;
}

}  // namespace

// ---- Vcpu -----------------------------------------------------------------------------------

Napi::Function Vcpu::Define(Napi::Env env) {
  return DefineClass(env, "Vcpu",
                     {
                         InstanceAccessor<&Vcpu::Guarded<&Vcpu::Id>>("id"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetCpuid>>("setCpuid"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetRegs>>("getRegs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetRegs>>("setRegs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetSregs>>("getSregs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetSregs>>("setSregs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetFpu>>("getFpu"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetFpu>>("setFpu"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetXsave>>("getXsave"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetXsave>>("setXsave"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetXcrs>>("getXcrs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetXcrs>>("setXcrs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetMsrs>>("getMsrs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetMsrs>>("setMsrs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetLapic>>("getLapic"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetLapic>>("setLapic"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetMpState>>("getMpState"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetMpState>>("setMpState"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::Translate>>("translate"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetVcpuEvents>>("getVcpuEvents"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetVcpuEvents>>("setVcpuEvents"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::GetDebugRegs>>("getDebugRegs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::SetDebugRegs>>("setDebugRegs"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::KvmclockCtrl>>("kvmclockCtrl"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::Start>>("start"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::RequestPause>>("requestPause"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::Resume>>("resume"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::Stop>>("stop"),
                         InstanceMethod<&Vcpu::Guarded<&Vcpu::Close>>("close"),
                     });
}

Vcpu::Vcpu(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Vcpu>(info) {
  GuardCall(info.Env(), [&] {
    Init(info);
    return Napi::Value();
  });
}

void Vcpu::Init(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // On failure the fd stays the caller's to close.
  if (info.Length() < 5 || !info[0].IsString() || info[0].As<Napi::String>().Utf8Value() != kInternalToken) {
    ThrowTypeError(env, "this object is created by the native addon, not with new");
    return;
  }
  int fd = info[1].As<Napi::Number>().Int32Value();
  core_ = std::make_shared<VcpuCore>();
  id_ = info[2].As<Napi::Number>().Uint32Value();
  size_t runSize = info[3].As<Napi::Number>().Uint32Value();
  xsaveSize_ = info[4].As<Napi::Number>().Int32Value();
  void* p = mmap(nullptr, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    ThrowErrno(env, "mmap(kvm_run)", errno);
    return;
  }
  core_->fd = fd;
  core_->run = static_cast<kvm_run*>(p);
  core_->runSize = runSize;
}

Vcpu::~Vcpu() {
  try {
    StopThread();
  } catch (...) {
    // A destructor runs from the garbage collector: nothing may leave it. The thread, if
    // any, holds its own reference to the core.
  }
}

void Vcpu::StopThread() {
  if (core_ && thread_.joinable()) {
    bool finished;
    {
      std::lock_guard<std::mutex> lk(core_->mu);
      finished = core_->state == VState::Finished;
    }
    if (finished) {
      thread_.join();
    } else {
      // The thread keeps its own reference to the core and ends on its own.
      core_->RequestStop();
      thread_.detach();
    }
  }
}

bool Vcpu::CheckIdle(Napi::Env env) {
  if (core_->fd < 0) {
    ThrowError(env, "vCPU is closed", "EBADF");
    return false;
  }
  std::lock_guard<std::mutex> lk(core_->mu);
  if (core_->state == VState::Running) {
    ThrowError(env, "vCPU " + std::to_string(id_) + " is running; pause it before accessing its state", "EBUSY");
    return false;
  }
  return true;
}

Napi::Value Vcpu::Id(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), id_); }

Napi::Value Vcpu::SetCpuid(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "setCpuid: expected an array of entries");
    return env.Undefined();
  }
  Napi::Array arr = info[0].As<Napi::Array>();
  uint32_t n = arr.Length();
  if (!CheckEntryCount(env, "setCpuid", n)) return env.Undefined();
  std::vector<uint8_t> buf(sizeof(abi::Cpuid2) + n * sizeof(kvm_cpuid_entry2), 0);
  auto* c = reinterpret_cast<abi::Cpuid2*>(buf.data());
  c->nent = n;
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsObject()) {
      ThrowTypeError(env, "setCpuid: entry " + std::to_string(i) + " is not an object");
      return env.Undefined();
    }
    Napi::Object o = v.As<Napi::Object>();
    kvm_cpuid_entry2& e = abi::Entries<kvm_cpuid_entry2>(c)[i];
    if (!GetField(o, "function", &e.function) || !GetField(o, "index", &e.index) || !GetField(o, "flags", &e.flags) ||
        !GetField(o, "eax", &e.eax) || !GetField(o, "ebx", &e.ebx) || !GetField(o, "ecx", &e.ecx) ||
        !GetField(o, "edx", &e.edx))
      return env.Undefined();
  }
  if (IoctlRetry(core_->fd, abi::kSetCpuid2, c) < 0) ThrowErrno(env, "KVM_SET_CPUID2", errno);
  return env.Undefined();
}

Napi::Value Vcpu::GetRegs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  kvm_regs r{};
  if (IoctlRetry(core_->fd, KVM_GET_REGS, &r) < 0) {
    ThrowErrno(env, "KVM_GET_REGS", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
#define X(n) o.Set(#n, Big(env, r.n));
  TERN_REGS(X)
#undef X
  return o;
}

Napi::Value Vcpu::SetRegs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  Napi::Object o;
  if (!ObjectArg(info, "setRegs", &o)) return env.Undefined();
  kvm_regs r{};
#define X(n) \
  if (!GetField(o, #n, &r.n)) return env.Undefined();
  TERN_REGS(X)
#undef X
  if (IoctlRetry(core_->fd, KVM_SET_REGS, &r) < 0) ThrowErrno(env, "KVM_SET_REGS", errno);
  return env.Undefined();
}

Napi::Value Vcpu::GetSregs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  kvm_sregs s{};
  if (IoctlRetry(core_->fd, KVM_GET_SREGS, &s) < 0) {
    ThrowErrno(env, "KVM_GET_SREGS", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("cs", SegmentToJs(env, s.cs));
  o.Set("ds", SegmentToJs(env, s.ds));
  o.Set("es", SegmentToJs(env, s.es));
  o.Set("fs", SegmentToJs(env, s.fs));
  o.Set("gs", SegmentToJs(env, s.gs));
  o.Set("ss", SegmentToJs(env, s.ss));
  o.Set("tr", SegmentToJs(env, s.tr));
  o.Set("ldt", SegmentToJs(env, s.ldt));
  o.Set("gdt", DtableToJs(env, s.gdt));
  o.Set("idt", DtableToJs(env, s.idt));
  o.Set("cr0", Big(env, s.cr0));
  o.Set("cr2", Big(env, s.cr2));
  o.Set("cr3", Big(env, s.cr3));
  o.Set("cr4", Big(env, s.cr4));
  o.Set("cr8", Big(env, s.cr8));
  o.Set("efer", Big(env, s.efer));
  o.Set("apic_base", Big(env, s.apic_base));
  Napi::Array bm = Napi::Array::New(env, 4);
  for (uint32_t i = 0; i < 4; i++) bm.Set(i, Big(env, s.interrupt_bitmap[i]));
  o.Set("interrupt_bitmap", bm);
  return o;
}

Napi::Value Vcpu::SetSregs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  Napi::Object o;
  if (!ObjectArg(info, "setSregs", &o)) return env.Undefined();
  kvm_sregs s{};
  if (!SegmentFromJs(env, o.Get("cs"), "cs", &s.cs) || !SegmentFromJs(env, o.Get("ds"), "ds", &s.ds) ||
      !SegmentFromJs(env, o.Get("es"), "es", &s.es) || !SegmentFromJs(env, o.Get("fs"), "fs", &s.fs) ||
      !SegmentFromJs(env, o.Get("gs"), "gs", &s.gs) || !SegmentFromJs(env, o.Get("ss"), "ss", &s.ss) ||
      !SegmentFromJs(env, o.Get("tr"), "tr", &s.tr) || !SegmentFromJs(env, o.Get("ldt"), "ldt", &s.ldt) ||
      !DtableFromJs(env, o.Get("gdt"), "gdt", &s.gdt) || !DtableFromJs(env, o.Get("idt"), "idt", &s.idt) ||
      !GetField(o, "cr0", &s.cr0) || !GetField(o, "cr2", &s.cr2) ||
      !GetField(o, "cr3", &s.cr3) || !GetField(o, "cr4", &s.cr4) ||
      !GetField(o, "cr8", &s.cr8) ||
      !GetField(o, "efer", &s.efer) ||
      !GetField(o, "apic_base", &s.apic_base))
    return env.Undefined();
  Napi::Value bm = o.Get("interrupt_bitmap");
  if (bm.IsArray()) {
    Napi::Array a = bm.As<Napi::Array>();
    for (uint32_t i = 0; i < 4 && i < a.Length(); i++) {
      uint64_t w;
      if (!ToUint(env, a.Get(i), "setSregs: interrupt_bitmap[" + std::to_string(i) + "]", UINT64_MAX, &w))
        return env.Undefined();
      s.interrupt_bitmap[i] = w;
    }
  }
  if (IoctlRetry(core_->fd, KVM_SET_SREGS, &s) < 0) ThrowErrno(env, "KVM_SET_SREGS", errno);
  return env.Undefined();
}

Napi::Value Vcpu::GetFpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  kvm_fpu f{};
  if (IoctlRetry(core_->fd, KVM_GET_FPU, &f) < 0) {
    ThrowErrno(env, "KVM_GET_FPU", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("fcw", Napi::Number::New(env, f.fcw));
  o.Set("fsw", Napi::Number::New(env, f.fsw));
  o.Set("ftwx", Napi::Number::New(env, f.ftwx));
  o.Set("last_opcode", Napi::Number::New(env, f.last_opcode));
  o.Set("last_ip", Big(env, f.last_ip));
  o.Set("last_dp", Big(env, f.last_dp));
  o.Set("mxcsr", Napi::Number::New(env, f.mxcsr));
  uint8_t regs[sizeof f.fpr + sizeof f.xmm];
  memcpy(regs, f.fpr, sizeof f.fpr);
  memcpy(regs + sizeof f.fpr, f.xmm, sizeof f.xmm);
  o.Set("registers", Napi::String::New(env, Base64Encode(regs, sizeof regs)));
  return o;
}

Napi::Value Vcpu::SetFpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  Napi::Object o;
  if (!ObjectArg(info, "setFpu", &o)) return env.Undefined();
  kvm_fpu f{};
  if (!GetField(o, "fcw", &f.fcw) || !GetField(o, "fsw", &f.fsw) || !GetField(o, "ftwx", &f.ftwx) ||
      !GetField(o, "last_opcode", &f.last_opcode) || !GetField(o, "last_ip", &f.last_ip) ||
      !GetField(o, "last_dp", &f.last_dp) || !GetField(o, "mxcsr", &f.mxcsr))
    return env.Undefined();
  std::vector<uint8_t> regs;
  Napi::Value rv = o.Get("registers");
  if (!rv.IsString() || !Base64Decode(rv.As<Napi::String>().Utf8Value(), &regs) ||
      regs.size() != sizeof f.fpr + sizeof f.xmm) {
    ThrowTypeError(env, "setFpu: 'registers' must be base64 of " + std::to_string(sizeof f.fpr + sizeof f.xmm) + " bytes");
    return env.Undefined();
  }
  memcpy(f.fpr, regs.data(), sizeof f.fpr);
  memcpy(f.xmm, regs.data() + sizeof f.fpr, sizeof f.xmm);
  if (IoctlRetry(core_->fd, KVM_SET_FPU, &f) < 0) ThrowErrno(env, "KVM_SET_FPU", errno);
  return env.Undefined();
}

Napi::Value Vcpu::GetBlob(const Napi::CallbackInfo& info, unsigned long req, const char* name, size_t size) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  std::vector<uint8_t> buf(size, 0);
  if (IoctlRetry(core_->fd, req, buf.data()) < 0) {
    ThrowErrno(env, name, errno);
    return env.Undefined();
  }
  return Napi::String::New(env, Base64Encode(buf.data(), buf.size()));
}

Napi::Value Vcpu::SetBlob(const Napi::CallbackInfo& info, unsigned long req, const char* name, size_t size) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  std::vector<uint8_t> buf;
  if (!DecodeArg(info, name, &buf)) return env.Undefined();
  if (buf.size() != size) {
    ThrowTypeError(env, std::string(name) + ": expected " + std::to_string(size) + " bytes, got " + std::to_string(buf.size()));
    return env.Undefined();
  }
  if (IoctlRetry(core_->fd, req, buf.data()) < 0) ThrowErrno(env, name, errno);
  return env.Undefined();
}

Napi::Value Vcpu::GetXsave(const Napi::CallbackInfo& info) {
  if (xsaveSize_ > 0) {
    size_t size = std::max<size_t>(sizeof(abi::Xsave), static_cast<size_t>(xsaveSize_));
    return GetBlob(info, abi::kGetXsave2, "KVM_GET_XSAVE2", size);
  }
  return GetBlob(info, abi::kGetXsave, "KVM_GET_XSAVE", sizeof(abi::Xsave));
}

Napi::Value Vcpu::SetXsave(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  std::vector<uint8_t> buf;
  if (!DecodeArg(info, "KVM_SET_XSAVE", &buf)) return env.Undefined();
  // KVM reads as many bytes as KVM_CAP_XSAVE2 reports; a shorter image is zero-extended.
  size_t size = std::max<size_t>(sizeof(abi::Xsave), static_cast<size_t>(xsaveSize_));
  if (buf.size() > size) {
    ThrowTypeError(env, "KVM_SET_XSAVE: image of " + std::to_string(buf.size()) + " bytes exceeds " + std::to_string(size));
    return env.Undefined();
  }
  buf.resize(size, 0);
  if (IoctlRetry(core_->fd, abi::kSetXsave, buf.data()) < 0) ThrowErrno(env, "KVM_SET_XSAVE", errno);
  return env.Undefined();
}

Napi::Value Vcpu::GetXcrs(const Napi::CallbackInfo& info) { return GetBlob(info, KVM_GET_XCRS, "KVM_GET_XCRS", sizeof(kvm_xcrs)); }
Napi::Value Vcpu::SetXcrs(const Napi::CallbackInfo& info) { return SetBlob(info, KVM_SET_XCRS, "KVM_SET_XCRS", sizeof(kvm_xcrs)); }
Napi::Value Vcpu::GetLapic(const Napi::CallbackInfo& info) { return GetBlob(info, KVM_GET_LAPIC, "KVM_GET_LAPIC", sizeof(kvm_lapic_state)); }
Napi::Value Vcpu::SetLapic(const Napi::CallbackInfo& info) { return SetBlob(info, KVM_SET_LAPIC, "KVM_SET_LAPIC", sizeof(kvm_lapic_state)); }
Napi::Value Vcpu::GetVcpuEvents(const Napi::CallbackInfo& info) {
  return GetBlob(info, KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", sizeof(kvm_vcpu_events));
}
Napi::Value Vcpu::SetVcpuEvents(const Napi::CallbackInfo& info) {
  return SetBlob(info, KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", sizeof(kvm_vcpu_events));
}
Napi::Value Vcpu::GetDebugRegs(const Napi::CallbackInfo& info) {
  return GetBlob(info, KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", sizeof(kvm_debugregs));
}
Napi::Value Vcpu::SetDebugRegs(const Napi::CallbackInfo& info) {
  return SetBlob(info, KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", sizeof(kvm_debugregs));
}

Napi::Value Vcpu::GetMsrs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "getMsrs: expected an array of MSR indices");
    return env.Undefined();
  }
  Napi::Array idx = info[0].As<Napi::Array>();
  uint32_t n = idx.Length();
  if (!CheckEntryCount(env, "getMsrs", n)) return env.Undefined();
  std::vector<uint8_t> buf(sizeof(abi::Msrs) + n * sizeof(kvm_msr_entry), 0);
  auto* m = reinterpret_cast<abi::Msrs*>(buf.data());
  kvm_msr_entry* entries = abi::Entries<kvm_msr_entry>(m);
  m->nmsrs = n;
  for (uint32_t i = 0; i < n; i++) {
    uint64_t v;
    if (!ToUint(env, idx.Get(i), "getMsrs: index " + std::to_string(i), UINT32_MAX, &v)) return env.Undefined();
    entries[i].index = static_cast<uint32_t>(v);
  }
  int rc = IoctlRetry(core_->fd, abi::kGetMsrs, m);
  if (rc < 0) {
    ThrowErrno(env, "KVM_GET_MSRS", errno);
    return env.Undefined();
  }
  // KVM stops at the first MSR it cannot read: the result is that prefix.
  Napi::Array out = Napi::Array::New(env, rc);
  for (int i = 0; i < rc; i++) {
    Napi::Object e = Napi::Object::New(env);
    e.Set("index", Napi::Number::New(env, entries[i].index));
    e.Set("data", Big(env, entries[i].data));
    out.Set(i, e);
  }
  return out;
}

Napi::Value Vcpu::SetMsrs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "setMsrs: expected an array of {index, data}");
    return env.Undefined();
  }
  Napi::Array arr = info[0].As<Napi::Array>();
  uint32_t n = arr.Length();
  if (!CheckEntryCount(env, "setMsrs", n)) return env.Undefined();
  std::vector<uint8_t> buf(sizeof(abi::Msrs) + n * sizeof(kvm_msr_entry), 0);
  auto* m = reinterpret_cast<abi::Msrs*>(buf.data());
  kvm_msr_entry* entries = abi::Entries<kvm_msr_entry>(m);
  m->nmsrs = n;
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsObject()) {
      ThrowTypeError(env, "setMsrs: entry " + std::to_string(i) + " is not an object");
      return env.Undefined();
    }
    if (!GetField(v.As<Napi::Object>(), "index", &entries[i].index) || !GetField(v.As<Napi::Object>(), "data", &entries[i].data))
      return env.Undefined();
  }
  int rc = IoctlRetry(core_->fd, abi::kSetMsrs, m);
  if (rc < 0) {
    ThrowErrno(env, "KVM_SET_MSRS", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

Napi::Value Vcpu::GetMpState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  kvm_mp_state s{};
  if (IoctlRetry(core_->fd, KVM_GET_MP_STATE, &s) < 0) {
    ThrowErrno(env, "KVM_GET_MP_STATE", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, s.mp_state);
}

// A guest virtual address through the vCPU's own page tables, as it would fetch or read it now;
// null when its page is not mapped.
Napi::Value Vcpu::Translate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  kvm_translation t{};
  if (!ArgField(info, 0, "translate: address", &t.linear_address)) return env.Undefined();
  if (IoctlRetry(core_->fd, KVM_TRANSLATE, &t) < 0) {
    ThrowErrno(env, "KVM_TRANSLATE", errno);
    return env.Undefined();
  }
  if (!t.valid) return env.Null();
  return Big(env, t.physical_address);
}

Napi::Value Vcpu::SetMpState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  kvm_mp_state s{};
  if (!ArgField(info, 0, "setMpState: state", &s.mp_state)) return env.Undefined();
  if (IoctlRetry(core_->fd, KVM_SET_MP_STATE, &s) < 0) ThrowErrno(env, "KVM_SET_MP_STATE", errno);
  return env.Undefined();
}

Napi::Value Vcpu::KvmclockCtrl(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  if (IoctlRetry(core_->fd, KVM_KVMCLOCK_CTRL, nullptr) < 0) {
    int e = errno;
    // EINVAL: the guest has not enabled kvmclock; ENOTTY/EOPNOTSUPP: not supported.
    if (e == EINVAL || e == ENOTTY || e == EOPNOTSUPP) return Napi::Boolean::New(env, false);
    ThrowErrno(env, "KVM_KVMCLOCK_CTRL", e);
    return env.Undefined();
  }
  return Napi::Boolean::New(env, true);
}

Napi::Value Vcpu::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (core_->fd < 0) {
    ThrowError(env, "vCPU is closed", "EBADF");
    return env.Undefined();
  }
  if (info.Length() < 1 || !info[0].IsFunction()) {
    ThrowTypeError(env, "start: expected an exit handler function");
    return env.Undefined();
  }
  SeccompMode mode = SeccompMode::kTrap;
  bool probe = false;
  bool parked = false;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    if (!info[1].IsObject()) {
      ThrowTypeError(env, "start: options must be an object");
      return env.Undefined();
    }
    Napi::Object o = info[1].As<Napi::Object>();
    Napi::Value m = o.Get("seccomp");
    if (!m.IsUndefined() && (!m.IsString() || !ParseSeccompMode(m.As<Napi::String>().Utf8Value(), &mode))) {
      ThrowTypeError(env, "start: seccomp must be 'trap', 'log', 'errno' or 'off'");
      return env.Undefined();
    }
    probe = o.Get("probeForbiddenSyscall").ToBoolean().Value();
    parked = o.Get("parked").ToBoolean().Value();
    if (env.IsExceptionPending()) return env.Undefined();
  }
  {
    std::lock_guard<std::mutex> lk(core_->mu);
    if (core_->state != VState::Idle && core_->state != VState::Finished) {
      ThrowError(env, "vCPU " + std::to_string(id_) + " is already started", "EBUSY");
      return env.Undefined();
    }
  }
  if (thread_.joinable()) thread_.join();  // previous run has finished
  InstallKickHandler();
  if (mode == SeccompMode::kTrap) InstallSigsysReporter();
  core_->seccompProgram = VcpuSeccompProgram(mode, core_->fd);
  core_->probeForbiddenSyscall = probe;
  auto stopped = std::make_unique<ExitMsg>();
  stopped->kind = ExitMsg::kStopped;
  core_->tsfn = ExitTsfn::New(env, info[0].As<Napi::Function>(), "tern-vcpu", 0, 1, nullptr);
  if (env.IsExceptionPending()) return env.Undefined();
  core_->stopReq = false;
  // Set before the thread exists, so that it parks before its first KVM_RUN.
  core_->pauseReq = parked;
  core_->SetImmediateExit(0);
  std::lock_guard<std::mutex> lk(core_->mu);
  core_->state = VState::Running;
  std::shared_ptr<VcpuCore> c = core_;
  ExitMsg* s = stopped.get();
  try {
    thread_ = std::thread([c, s, id = id_] {
      NameThisThread("tern vcpu " + std::to_string(id));
      c->ThreadMain(c, s);
    });
  } catch (const std::system_error& e) {
    // No thread (EAGAIN: out of threads or memory): leave the vCPU startable again.
    core_->state = VState::Idle;
    core_->tsfn.Release();
    ThrowErrno(env, "starting the vCPU thread", e.code().value());
    return env.Undefined();
  }
  stopped.release();  // the thread owns it now
  core_->tid = thread_.native_handle();
  return env.Undefined();
}

Napi::Value Vcpu::RequestPause(const Napi::CallbackInfo& info) {
  std::lock_guard<std::mutex> lk(core_->mu);
  if (core_->state == VState::Running || core_->state == VState::InHandler) {
    core_->pauseReq = true;
    core_->KickLocked();
  }
  return info.Env().Undefined();
}

// Returns whether it woke a parked thread (whose 'paused' report JavaScript may not have taken yet).
// A thread asked to pause that has not parked yet (it was in a handler, or on its way out of
// KVM_RUN) has its request withdrawn: it runs on. Otherwise a resume that came first would be
// lost, and the thread would park later with nobody left to resume it (auto-converge's
// throttle resumes on a timer, and may end before its next period).
Napi::Value Vcpu::Resume(const Napi::CallbackInfo& info) {
  bool woke = false;
  {
    std::lock_guard<std::mutex> lk(core_->mu);
    if (core_->state == VState::Parked) {
      core_->state = VState::Running;
      woke = true;
    } else if (core_->state == VState::Running || core_->state == VState::InHandler) {
      // (a kick already sent only makes KVM_RUN return EINTR once: the loop enters it again)
      core_->pauseReq = false;
    }
  }
  core_->cv.notify_all();
  return Napi::Boolean::New(info.Env(), woke);
}

Napi::Value Vcpu::Stop(const Napi::CallbackInfo& info) {
  core_->RequestStop();
  return info.Env().Undefined();
}

Napi::Value Vcpu::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  {
    std::lock_guard<std::mutex> lk(core_->mu);
    if (core_->state != VState::Idle && core_->state != VState::Finished) {
      ThrowError(env, "vCPU " + std::to_string(id_) + " thread is still running; stop() it and wait for 'stopped'",
                 "EBUSY");
      return env.Undefined();
    }
  }
  if (thread_.joinable()) thread_.join();
  core_->CloseFds();
  return env.Undefined();
}

}  // namespace tern
