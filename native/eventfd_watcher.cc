// watchEventfds(callback): one native thread per watcher sleeps in epoll_wait on the watched
// eventfds, drains each one that fires and hands the counts to JavaScript through a
// thread-safe function, callback(fd, count).
//
// The thread is created from the JavaScript thread, which runs without a seccomp filter, so it
// inherits none: the per-thread filter of vcpu_seccomp.cc is installed by each vCPU thread on
// itself only (no TSYNC), after it was created.
//
// Coalescing: the counts read by the thread accumulate in the fd's entry, and at most one
// thread-safe call per watcher is queued at a time; that call delivers every count gathered
// until it runs, one callback per fd. A guest ringing a doorbell in a loop therefore grows
// neither the queue nor memory, however long JavaScript is busy.
//
// remove() without races: every add() gives the fd a new generation, carried in the epoll
// event. The thread reads and accumulates under the watcher's mutex, only for an fd whose
// entry still has that generation; remove() deletes the entry under the same mutex; and a
// delivery checks the entry again just before calling JavaScript. So once remove() returns,
// nothing read for that registration reaches the callback, even if it was already queued.
#include "eventfd_watcher.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "common.h"

namespace tern {

namespace {

// 2^53 - 1: a larger count could not be told apart from its neighbours as a JS number.
constexpr uint64_t kMaxSafeInteger = (1ull << 53) - 1;
// Ready fds taken per epoll_wait; any beyond are reported by the next call.
constexpr int kMaxEvents = 64;

// epoll_event.data of a watched fd: its generation in the high half, the fd in the low half.
// Generation 0 marks the watcher's own wake-up eventfd.
uint64_t EventKey(int fd, uint32_t gen) { return (static_cast<uint64_t>(gen) << 32) | static_cast<uint32_t>(fd); }

// One registration. Allocated by add() on the JavaScript thread, so the watcher thread never
// allocates: it only updates entries that exist.
struct Watch {
  uint32_t gen = 0;
  uint64_t count = 0;  // read and not yet delivered, saturating
  // Set by the thread when the fd failed: it is out of epoll, and the entry stays only until
  // the failure is reported (or remove()/add() supersede it).
  bool dead = false;
  bool failureTaken = false;  // the failure is in a delivery batch already
  int err = 0;
  const char* failedCall = nullptr;  // static string naming what failed
  ssize_t shortRead = -1;            // bytes of a short read, or -1
};

struct Delivery {
  int fd;
  uint32_t gen;
  uint64_t count;
  bool failed;
  int err;
  const char* failedCall;
  ssize_t shortRead;
};

struct WatcherCore;
void CallJs(Napi::Env env, Napi::Function fn, WatcherCore* core, std::nullptr_t*);
using WatcherTsfn = Napi::TypedThreadSafeFunction<WatcherCore, std::nullptr_t, CallJs>;

struct WatcherCore {
  int epfd = -1;
  int wakefd = -1;  // written by StopThread to end epoll_wait
  std::thread thread;
  std::atomic<bool> stopReq{false};
  WatcherTsfn tsfn;

  std::mutex mu;
  std::map<int, Watch> watches;  // guarded by mu
  bool callQueued = false;       // guarded by mu: a thread-safe call is on its way

  // JavaScript thread only.
  bool closed = false;
  bool tsfnLive = false;  // created, and neither released nor finalized
  bool reffed = true;     // a new thread-safe function holds the event loop open
  uint32_t nextGen = 1;

  ~WatcherCore() {
    StopThread();
    CloseFds();
  }

  void Run() noexcept;
  bool ServiceLocked(int fd, uint32_t gen);
  void Deliver(Napi::Env env, Napi::Function fn);
  bool CallbackThrew(Napi::Env env, Napi::Function fn, const Delivery& d, const Napi::Error& thrown);

  // Removes the registration `gen` of fd, if it is still the current one.
  void Forget(int fd, uint32_t gen) {
    std::lock_guard<std::mutex> lk(mu);
    auto it = watches.find(fd);
    if (it == watches.end() || it->second.gen != gen) return;
    if (!it->second.dead) epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nullptr);
    watches.erase(it);
  }

