// serveNetQueue(options, onBroken): one virtio-net queue (a receive or a transmit queue of a
// queue pair) served by a native thread against the pair's tap file descriptor.
//
// Transmit: each chain is a 12-byte virtio_net_hdr_v1 and a frame; the thread writes it to the
// tap with writev straight from the guest's buffers (the tap takes the same header, set with
// TUNSETVNETHDRSZ, so checksum and segmentation offloads pass through). A full tap (EAGAIN)
// leaves the chain in the ring and the thread waits for the tap to take more: back-pressure,
// never a busy loop. A frame the tap refuses as malformed (EINVAL) or a chain with no header,
// more than a header and a 64 KiB frame, or outside RAM breaks the queue; a tap that is down
// drops the frame, as a NIC with no link does.
//
// Receive: the thread reads a frame from the tap (only while the guest has a buffer for it)
// into a bounce buffer, then fills the guest's chains: with VIRTIO_NET_F_MRG_RXBUF as many as
// the frame needs, handed back together with num_buffers in the first one's header; without
// it, one chain per frame. When the guest has too few buffers posted the frame waits in the
// thread for the next kick (stop() drops it and counts it: a NIC drops frames it has no room
// for). The tap is not read while the guest has no buffers: the kernel queues frames and
// drops its own excess.
//
// As block_queue.cc: no policy and no state of its own; stop() hands back the cursors and the
// counters, and every page written is marked in the VMM dirty bitmap.
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "common.h"
#include "queue_thread.h"

namespace tern {

namespace {

constexpr uint32_t kHeaderBytes = 12;     // struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1)
constexpr uint32_t kNumBuffersAt = 10;    // its num_buffers field
constexpr uint32_t kMaxFrame = 65550;     // a 64 KiB GSO frame with its Ethernet and VLAN headers
constexpr int kFramesPerTurn = 256;       // then the interrupt, so the guest drains meanwhile

struct Counters {
  std::atomic<uint64_t> rxBytes{0}, rxFrames{0}, rxDropped{0}, txBytes{0}, txFrames{0}, txDropped{0};
};

class NetQueue : public Napi::ObjectWrap<NetQueue> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeNetQueue",
                       {InstanceMethod<&NetQueue::Guarded<&NetQueue::Stop>>("stop"),
                        InstanceMethod<&NetQueue::Guarded<&NetQueue::TakeCounters>>("takeCounters"),
                        InstanceMethod<&NetQueue::Guarded<&NetQueue::Interrupts>>("interrupts")});
  }

  explicit NetQueue(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NetQueue>(info) {}
  ~NetQueue() override { t_.Join(); }

  TERN_GUARDED_METHODS(NetQueue)

  bool Start(Napi::Env env, Napi::Object o, Napi::Function onBroken);

 private:
  // What a turn of serving ended with: more to do at once, or what to wait for.
  enum class Turn { kMore, kWaitKick, kWaitTap, kBroken };
  void Run() noexcept;
  Turn Transmit();
  // Transmit: make the chains used so far visible to the driver, with the interrupt it asked
  // for; at a stop that interrupt is owed instead (stop() reports it) and not raised here.
  void PublishTransmitted(bool stopping = false);
  Turn Receive();
  // Put the held frame into the guest's chains; false with *noRoom when they are too few (all
  // the driver had made available when it looked), or with *err when one is broken.
  bool Deliver(bool* noRoom, uint16_t* lookedAt, std::string* err);
  Napi::Value CountersObject(Napi::Env env);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value TakeCounters(const Napi::CallbackInfo& info) { return CountersObject(info.Env()); }
  Napi::Value Interrupts(const Napi::CallbackInfo& info) { return t_.InterruptsObject(info.Env()); }

  QueueThread t_;
  int tapFd_ = -1;
  bool receive_ = false;
  bool mergeable_ = false;
  // Transmit: how long a bulk turn's completions wait for the driver's next frames (0: never).
  int64_t holdUs_ = 0;
  uint32_t holdMinFrame_ = 0;
  uint16_t publishedUsed_ = 0;  // the used index the driver was last shown
  bool held_ = false;           // the last turn's completions wait for the next turn or holdUs_
  bool interruptOwed_ = false;  // chains handed back at the stop call for an interrupt
  std::vector<uint8_t> frame_;  // receive: the frame read from the tap, header first
  size_t frameLen_ = 0;         // 0: none held
  Counters counters_;
};

