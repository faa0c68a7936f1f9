// vCPU: register access and the native thread that loops on KVM_RUN and hands exits to
// JavaScript through a thread-safe function.
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "kvm_abi.h"
#include "kvm_objects.h"

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

  void ThreadMain(std::shared_ptr<VcpuCore> self);
  bool Report(ExitMsg& m);
  void ReportAsync(ExitMsg* m);
  void Park(const std::shared_ptr<VcpuCore>& self);
};

struct ExitMsg {
  enum Kind { kIo, kMmio, kHlt, kShutdown, kSystemEvent, kFailEntry, kInternalError, kUnknown, kPaused, kStopped, kError };
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
  }
  return o;
}

static std::string DescribeException(Napi::Env env, const Napi::Error& e) {
  Napi::Value v = e.Value();
  std::string out = "exception in vCPU exit handler";
  if (v.IsObject()) {
    Napi::Value msg = v.As<Napi::Object>().Get("message");
    if (!env.IsExceptionPending() && msg.IsString()) out = msg.As<Napi::String>().Utf8Value();
  } else if (!v.IsEmpty() && !v.IsSymbol()) {
    Napi::String s = v.ToString();
    if (!env.IsExceptionPending()) out = s.Utf8Value();
  }
  if (env.IsExceptionPending()) env.GetAndClearPendingException();
  return out;
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

static void CallJs(Napi::Env env, Napi::Function fn, std::nullptr_t*, ExitMsg* m) {
  if (m == nullptr) return;
  if (env == nullptr || fn.IsEmpty()) {  // environment teardown
    m->stop = true;
    Finish(m);
    return;
  }
  Napi::HandleScope scope(env);
  Napi::Value r = fn.Call({BuildExit(env, *m)});
  if (env.IsExceptionPending()) {
    std::string message = DescribeException(env, env.GetAndClearPendingException());
    m->stop = true;
    if (m->kind != ExitMsg::kStopped && m->kind != ExitMsg::kError) {
      ExitMsg err;
      err.kind = ExitMsg::kError;
      err.message = message;
      fn.Call({BuildExit(env, err)});
      if (env.IsExceptionPending()) env.GetAndClearPendingException();
    }
    if (m->core && m->kind != ExitMsg::kStopped) m->core->RequestStop();
  } else if (r.IsString()) {
    if (r.As<Napi::String>().Utf8Value() == "stop") m->stop = true;
  } else if (r.IsNumber() || r.IsBigInt()) {
    uint64_t v;
    if (ToU64(r, &v)) m->reply = v;
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

void VcpuCore::ThreadMain(std::shared_ptr<VcpuCore> self) {
  sigset_t set;
  sigfillset(&set);
  sigdelset(&set, KickSignal());
  pthread_sigmask(SIG_SETMASK, &set, nullptr);

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
      break;
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
    if (terminal) break;
    if (stopAfter) {
      std::lock_guard<std::mutex> lk(mu);
      stopReq = true;
    }
  }

  {
    std::lock_guard<std::mutex> lk(mu);
    state = VState::Finished;
  }
  auto* m = new ExitMsg();
  m->kind = ExitMsg::kStopped;
  ReportAsync(m);
  tsfn.Release();
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
  uint32_t limit, selector, type, present, dpl, db, ss, l, g, avl, unusable = 0;
  if (!GetU64(o, "base", &s->base) || !GetU32(o, "limit", &limit) || !GetU32(o, "selector", &selector) ||
      !GetU32(o, "type", &type) || !GetU32(o, "present", &present) || !GetU32(o, "dpl", &dpl) ||
      !GetU32(o, "db", &db) || !GetU32(o, "s", &ss) || !GetU32(o, "l", &l) || !GetU32(o, "g", &g) ||
      !GetU32(o, "avl", &avl) || !GetOptU32(o, "unusable", &unusable))
    return false;
  s->limit = limit;
  s->selector = static_cast<uint16_t>(selector);
  s->type = static_cast<uint8_t>(type);
  s->present = static_cast<uint8_t>(present);
  s->dpl = static_cast<uint8_t>(dpl);
  s->db = static_cast<uint8_t>(db);
  s->s = static_cast<uint8_t>(ss);
  s->l = static_cast<uint8_t>(l);
  s->g = static_cast<uint8_t>(g);
  s->avl = static_cast<uint8_t>(avl);
  s->unusable = static_cast<uint8_t>(unusable);
  return true;
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
  uint32_t limit;
  if (!GetU64(v.As<Napi::Object>(), "base", &d->base) || !GetU32(v.As<Napi::Object>(), "limit", &limit)) return false;
  d->limit = static_cast<uint16_t>(limit);
  return true;
}

bool ObjectArg(const Napi::CallbackInfo& info, const char* what, Napi::Object* out) {
  if (info.Length() < 1 || !info[0].IsObject()) {
    ThrowTypeError(info.Env(), std::string(what) + ": expected an object");
    return false;
  }
  *out = info[0].As<Napi::Object>();
  return true;
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
                         InstanceAccessor<&Vcpu::Id>("id"),
                         InstanceMethod<&Vcpu::SetCpuid>("setCpuid"),
                         InstanceMethod<&Vcpu::GetRegs>("getRegs"),
                         InstanceMethod<&Vcpu::SetRegs>("setRegs"),
                         InstanceMethod<&Vcpu::GetSregs>("getSregs"),
                         InstanceMethod<&Vcpu::SetSregs>("setSregs"),
                         InstanceMethod<&Vcpu::GetFpu>("getFpu"),
                         InstanceMethod<&Vcpu::SetFpu>("setFpu"),
                         InstanceMethod<&Vcpu::GetXsave>("getXsave"),
                         InstanceMethod<&Vcpu::SetXsave>("setXsave"),
                         InstanceMethod<&Vcpu::GetXcrs>("getXcrs"),
                         InstanceMethod<&Vcpu::SetXcrs>("setXcrs"),
                         InstanceMethod<&Vcpu::GetMsrs>("getMsrs"),
                         InstanceMethod<&Vcpu::SetMsrs>("setMsrs"),
                         InstanceMethod<&Vcpu::GetLapic>("getLapic"),
                         InstanceMethod<&Vcpu::SetLapic>("setLapic"),
                         InstanceMethod<&Vcpu::GetMpState>("getMpState"),
                         InstanceMethod<&Vcpu::SetMpState>("setMpState"),
                         InstanceMethod<&Vcpu::GetVcpuEvents>("getVcpuEvents"),
                         InstanceMethod<&Vcpu::SetVcpuEvents>("setVcpuEvents"),
                         InstanceMethod<&Vcpu::GetDebugRegs>("getDebugRegs"),
                         InstanceMethod<&Vcpu::SetDebugRegs>("setDebugRegs"),
                         InstanceMethod<&Vcpu::KvmclockCtrl>("kvmclockCtrl"),
                         InstanceMethod<&Vcpu::Start>("start"),
                         InstanceMethod<&Vcpu::RequestPause>("requestPause"),
                         InstanceMethod<&Vcpu::Resume>("resume"),
                         InstanceMethod<&Vcpu::Stop>("stop"),
                         InstanceMethod<&Vcpu::Close>("close"),
                     });
}

