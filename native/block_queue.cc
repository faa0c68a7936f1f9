// serveBlockQueue(options, onBroken): one virtio-blk request queue served by a native thread.
// The thread sleeps in poll() on the queue's doorbell (its ioeventfd), walks the ring, does
// each request's I/O with preadv/pwritev straight between the raw image and the guest's
// buffers, writes the status and the used ring, marks every page it wrote in the VMM dirty
// bitmap, and raises the queue's interrupt by writing its irqfd. So neither a kick nor an
// interrupt waits for the JavaScript thread.
//
// It holds no policy and no state of its own: the queue's rings, cursors and features and the
// disk's size come from the store through `options`; stop() ends the thread between requests
// and hands back the cursors (and the counters), which the caller records in the store. A
// driver that breaks the queue stops the thread, and onBroken(reason) tells JavaScript, which
// marks the device as needing a reset. Requests are checked exactly as the JavaScript worker
// checks them (src/vmm/device-backends.ts): a request the disk cannot carry out gets an error
// status, only a chain without room for a status breaks the queue.
//
// The thread is created from the JavaScript thread, which runs without a seccomp filter.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "queue_thread.h"

namespace tern {

namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMaxRequest = 4 << 20;  // VIRTIO_BLK_MAX_REQUEST
constexpr uint32_t kIdBytes = 20;
constexpr uint64_t kMaxRanges = 16;
constexpr uint64_t kMaxRangeSectors = (1u << 30) / kSector;
constexpr size_t kZeroChunk = 1 << 20;

enum : uint32_t { kIn = 0, kOut = 1, kFlush = 4, kGetId = 8, kDiscard = 11, kWriteZeroes = 13 };
constexpr uint8_t kOk = 0, kIoErr = 1, kUnsupp = 2;

struct Disk {
  int fd = -1;
  uint64_t capacity = 0;  // sectors
  bool readonly = false;
  std::string id;
};

struct Counters {
  std::atomic<uint64_t> readBytes{0}, readOps{0}, writeBytes{0}, writeOps{0};
};

// Whole transfer of `iov` at `offset`, in batches of IOV_MAX, resuming after short transfers;
// false on an error or on the end of the file.
bool TransferAll(int fd, std::vector<iovec> iov, uint64_t offset, bool write) {
  size_t first = 0;
  while (first < iov.size()) {
    int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = write ? pwritev(fd, &iov[first], count, static_cast<off_t>(offset)) : preadv(fd, &iov[first], count, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    offset += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (left > 0) {
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return true;
}

bool WriteZeroes(int fd, uint64_t offset, uint64_t length, bool punch) {
  if (length == 0) return true;
  int mode = (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
  int rc;
  do rc = fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length));
  while (rc < 0 && errno == EINTR);
  if (rc == 0) return true;
  if (errno != EOPNOTSUPP) return false;
  // A file system without the mode gets zeroes written.
  static const std::vector<uint8_t> zeros(kZeroChunk, 0);
  for (uint64_t done = 0; done < length;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kZeroChunk, length - done));
    if (!TransferAll(fd, {{const_cast<uint8_t*>(zeros.data()), n}}, offset + done, true)) return false;
    done += n;
  }
  return true;
}

class BlockQueue : public Napi::ObjectWrap<BlockQueue> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeBlockQueue",
                       {InstanceMethod<&BlockQueue::Guarded<&BlockQueue::Stop>>("stop"),
                        InstanceMethod<&BlockQueue::Guarded<&BlockQueue::TakeCounters>>("takeCounters"),
                        InstanceMethod<&BlockQueue::Guarded<&BlockQueue::Interrupts>>("interrupts")});
  }

  explicit BlockQueue(const Napi::CallbackInfo& info) : Napi::ObjectWrap<BlockQueue>(info) {}
  ~BlockQueue() override { t_.Join(); }

  TERN_GUARDED_METHODS(BlockQueue)

  // Reads the options and starts the thread; false with a JS exception pending when they are bad.
  bool Start(Napi::Env env, Napi::Object o, Napi::Function onBroken);

 private:
  void Run() noexcept;
  // Serve every chain available; false when the driver broke the queue.
  bool Serve();
  // One request; the bytes written into the chain, or -1 with *err set (no status byte).
  int64_t Handle(const Chain& c, std::string* err);
  uint8_t Read(const Chain& c, uint64_t sector, uint64_t len);
  uint8_t Write(const Chain& c, uint64_t sector, uint64_t len);
  uint8_t Ranges(const Chain& c, uint32_t type);
  Napi::Value CountersObject(Napi::Env env);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value TakeCounters(const Napi::CallbackInfo& info) { return CountersObject(info.Env()); }
  Napi::Value Interrupts(const Napi::CallbackInfo& info) { return t_.InterruptsObject(info.Env()); }

  QueueThread t_;
  Disk disk_;
  Counters counters_;
};