bool NetQueue::Start(Napi::Env env, Napi::Object o, Napi::Function onBroken) {
  if (!t_.Parse(env, o, "serveNetQueue")) return false;
  uint32_t tap = 0;
  if (!GetField(o, "tapFd", &tap)) return false;
  if (tap > INT_MAX) return ThrowError(env, "serveNetQueue: a file descriptor out of range"), false;
  tapFd_ = static_cast<int>(tap);
  if (!GetBool(o, "serveNetQueue", "receive", &receive_) || !GetBool(o, "serveNetQueue", "mergeable", &mergeable_)) return false;
  uint32_t holdUs = 0;
  if (!GetOptField(o, "txHoldUs", &holdUs) || !GetOptField(o, "txHoldMinFrame", &holdMinFrame_)) return false;
  if (holdUs > 100000) return ThrowError(env, "serveNetQueue: txHoldUs above 100 ms"), false;
  holdUs_ = holdUs;
  publishedUsed_ = t_.queue->nextUsed();
  if (receive_) frame_.resize(kHeaderBytes + kMaxFrame);
  return t_.Launch(env, onBroken, "tern net queue", [this] { Run(); });
}

void NetQueue::Run() noexcept {
  for (;;) {
    Turn turn = receive_ ? Receive() : Transmit();
    if (turn == Turn::kBroken) return;
    if (turn == Turn::kMore) {
      if (t_.stopping()) break;
      continue;
    }
    // (a kick also ends a wait for the tap: it costs one more look)
    bool tapReady, timedOut;
    if (!t_.Wait(turn == Turn::kWaitTap ? tapFd_ : -1, receive_ ? POLLIN : POLLOUT, held_ ? holdUs_ : -1, &tapReady, &timedOut)) break;
    if (timedOut) PublishTransmitted();  // no frame came: the held ones go back now
  }
  // Stopped: what stop() hands back as nextUsed is what the driver sees.
  if (!receive_) PublishTransmitted(true);
}

void NetQueue::PublishTransmitted(bool stopping) {
  SplitQueue& q = *t_.queue;
  held_ = false;
  if (q.nextUsed() == publishedUsed_) return;
  q.PublishUsed();
  if (stopping) {
    interruptOwed_ = q.ShouldInterrupt(publishedUsed_);
  } else {
    t_.InterruptIfDue(publishedUsed_);
  }
  publishedUsed_ = q.nextUsed();
}