  // The thread only blocks in epoll_wait, and on mu for the length of a few nonblocking
  // reads, so this join is short; it may run in a finalizer.
  void StopThread() {
    if (!thread.joinable()) return;
    stopReq = true;
    uint64_t one = 1;
    ssize_t n;
    do {
      n = write(wakefd, &one, sizeof one);
    } while (n < 0 && errno == EINTR);
    thread.join();
  }

  void CloseFds() {
    if (epfd >= 0) close(epfd);
    if (wakefd >= 0) close(wakefd);
    epfd = wakefd = -1;
  }

  // A watcher holds the event loop open while it watches at least one fd, like a listening
  // socket; idle or closed, it does not.
  void UpdateRef(Napi::Env env) {
    if (!tsfnLive) return;
    bool want = false;
    if (!closed) {
      std::lock_guard<std::mutex> lk(mu);
      for (const auto& [fd, w] : watches) {
        if (!w.dead) {
          want = true;
          break;
        }
      }
    }
    if (want == reffed) return;
    if (want) tsfn.Ref(env);
    else tsfn.Unref(env);
    reffed = want;
  }

  // close(), and the wrapper's destructor (env null: no Unref there; Release is enough).
  void Shutdown(napi_env env) {
    closed = true;
    StopThread();
    {
      std::lock_guard<std::mutex> lk(mu);
      watches.clear();
    }
    CloseFds();
    if (tsfnLive) {
      if (env != nullptr && reffed) tsfn.Unref(env);
      reffed = false;
      tsfnLive = false;
      tsfn.Release();
    }
  }
};

void WatcherCore::Run() noexcept {
  // Process signals are for Node's own threads; this one only waits and reads.
  sigset_t set;
  sigfillset(&set);
  pthread_sigmask(SIG_SETMASK, &set, nullptr);

  epoll_event events[kMaxEvents];
  for (;;) {
    int n = epoll_wait(epfd, events, kMaxEvents, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // only a bad epoll fd fails here, and it stays open until this thread is joined
    }
    if (stopReq) return;
    bool call = false;
    {
      std::lock_guard<std::mutex> lk(mu);
      bool news = false;
      for (int i = 0; i < n; i++) {
        uint32_t gen = static_cast<uint32_t>(events[i].data.u64 >> 32);
        int fd = static_cast<int>(static_cast<uint32_t>(events[i].data.u64));
        if (gen == 0) continue;  // the wake-up eventfd: only StopThread writes it
        if (ServiceLocked(fd, gen)) news = true;
      }
      if (news && !callQueued) call = callQueued = true;
    }
    // napi_closing: the environment is going away and the finalizer joins this thread.
    if (call && tsfn.NonBlockingCall() != napi_ok) return;
  }
}

// Caller holds mu. Reads the counter of a ready fd and re-arms it; returns whether there is
// something new to deliver.
bool WatcherCore::ServiceLocked(int fd, uint32_t gen) {
  auto it = watches.find(fd);
  // Removed, or removed and added again after this event was collected: the event is stale,
  // and a current registration reports for itself.
  if (it == watches.end() || it->second.gen != gen || it->second.dead) return false;
  Watch& w = it->second;
  uint64_t v = 0;
  ssize_t r;
  do {
    r = read(fd, &v, sizeof v);
  } while (r < 0 && errno == EINTR);
  bool news = false;
  if (r == static_cast<ssize_t>(sizeof v)) {
    if (v != 0) {
      w.count = v > UINT64_MAX - w.count ? UINT64_MAX : w.count + v;
      news = true;
    }
  } else if (r < 0 && errno == EAGAIN) {
    // Drained by someone else between epoll_wait and here: nothing happened.
  } else {
    // Not an eventfd (a short read or end of file), or the fd is broken: drop it and say so.
    w.dead = true;
    w.err = r < 0 ? errno : EIO;
    w.failedCall = "eventfd read";
    w.shortRead = r < 0 ? -1 : r;
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nullptr);
    return true;
  }
  // One-shot registrations: an fd is reported once per arming. An event from a registration
  // that can no longer be reached (its fd number closed and reused without remove()) then
  // fires once and is dropped above, instead of waking this thread forever.
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.u64 = EventKey(fd, gen);
  if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
    w.dead = true;
    w.err = errno;
    w.failedCall = "epoll_ctl(EPOLL_CTL_MOD)";
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nullptr);
    return true;
  }
  return news;
}