bool BlockQueue::Start(Napi::Env env, Napi::Object o, Napi::Function onBroken) {
  if (!t_.Parse(env, o, "serveBlockQueue")) return false;
  uint32_t image = 0;
  if (!GetField(o, "imageFd", &image)) return false;
  if (image > INT_MAX) return ThrowError(env, "serveBlockQueue: a file descriptor out of range"), false;
  disk_.fd = static_cast<int>(image);
  if (!GetUint(o, "capacity", (1ull << 53) - 1, &disk_.capacity) || !GetBool(o, "serveBlockQueue", "readonly", &disk_.readonly)) return false;
  Napi::Value id = o.Get("id");
  if (!id.IsString()) return ThrowTypeError(env, "serveBlockQueue: id must be a string"), false;
  disk_.id = id.As<Napi::String>().Utf8Value().substr(0, kIdBytes);

  return t_.Launch(env, onBroken, "tern blk queue", [this] { Run(); });
}

void BlockQueue::Run() noexcept {
  if (!Serve()) return;
  bool ignored;
  while (t_.Wait(-1, 0, &ignored)) {
    if (!Serve()) return;
  }
}

bool BlockQueue::Serve() {
  uint16_t usedBefore = t_.queue->nextUsed();
  Chain chain;
  std::string err;
  bool ok = true;
  for (;;) {
    while (!t_.stopping()) {
      if (!t_.queue->Pop(&chain, &err)) break;
      int64_t written = Handle(chain, &err);
      if (written < 0) break;
      t_.queue->PushUsed(chain.head, static_cast<uint32_t>(written));
    }
    if (!err.empty()) {
      ok = false;
      break;
    }
    if (t_.stopping() || !t_.queue->eventIdx()) break;
    // Publish avail_event, then look again for chains posted before the driver could see it.
    t_.queue->PublishAvailEvent();
    int n = t_.queue->Available(&err);
    if (n < 0) {
      ok = false;
      break;
    }
    if (n == 0) break;
  }
  t_.InterruptIfDue(usedBefore);
  if (!ok) t_.Broken(err);
  return ok;
}

int64_t BlockQueue::Handle(const Chain& c, std::string* err) {
  if (c.writableBytes < 1) {
    *err = "a block request with no status byte";
    return -1;
  }
  const uint64_t statusAt = c.writableBytes - 1;
  uint8_t status = kOk;
  uint64_t data = 0;
  uint8_t header[16];
  if (CopyFromChain(c.readable, 0, header, 16) < 16) {
    status = kIoErr;
  } else {
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    switch (type) {
      case kIn:
        status = Read(c, sector, statusAt);
        if (status == kOk) data = statusAt;
        break;
      case kOut:
        status = disk_.readonly ? kIoErr : Write(c, sector, c.readableBytes - 16);
        break;
      case kFlush:
        if (!disk_.readonly) {
          int rc;
          do rc = fsync(disk_.fd);
          while (rc < 0 && errno == EINTR);
          if (rc < 0) status = kIoErr;
        }
        break;
      case kGetId: {
        uint8_t id[kIdBytes] = {0};
        memcpy(id, disk_.id.data(), std::min<size_t>(disk_.id.size(), kIdBytes));
        data = CopyToChain(t_.mem, c.writable, 0, id, std::min<uint64_t>(statusAt, kIdBytes));
        break;
      }
      case kDiscard:
      case kWriteZeroes:
        status = disk_.readonly ? kIoErr : Ranges(c, type);
        break;
      default:
        status = kUnsupp;
    }
  }
  CopyToChain(t_.mem, c.writable, statusAt, &status, 1);
  return static_cast<int64_t>(data + 1);
}

// Whole sectors, at most kMaxRequest, inside the disk.
static bool RangeOk(uint64_t capacity, uint64_t sector, uint64_t len) {
  return len % kSector == 0 && len <= kMaxRequest && sector <= capacity && len / kSector <= capacity - sector;
}