NetQueue::Turn NetQueue::Transmit() {
  SplitQueue& q = *t_.queue;
  bool bulk = false;  // a frame of this turn is a large (segmentation offload) one
  Chain chain;
  std::string err;
  std::vector<iovec> iov;
  Turn turn = Turn::kMore;
  for (int n = 0;; n++) {
    if (n == kFramesPerTurn || t_.stopping()) break;
    uint16_t at = q.nextAvail();
    if (!q.Pop(&chain, &err)) {
      if (!err.empty()) break;
      // Drained: with EVENT_IDX, publish avail_event, then look again for chains posted
      // before the driver could see it.
      turn = Turn::kWaitKick;
      if (!q.eventIdx()) break;
      q.PublishAvailEvent();
      int more = q.Available(&err);
      if (more <= 0) break;
      turn = Turn::kMore;
      continue;
    }
    if (chain.readableBytes < kHeaderBytes) {
      err = "a transmit chain of " + std::to_string(chain.readableBytes) + " bytes, shorter than the 12-byte virtio-net header";
      break;
    }
    if (chain.readableBytes > kHeaderBytes + kMaxFrame) {
      err = "a transmit frame of " + std::to_string(chain.readableBytes - kHeaderBytes) + " bytes, more than " + std::to_string(kMaxFrame);
      break;
    }
    iov.clear();
    ChainIovecs(chain.readable, 0, chain.readableBytes, &iov);
    if (iov.size() > IOV_MAX) {
      err = "a transmit chain of more than " + std::to_string(IOV_MAX) + " buffers";
      break;
    }
    ssize_t w;
    do w = writev(tapFd_, iov.data(), static_cast<int>(iov.size()));
    while (w < 0 && errno == EINTR);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      q.Rewind(at);  // the tap is full: the frame stays in the ring until it takes more
      turn = Turn::kWaitTap;
      break;
    }
    if (w < 0 && errno == EINVAL) {
      err = "the tap refused a frame: its virtio-net header is malformed";
      break;
    }
    if (w < 0) {
      counters_.txDropped++;  // no link (EIO): dropped, as by a NIC
    } else {
      counters_.txFrames++;
      counters_.txBytes += chain.readableBytes - kHeaderBytes;
    }
    bulk = bulk || chain.readableBytes - kHeaderBytes >= holdMinFrame_;
    q.PushUsed(chain.head, 0, false);
  }
  // A bulk sender's frames come in bursts: those sent go back to the driver together with the
  // next burst's, or after holdUs_ if none comes, so that the guest takes one interrupt for
  // both (a device faster than its driver would otherwise interrupt it for every frame). Only
  // once: the turn after a hold gives everything back. (A TCP sender keeps at least two such
  // frames in flight, so the next one comes without waiting for these; a hold that runs out
  // delays only the freeing of frames already on the wire.)
  if (err.empty() && turn == Turn::kWaitKick && bulk && holdUs_ > 0 && !held_ && q.nextUsed() != publishedUsed_) {
    held_ = true;
    return turn;
  }
  PublishTransmitted();
  if (!err.empty()) return t_.Broken(err), Turn::kBroken;
  return turn;
}

bool NetQueue::Deliver(bool* noRoom, uint16_t* lookedAt, std::string* err) {
  SplitQueue& q = *t_.queue;
  uint16_t start = q.nextAvail();
  std::vector<Chain> chains;
  uint64_t room = 0;
  while (room < frameLen_) {
    Chain c;
    if (!q.Pop(&c, err)) break;
    if (c.writableBytes < kHeaderBytes || !c.readable.empty()) {
      *err = c.readable.empty() ? "a receive chain of " + std::to_string(c.writableBytes) + " bytes, shorter than the 12-byte virtio-net header"
                                : std::string("a receive chain with a device-readable buffer");
      return false;
    }
    room += c.writableBytes;
    chains.push_back(std::move(c));
    if (!mergeable_) break;
  }
  if (!err->empty()) return false;
  if (chains.empty() || (mergeable_ && room < frameLen_)) {
    q.Rewind(start);
    *noRoom = true;
    *lookedAt = static_cast<uint16_t>(chains.size());
    return false;
  }
  // Without mergeable buffers a frame larger than its chain is cut to it (the guest posted
  // buffers that small); with them it always fits.
  std::vector<uint32_t> lengths;
  uint64_t done = 0;
  for (const Chain& c : chains) {
    uint64_t n = std::min<uint64_t>(c.writableBytes, frameLen_ - done);
    if (n == 0) break;
    CopyToChain(t_.mem, c.writable, 0, frame_.data() + done, n);
    lengths.push_back(static_cast<uint32_t>(n));
    done += n;
  }
  uint16_t buffers = static_cast<uint16_t>(lengths.size());
  CopyToChain(t_.mem, chains[0].writable, kNumBuffersAt, &buffers, 2);
  for (size_t i = 0; i < lengths.size(); i++) q.PushUsed(chains[i].head, lengths[i], false);
  // Chains taken beyond the frame's go back to the ring; the frame's are handed back at once.
  q.Rewind(static_cast<uint16_t>(start + buffers));
  q.PublishUsed();
  counters_.rxFrames++;
  counters_.rxBytes += frameLen_ - kHeaderBytes;
  frameLen_ = 0;
  return true;
}

