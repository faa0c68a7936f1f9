// What every native virtqueue server shares (block_queue.cc, net_queue.cc): the options that
// place a queue (guest RAM, rings, cursors, doorbell and irqfd) read from JavaScript, the
// thread that sleeps on the doorbell, stopping it between chains, raising the interrupt the
// driver asked for, and telling JavaScript that the driver broke the queue. A server adds what
// its device does with a chain; it keeps no state beyond what stop() hands back.
#pragma once

#include <napi.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "virtqueue.h"

namespace tern {

class QueueThread {
 public:
  ~QueueThread() { Join(); }

  // Reads memory, size, desc, avail, used, eventIdx, indirect, nextAvail, nextUsed, kickFd and
  // interruptFd from `o` (`fn` names the caller in errors); false with a JS exception pending.
  bool Parse(Napi::Env env, Napi::Object o, const char* fn);
  // Starts `run` on the thread; onBroken(reason) is called on the JavaScript thread after Broken().
  bool Launch(Napi::Env env, Napi::Function onBroken, const char* name, std::function<void()> run);
  // Ends the thread (after the chain it is serving) and releases what Launch() took.
  void Join();

  // Sleeps until the doorbell rings (its count is consumed), `extraFd` is ready for `extraEvents`
  // (when extraFd >= 0) or stop is asked. Returns false when the thread must end (stop, or a
  // failure already reported with Broken()); *extraReady says whether extraFd woke it.
  bool Wait(int extraFd, short extraEvents, bool* extraReady) { return Wait(extraFd, extraEvents, -1, extraReady, nullptr); }
  // The same, waking also after `timeoutUs` (when >= 0) with *timedOut set.
  bool Wait(int extraFd, short extraEvents, int64_t timeoutUs, bool* extraReady, bool* timedOut);
  bool stopping() const { return stopReq_.load(); }
  // Writes the irqfd when the chains used since `usedBefore` call for an interrupt.
  void InterruptIfDue(uint16_t usedBefore);
  // {sent, lastSentMsAgo}: the interrupts this thread raised (irqfd writes the kernel took), for
  // a health report: a driver waiting past its used_event then shows whether one went out.
  Napi::Object InterruptsObject(Napi::Env env) const;
  // The driver broke the queue (or the host end failed): JavaScript hears `reason`.
  void Broken(const std::string& reason);
  // What stop() returns: {nextAvail, nextUsed, counters, interrupt} (the thread has been joined);
  // `interrupt`: chains handed back at the stop call for one, which the caller raises as the
  // vector's state allows (masked: its pending bit), not this thread on a route about to change.
  Napi::Object StopResult(Napi::Env env, Napi::Value counters, bool interruptOwed = false) const;

  GuestRamMap mem;
  std::unique_ptr<SplitQueue> queue;
  int kickFd = -1, interruptFd = -1;

 private:
  int stopFd_ = -1;
  std::atomic<uint64_t> interruptsSent_{0};
  std::atomic<int64_t> lastInterruptMs_{0};  // MonotonicMs()
  std::thread thread_;
  std::atomic<bool> stopReq_{false};
  Napi::ThreadSafeFunction tsfn_;
  bool tsfnLive_ = false;
  std::vector<Napi::ObjectReference> keep_;  // the guest RAM buffers, alive while the thread runs
};

// o[key] as a boolean; false with a TypeError pending otherwise.
bool GetBool(Napi::Object o, const char* fn, const char* key, bool* out);

}  // namespace tern