Vcpu::Vcpu(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Vcpu>(info), core_(std::make_shared<VcpuCore>()) {
  Napi::Env env = info.Env();
  if (info.Length() < 5 || !info[0].IsString() || info[0].As<Napi::String>().Utf8Value() != kInternalToken) {
    ThrowTypeError(env, "this object is created by the native addon, not with new");
    return;
  }
  int fd = info[1].As<Napi::Number>().Int32Value();
  id_ = info[2].As<Napi::Number>().Uint32Value();
  size_t runSize = info[3].As<Napi::Number>().Uint32Value();
  xsaveSize_ = info[4].As<Napi::Number>().Int32Value();
  void* p = mmap(nullptr, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    ThrowErrno(env, "mmap(kvm_run)", e);
    return;
  }
  core_->fd = fd;
  core_->run = static_cast<kvm_run*>(p);
  core_->runSize = runSize;
}

Vcpu::~Vcpu() {
  if (thread_.joinable()) {
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
    if (!GetU32(o, "function", &e.function) || !GetU32(o, "index", &e.index) || !GetU32(o, "flags", &e.flags) ||
        !GetU32(o, "eax", &e.eax) || !GetU32(o, "ebx", &e.ebx) || !GetU32(o, "ecx", &e.ecx) ||
        !GetU32(o, "edx", &e.edx))
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
  if (!GetU64(o, #n, &r.n)) return env.Undefined();
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
      !GetU64(o, "cr0", &s.cr0) || !GetU64(o, "cr2", &s.cr2) ||
      !GetU64(o, "cr3", &s.cr3) || !GetU64(o, "cr4", &s.cr4) ||
      !GetU64(o, "cr8", &s.cr8) ||
      !GetU64(o, "efer", &s.efer) ||
      !GetU64(o, "apic_base", &s.apic_base))
    return env.Undefined();
  Napi::Value bm = o.Get("interrupt_bitmap");
  if (bm.IsArray()) {
    Napi::Array a = bm.As<Napi::Array>();
    for (uint32_t i = 0; i < 4 && i < a.Length(); i++) {
      uint64_t w;
      if (!ToU64(a.Get(i), &w)) {
        ThrowTypeError(env, "setSregs: interrupt_bitmap must hold integers");
        return env.Undefined();
      }
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
  uint32_t fcw, fsw, ftwx, op, mxcsr;
  if (!GetU32(o, "fcw", &fcw) || !GetU32(o, "fsw", &fsw) || !GetU32(o, "ftwx", &ftwx) ||
      !GetU32(o, "last_opcode", &op) || !GetU64(o, "last_ip", &f.last_ip) ||
      !GetU64(o, "last_dp", &f.last_dp) || !GetU32(o, "mxcsr", &mxcsr))
    return env.Undefined();
  f.fcw = static_cast<uint16_t>(fcw);
  f.fsw = static_cast<uint16_t>(fsw);
  f.ftwx = static_cast<uint8_t>(ftwx);
  f.last_opcode = static_cast<uint16_t>(op);
  f.mxcsr = mxcsr;
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
  std::vector<uint8_t> buf(sizeof(abi::Msrs) + n * sizeof(kvm_msr_entry), 0);
  auto* m = reinterpret_cast<abi::Msrs*>(buf.data());
  kvm_msr_entry* entries = abi::Entries<kvm_msr_entry>(m);
  m->nmsrs = n;
  for (uint32_t i = 0; i < n; i++) {
    uint64_t v;
    if (!ToU64(idx.Get(i), &v)) {
      ThrowTypeError(env, "getMsrs: indices must be integers");
      return env.Undefined();
    }
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
    uint64_t data;
    if (!GetU32(v.As<Napi::Object>(), "index", &entries[i].index) || !GetU64(v.As<Napi::Object>(), "data", &data))
      return env.Undefined();
    entries[i].data = data;
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

Napi::Value Vcpu::SetMpState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckIdle(env)) return env.Undefined();
  uint64_t v;
  if (info.Length() < 1 || !ToU64(info[0], &v)) {
    ThrowTypeError(env, "setMpState: expected an integer");
    return env.Undefined();
  }
  kvm_mp_state s{};
  s.mp_state = static_cast<uint32_t>(v);
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
  {
    std::lock_guard<std::mutex> lk(core_->mu);
    if (core_->state != VState::Idle && core_->state != VState::Finished) {
      ThrowError(env, "vCPU " + std::to_string(id_) + " is already started", "EBUSY");
      return env.Undefined();
    }
  }
  if (thread_.joinable()) thread_.join();  // previous run has finished
  InstallKickHandler();
  core_->tsfn = ExitTsfn::New(env, info[0].As<Napi::Function>(), "tern-vcpu", 0, 1, nullptr);
  if (env.IsExceptionPending()) return env.Undefined();
  core_->stopReq = false;
  core_->pauseReq = false;
  core_->SetImmediateExit(0);
  {
    std::lock_guard<std::mutex> lk(core_->mu);
    core_->state = VState::Running;
    std::shared_ptr<VcpuCore> c = core_;
    thread_ = std::thread([c] { c->ThreadMain(c); });
    core_->tid = thread_.native_handle();
  }
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

Napi::Value Vcpu::Resume(const Napi::CallbackInfo& info) {
  {
    std::lock_guard<std::mutex> lk(core_->mu);
    if (core_->state == VState::Parked) core_->state = VState::Running;
  }
  core_->cv.notify_all();
  return info.Env().Undefined();
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