// Whether JavaScript can run. A worker that is exiting still turns its loop, and so dispatches
// thread-safe calls, after it stopped running JavaScript; a node-addon-api call failing there
// ends the process with a fatal error instead of throwing, so the delivery stops first.
bool CanRunJs(napi_env env) {
  napi_value global, v;
  return napi_get_global(env, &global) == napi_ok && napi_get_named_property(env, global, "undefined", &v) == napi_ok;
}

// fn(...args) through the C API, which reports a failure instead of raising it. Returns false
// when JavaScript can no longer run; *thrown is what the callback threw, or null.
bool CallCallback(Napi::Env env, Napi::Function fn, const std::vector<napi_value>& args, napi_value* thrown) {
  *thrown = nullptr;
  napi_value result;
  if (napi_call_function(env, env.Undefined(), fn, args.size(), args.data(), &result) == napi_ok) return true;
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) napi_get_and_clear_last_exception(env, thrown);
  return CanRunJs(env);
}

Napi::Value FailureError(Napi::Env env, const Delivery& d) {
  if (d.shortRead >= 0) {
    Napi::Error e = Napi::Error::New(env, "eventfd read: short read of " + std::to_string(d.shortRead) +
                                              " bytes (fd " + std::to_string(d.fd) + " is not an eventfd)");
    e.Set("code", Napi::String::New(env, "EIO"));
    e.Set("errno", Napi::Number::New(env, EIO));
    e.Set("syscall", Napi::String::New(env, "eventfd read"));
    return e.Value();
  }
  return ErrnoError(env, d.failedCall, d.err).Value();
}

// Runs on the JavaScript thread.
void WatcherCore::Deliver(Napi::Env env, Napi::Function fn) {
  std::vector<Delivery> batch;
  {
    std::lock_guard<std::mutex> lk(mu);
    // Whatever the thread reads from now on needs a call of its own.
    callQueued = false;
    batch.reserve(watches.size());
    for (auto& [fd, w] : watches) {
      bool failed = w.dead && !w.failureTaken;
      if (w.count == 0 && !failed) continue;
      batch.push_back(Delivery{fd, w.gen, w.count, failed, w.err, w.failedCall, w.shortRead});
      w.count = 0;
      if (failed) w.failureTaken = true;
    }
  }
  for (const Delivery& d : batch) {
    if (closed) break;
    {
      // The callback may have removed (or removed and re-added) this fd while delivering an
      // earlier one: then this is no longer the caller's business.
      std::lock_guard<std::mutex> lk(mu);
      auto it = watches.find(d.fd);
      if (it == watches.end() || it->second.gen != d.gen) continue;
      if (d.failed) watches.erase(it);
    }
    Napi::HandleScope scope(env);
    std::vector<napi_value> args{Napi::Number::New(env, d.fd),
                                 Napi::Number::New(env, static_cast<double>(std::min(d.count, kMaxSafeInteger)))};
    if (d.failed) args.push_back(FailureError(env, d));
    napi_value thrown;
    if (!CallCallback(env, fn, args, &thrown)) return;
    if (thrown != nullptr && !CallbackThrew(env, fn, d, Napi::Error(env, thrown))) return;
  }
  UpdateRef(env);
}