uint8_t BlockQueue::Read(const Chain& c, uint64_t sector, uint64_t len) {
  if (!RangeOk(disk_.capacity, sector, len)) return kIoErr;
  std::vector<iovec> iov;
  ChainIovecs(c.writable, 0, len, &iov);
  if (!TransferAll(disk_.fd, iov, sector * kSector, false)) return kIoErr;
  MarkChainDirty(t_.mem, c.writable, 0, len);
  counters_.readBytes += len;
  counters_.readOps++;
  return kOk;
}

uint8_t BlockQueue::Write(const Chain& c, uint64_t sector, uint64_t len) {
  if (!RangeOk(disk_.capacity, sector, len)) return kIoErr;
  std::vector<iovec> iov;
  ChainIovecs(c.readable, 16, len, &iov);
  if (!TransferAll(disk_.fd, iov, sector * kSector, true)) return kIoErr;
  counters_.writeBytes += len;
  counters_.writeOps++;
  return kOk;
}

// DISCARD and WRITE_ZEROES: a list of {sector u64, sectors u32, flags u32}, checked whole
// before any range is changed.
uint8_t BlockQueue::Ranges(const Chain& c, uint32_t type) {
  uint64_t bytes = c.readableBytes - 16;
  if (bytes == 0 || bytes % 16 != 0 || bytes / 16 > kMaxRanges) return kIoErr;
  uint8_t list[kMaxRanges * 16];
  CopyFromChain(c.readable, 16, list, bytes);
  struct Range {
    uint64_t offset, length;
    bool unmap;
  } ranges[kMaxRanges];
  size_t count = bytes / 16;
  for (size_t i = 0; i < count; i++) {
    uint64_t sector;
    uint32_t sectors, flags;
    memcpy(&sector, list + 16 * i, 8);
    memcpy(&sectors, list + 16 * i + 8, 4);
    memcpy(&flags, list + 16 * i + 12, 4);
    if ((type == kDiscard && flags != 0) || (flags & ~1u)) return kUnsupp;
    if (sectors > kMaxRangeSectors || sector > disk_.capacity || sectors > disk_.capacity - sector) return kIoErr;
    ranges[i] = {sector * kSector, uint64_t(sectors) * kSector, (flags & 1) != 0};
  }
  for (size_t i = 0; i < count; i++) {
    // A discard punches a hole (it reads as zeroes); write-zeroes zeroes the range.
    if (!WriteZeroes(disk_.fd, ranges[i].offset, ranges[i].length, type == kDiscard)) return kIoErr;
  }
  return kOk;
}

Napi::Value BlockQueue::CountersObject(Napi::Env env) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("read_bytes", Napi::Number::New(env, static_cast<double>(counters_.readBytes.exchange(0))));
  out.Set("read_ops", Napi::Number::New(env, static_cast<double>(counters_.readOps.exchange(0))));
  out.Set("write_bytes", Napi::Number::New(env, static_cast<double>(counters_.writeBytes.exchange(0))));
  out.Set("write_ops", Napi::Number::New(env, static_cast<double>(counters_.writeOps.exchange(0))));
  return out;
}

// Ends the thread (after the request it is doing) and returns the cursors and the counters
// gathered since the last takeCounters(). Later calls return the same cursors and no counts.
Napi::Value BlockQueue::Stop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  t_.Join();
  return t_.StopResult(env, CountersObject(env));
}

Napi::Value ServeBlockQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsFunction()) {
    ThrowTypeError(env, "serveBlockQueue(options, onBroken)");
    return env.Undefined();
  }
  Napi::Object obj = GetAddonData(env)->blockQueueCtor.New({});
  BlockQueue* q = BlockQueue::Unwrap(obj);
  if (!q->Start(env, info[0].As<Napi::Object>(), info[1].As<Napi::Function>())) return env.Undefined();
  return obj;
}

}  // namespace

void InitBlockQueue(Napi::Env env, Napi::Object exports) {
  GetAddonData(env)->blockQueueCtor = Napi::Persistent(BlockQueue::Define(env));
  exports.Set("serveBlockQueue", Napi::Function::New(env, Guarded<ServeBlockQueue>, "serveBlockQueue"));
}

}  // namespace tern
