// The shared part of the native virtqueue servers; see queue_thread.h.
#include "queue_thread.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

namespace tern {

bool GetBool(Napi::Object o, const char* fn, const char* key, bool* out) {
  Napi::Value v = o.Get(key);
  if (!v.IsBoolean()) {
    ThrowTypeError(o.Env(), std::string(fn) + ": " + key + " must be a boolean");
    return false;
  }
  *out = v.As<Napi::Boolean>().Value();
  return true;
}

bool QueueThread::Parse(Napi::Env env, Napi::Object o, const char* fn) {
  const std::string f(fn);
  Napi::Value memory = o.Get("memory");
  if (!memory.IsArray()) return ThrowTypeError(env, f + ": memory must be an array"), false;
  Napi::Array regions = memory.As<Napi::Array>();
  for (uint32_t i = 0; i < regions.Length(); i++) {
    Napi::Value rv = regions.Get(i);
    if (!rv.IsObject()) return ThrowTypeError(env, f + ": a memory region must be an object"), false;
    Napi::Object r = rv.As<Napi::Object>();
    uint64_t base;
    if (!GetUint(r, "guestAddress", (1ull << 53) - 1, &base)) return false;
    Napi::Value cv = r.Get("chunks");
    if (!cv.IsArray()) return ThrowTypeError(env, f + ": chunks must be an array of ArrayBuffers"), false;
    uint8_t* dirty = nullptr;
    size_t dirtyBytes = 0;
    Napi::Value dv = r.Get("dirty");
    if (dv.IsTypedArray() && dv.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array) {
      Napi::Uint8Array d = dv.As<Napi::Uint8Array>();
      dirty = d.Data();
      dirtyBytes = d.ByteLength();
      keep_.push_back(Napi::Persistent(d.As<Napi::Object>()));
    } else if (!dv.IsUndefined() && !dv.IsNull()) {
      return ThrowTypeError(env, f + ": dirty must be a Uint8Array"), false;
    }
    Napi::Array chunks = cv.As<Napi::Array>();
    uint64_t offset = 0;
    for (uint32_t c = 0; c < chunks.Length(); c++) {
      Napi::Value b = chunks.Get(c);
      if (!b.IsArrayBuffer()) return ThrowTypeError(env, f + ": chunks must be an array of ArrayBuffers"), false;
      Napi::ArrayBuffer ab = b.As<Napi::ArrayBuffer>();
      // The dirty bitmap counts pages from the region's start: a chunk starts on a whole byte of it.
      if (offset % (4096 * 8) != 0) return ThrowError(env, f + ": a chunk does not start on a dirty-bitmap byte"), false;
      RamRange rr;
      rr.guestAddress = base + offset;
      rr.size = ab.ByteLength();
      rr.host = static_cast<uint8_t*>(ab.Data());
      size_t skip = static_cast<size_t>(offset / (4096 * 8));
      if (dirty && skip < dirtyBytes) {
        rr.dirty = dirty + skip;
        rr.dirtyBytes = dirtyBytes - skip;
      }
      mem.Add(rr);
      keep_.push_back(Napi::Persistent(ab.As<Napi::Object>()));
      offset += ab.ByteLength();
    }
  }
  QueueConfig q;
  uint64_t v;
  if (!GetUint(o, "size", 32768, &v)) return false;
  q.size = static_cast<uint32_t>(v);
  if (!GetUint(o, "desc", (1ull << 53) - 1, &q.desc) || !GetUint(o, "avail", (1ull << 53) - 1, &q.avail) || !GetUint(o, "used", (1ull << 53) - 1, &q.used)) return false;
  if (!GetBool(o, fn, "eventIdx", &q.eventIdx) || !GetBool(o, fn, "indirect", &q.indirect)) return false;
  uint16_t nextAvail = 0, nextUsed = 0;
  if (!GetField(o, "nextAvail", &nextAvail) || !GetField(o, "nextUsed", &nextUsed)) return false;
  uint32_t kick = 0, irq = 0;
  if (!GetField(o, "kickFd", &kick) || !GetField(o, "interruptFd", &irq)) return false;
  if (kick > INT_MAX || irq > INT_MAX) return ThrowError(env, f + ": a file descriptor out of range"), false;
  kickFd = static_cast<int>(kick);
  interruptFd = static_cast<int>(irq);
  queue = std::make_unique<SplitQueue>(mem, q, nextAvail, nextUsed);
  std::string problem = queue->RingsProblem();
  if (!problem.empty()) return ThrowError(env, f + ": " + problem), false;
  return true;
}

bool QueueThread::Launch(Napi::Env env, Napi::Function onBroken, const char* name, std::function<void()> run) {
  stopFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stopFd_ < 0) return ThrowErrno(env, "eventfd", errno), false;
  tsfn_ = Napi::ThreadSafeFunction::New(env, onBroken, name, 0, 1);
  tsfn_.Unref(env);
  tsfnLive_ = true;
  thread_ = std::thread([run = std::move(run), threadName = std::string(name)] {
    NameThisThread(threadName);
    run();
  });
  return true;
}