// As a vCPU's exit handler that throws gets one 'error' exit and its vCPU stops: the fd whose
// callback threw is dropped, and the callback hears of it once, with the thrown value as the
// error's cause. Nothing is left pending, so the process does not die of an uncaught exception
// raised on a libuv callback it cannot attribute. Returns false when JavaScript can no longer run.
bool WatcherCore::CallbackThrew(Napi::Env env, Napi::Function fn, const Delivery& d, const Napi::Error& thrown) {
  std::string message = DescribeException(env, thrown, "exception in the eventfd callback");
  Forget(d.fd, d.gen);
  if (d.failed || closed) return true;
  Napi::Error e = Napi::Error::New(env, "eventfd callback for fd " + std::to_string(d.fd) + " threw: " + message +
                                            "; the fd is no longer watched");
  e.Set("cause", thrown.Value());
  napi_value again;  // a second throw is dropped: the fd is gone already
  return CallCallback(env, fn, {Napi::Number::New(env, d.fd), Napi::Number::New(env, 0), e.Value()}, &again);
}

void CallJs(Napi::Env env, Napi::Function fn, WatcherCore* core, std::nullptr_t*) {
  if (env == nullptr || fn.IsEmpty() || core == nullptr) return;  // environment teardown
  if (!CanRunJs(env)) return;                                      // a worker exiting
  // Runs from libuv: nothing may be thrown past it.
  try {
    core->Deliver(env, fn);
  } catch (...) {
    if (env.IsExceptionPending()) env.GetAndClearPendingException();
    try {
      // Counts not yet taken stay in their entries for the next call.
      std::lock_guard<std::mutex> lk(core->mu);
      core->callQueued = false;
    } catch (...) {
    }
  }
}

// Keeps the core alive as long as the thread-safe function that may still call into it.
void FinalizeTsfn(Napi::Env, std::shared_ptr<WatcherCore>* hold, WatcherCore* core) {
  // Released by Shutdown, or closed with the environment: in the latter case the thread may
  // still be running and must not touch the thread-safe function once this returns.
  core->tsfnLive = false;
  core->closed = true;
  core->StopThread();
  delete hold;
}