NetQueue::Turn NetQueue::Receive() {
  SplitQueue& q = *t_.queue;
  uint16_t usedBefore = q.nextUsed();
  std::string err;
  Turn turn = Turn::kMore;
  for (int n = 0; n < kFramesPerTurn && !t_.stopping(); n++) {
    bool noRoom = false;
    uint16_t lookedAt = 0;  // chains past nextAvail found too few for the frame
    if (frameLen_ == 0) {
      // Nothing is read from the tap while the guest has no buffer at all.
      int avail = q.Available(&err);
      if (avail < 0) break;
      if (avail == 0) {
        noRoom = true;
      } else {
        ssize_t r;
        do r = read(tapFd_, frame_.data(), frame_.size());
        while (r < 0 && errno == EINTR);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
          turn = Turn::kWaitTap;
          break;
        }
        if (r < 0) {
          err = std::string("the tap cannot be read: ") + strerror(errno);
          break;
        }
        if (r < static_cast<ssize_t>(kHeaderBytes)) continue;  // nothing a guest could take
        frameLen_ = static_cast<size_t>(r);
      }
    }
    if (frameLen_ > 0 && !Deliver(&noRoom, &lookedAt, &err) && !err.empty()) break;
    if (noRoom) {
      turn = Turn::kWaitKick;
      if (!q.eventIdx()) break;
      // Every chain up to nextAvail was taken into account (Deliver gave back the ones it
      // could not fill a frame with): ask for a kick at the driver's next buffer, then look
      // again for one posted meanwhile. (Publishing an index read later would skip buffers
      // posted in between: the driver would not kick for them, and nothing else would wake
      // this thread.)
      uint16_t seen = static_cast<uint16_t>(q.nextAvail() + lookedAt);
      q.PublishAvailEvent(seen);
      if (q.AvailIndex() == seen) break;
      turn = Turn::kMore;
    }
  }
  t_.InterruptIfDue(usedBefore);
  if (!err.empty()) return t_.Broken(err), Turn::kBroken;
  return turn;
}

Napi::Value NetQueue::CountersObject(Napi::Env env) {
  Napi::Object out = Napi::Object::New(env);
  auto set = [&](const char* k, std::atomic<uint64_t>& v) { out.Set(k, Napi::Number::New(env, static_cast<double>(v.exchange(0)))); };
  set("rx_bytes", counters_.rxBytes);
  set("rx_frames", counters_.rxFrames);
  set("rx_dropped", counters_.rxDropped);
  set("tx_bytes", counters_.txBytes);
  set("tx_frames", counters_.txFrames);
  set("tx_dropped", counters_.txDropped);
  return out;
}

// Ends the thread (after the frame it is moving) and returns the cursors and the counters
// gathered since the last takeCounters(); a received frame still waiting for buffers is dropped.
Napi::Value NetQueue::Stop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  t_.Join();
  if (frameLen_ > 0) {
    counters_.rxDropped++;
    frameLen_ = 0;
  }
  return t_.StopResult(env, CountersObject(env), interruptOwed_);
}

Napi::Value ServeNetQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsFunction()) {
    ThrowTypeError(env, "serveNetQueue(options, onBroken)");
    return env.Undefined();
  }
  Napi::Object obj = GetAddonData(env)->netQueueCtor.New({});
  NetQueue* q = NetQueue::Unwrap(obj);
  if (!q->Start(env, info[0].As<Napi::Object>(), info[1].As<Napi::Function>())) return env.Undefined();
  return obj;
}

}  // namespace

void InitNetQueue(Napi::Env env, Napi::Object exports) {
  GetAddonData(env)->netQueueCtor = Napi::Persistent(NetQueue::Define(env));
  exports.Set("serveNetQueue", Napi::Function::New(env, Guarded<ServeNetQueue>, "serveNetQueue"));
}

}  // namespace tern