void QueueThread::Join() {
  if (thread_.joinable()) {
    stopReq_.store(true);
    uint64_t one = 1;
    ssize_t ignored = write(stopFd_, &one, 8);
    (void)ignored;
    thread_.join();
  }
  if (tsfnLive_) {
    tsfn_.Release();
    tsfnLive_ = false;
  }
  if (stopFd_ >= 0) close(stopFd_);
  stopFd_ = -1;
  keep_.clear();
}

bool QueueThread::Wait(int extraFd, short extraEvents, int64_t timeoutUs, bool* extraReady, bool* timedOut) {
  *extraReady = false;
  if (timedOut) *timedOut = false;
  pollfd fds[3] = {{kickFd, POLLIN, 0}, {stopFd_, POLLIN, 0}, {extraFd, extraEvents, 0}};
  timespec timeout{timeoutUs / 1000000, (timeoutUs % 1000000) * 1000};
  for (;;) {
    if (stopReq_.load()) return false;
    // (an interrupted wait starts its timeout again: it only ever gets longer, never missed)
    int n = ppoll(fds, extraFd >= 0 ? 3 : 2, timeoutUs >= 0 ? &timeout : nullptr, nullptr);
    if (n == 0) {
      if (timedOut) *timedOut = true;
      return true;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      Broken(std::string("the doorbell cannot be watched: ") + strerror(errno));
      return false;
    }
    if (fds[1].revents) return false;
    if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) return Broken("the doorbell failed"), false;
    if (fds[0].revents) {
      uint64_t count;
      ssize_t ignored = read(kickFd, &count, 8);  // nonblocking; a spurious wake-up reads nothing
      (void)ignored;
    }
    *extraReady = extraFd >= 0 && fds[2].revents != 0;
    return true;
  }
}

void QueueThread::InterruptIfDue(uint16_t usedBefore) {
  if (!queue->ShouldInterrupt(usedBefore)) return;
  uint64_t one = 1;
  if (write(interruptFd, &one, 8) != 8) return;
  lastInterruptMs_.store(MonotonicMs(), std::memory_order_relaxed);
  interruptsSent_.fetch_add(1, std::memory_order_relaxed);
}

Napi::Object QueueThread::InterruptsObject(Napi::Env env) const {
  Napi::Object out = Napi::Object::New(env);
  uint64_t sent = interruptsSent_.load(std::memory_order_relaxed);
  out.Set("sent", Napi::Number::New(env, static_cast<double>(sent)));
  if (sent == 0) {
    out.Set("lastSentMsAgo", env.Null());
  } else {
    out.Set("lastSentMsAgo", Napi::Number::New(env, static_cast<double>(MonotonicMs() - lastInterruptMs_.load(std::memory_order_relaxed))));
  }
  return out;
}

Napi::Object QueueThread::StopResult(Napi::Env env, Napi::Value counters, bool interruptOwed) const {
  Napi::Object out = Napi::Object::New(env);
  out.Set("nextAvail", Napi::Number::New(env, queue ? queue->nextAvail() : 0));
  out.Set("nextUsed", Napi::Number::New(env, queue ? queue->nextUsed() : 0));
  out.Set("counters", counters);
  out.Set("interrupt", Napi::Boolean::New(env, interruptOwed));
  return out;
}

void QueueThread::Broken(const std::string& reason) {
  auto* msg = new std::string(reason);
  if (tsfn_.NonBlockingCall(msg, [](Napi::Env env, Napi::Function fn, std::string* m) {
        std::string s = *m;
        delete m;
        if (env != nullptr && fn) fn.Call({Napi::String::New(env, s)});
      }) != napi_ok) {
    delete msg;
  }
}

}  // namespace tern