class EventfdWatcher : public Napi::ObjectWrap<EventfdWatcher> {
 public:
  TERN_GUARDED_METHODS(EventfdWatcher)
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "EventfdWatcher",
                       {
                           InstanceMethod<&EventfdWatcher::Guarded<&EventfdWatcher::Add>>("add"),
                           InstanceMethod<&EventfdWatcher::Guarded<&EventfdWatcher::Remove>>("remove"),
                           InstanceMethod<&EventfdWatcher::Guarded<&EventfdWatcher::Close>>("close"),
                       });
  }

  // new EventfdWatcher(token, callback)
  explicit EventfdWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EventfdWatcher>(info) {
    GuardCall(info.Env(), [&] {
      Init(info);
      return Napi::Value();
    });
  }

  ~EventfdWatcher() override {
    try {
      // Collected without close(): stop watching, as close() would.
      if (core_) core_->Shutdown(nullptr);
    } catch (...) {
      // A destructor runs from the garbage collector: nothing may leave it.
    }
  }

 private:
  void Init(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsString() || info[0].As<Napi::String>().Utf8Value() != kInternalToken) {
      ThrowTypeError(env, "this object is created by watchEventfds, not with new");
      return;
    }
    if (!info[1].IsFunction()) {
      ThrowTypeError(env, "watchEventfds: expected a callback function");
      return;
    }
    core_ = std::make_shared<WatcherCore>();
    WatcherCore* c = core_.get();
    c->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (c->epfd < 0) {
      ThrowErrno(env, "epoll_create1", errno);
      return;
    }
    c->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->wakefd < 0) {
      ThrowErrno(env, "eventfd", errno);
      return;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = EventKey(c->wakefd, 0);
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, c->wakefd, &ev) < 0) {
      ThrowErrno(env, "epoll_ctl(EPOLL_CTL_ADD)", errno);
      return;
    }
    auto hold = std::make_unique<std::shared_ptr<WatcherCore>>(core_);
    c->tsfn = WatcherTsfn::New(env, info[1].As<Napi::Function>(), "tern-eventfd-watcher", 0, 1, c, FinalizeTsfn,
                               hold.get());
    if (env.IsExceptionPending() || static_cast<napi_threadsafe_function>(c->tsfn) == nullptr) return;
    hold.release();  // the thread-safe function's finalizer owns it now
    c->tsfnLive = true;
    c->UpdateRef(env);  // nothing watched yet
    try {
      c->thread = std::thread([c] {
        NameThisThread("tern eventfds");
        c->Run();
      });
    } catch (const std::system_error& e) {
      c->Shutdown(env);
      ThrowErrno(env, "starting the eventfd watcher thread", e.code().value());
    }
  }

  bool CheckOpen(Napi::Env env) {
    if (core_ && !core_->closed) return true;
    ThrowError(env, "eventfd watcher is closed", "EBADF");
    return false;
  }

  Napi::Value Add(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int fd;
    if (!ArgFd(info, 0, "add: fd", &fd)) return env.Undefined();
    if (!CheckOpen(env)) return env.Undefined();
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) {
      ThrowErrno(env, "fcntl(F_GETFL)", errno);
      return env.Undefined();
    }
    // The thread reads only after epoll says the fd is ready, but another reader could drain
    // it in between: a blocking read would then hang the thread, and close() with it.
    if (!(flags & O_NONBLOCK)) {
      ThrowError(env, "add: fd " + std::to_string(fd) + " is not nonblocking (create it with EFD_NONBLOCK)", "EINVAL");
      return env.Undefined();
    }
    WatcherCore* c = core_.get();
    {
      std::lock_guard<std::mutex> lk(c->mu);
      uint32_t gen = c->nextGen++;
      if (c->nextGen == 0) c->nextGen = 1;  // 0 is the wake-up eventfd's
      auto [it, inserted] = c->watches.try_emplace(fd);
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLONESHOT;
      ev.data.u64 = EventKey(fd, gen);
      if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = errno;  // EEXIST: already watched
        if (inserted) c->watches.erase(it);
        ThrowErrno(env, "epoll_ctl(EPOLL_CTL_ADD)", err);
        return env.Undefined();
      }
      // An entry that was there is superseded: a failure not yet reported, or a registration
      // the kernel had already dropped because its fd was closed without remove().
      it->second = Watch();
      it->second.gen = gen;
    }
    c->UpdateRef(env);
    return env.Undefined();
  }

  Napi::Value Remove(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int fd;
    if (!ArgFd(info, 0, "remove: fd", &fd)) return env.Undefined();
    if (!core_ || core_->closed) return env.Undefined();
    WatcherCore* c = core_.get();
    {
      std::lock_guard<std::mutex> lk(c->mu);
      auto it = c->watches.find(fd);
      if (it == c->watches.end()) return env.Undefined();
      // ENOENT or EBADF here mean the fd was closed first and the kernel forgot it already.
      if (!it->second.dead) epoll_ctl(c->epfd, EPOLL_CTL_DEL, fd, nullptr);
      c->watches.erase(it);
    }
    c->UpdateRef(env);
    return env.Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (core_ && !core_->closed) core_->Shutdown(info.Env());
    return info.Env().Undefined();
  }

  std::shared_ptr<WatcherCore> core_;
};

Napi::Value WatchEventfds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsFunction()) {
    ThrowTypeError(env, "watchEventfds: expected a callback function");
    return env.Undefined();
  }
  auto* ctor = static_cast<Napi::FunctionReference*>(info.Data());
  return ctor->New({Napi::String::New(env, kInternalToken), info[0]});
}

}  // namespace

void InitEventfdWatcher(Napi::Env env, Napi::Object exports) {
  // The class is reached only through watchEventfds, which holds its constructor for the
  // life of the environment.
  auto* ctor = new Napi::FunctionReference(Napi::Persistent(EventfdWatcher::Define(env)));
  env.AddCleanupHook([ctor] { delete ctor; });
  exports.Set("watchEventfds", Napi::Function::New(env, Guarded<WatchEventfds>, "watchEventfds", ctor));
}

}  // namespace tern
