// Split virtqueue over host mappings of guest RAM; see virtqueue.h. x86 only: the rings are
// little-endian and so is the host.
#include "virtqueue.h"

#include <algorithm>
#include <cstring>

namespace tern {

namespace {

constexpr uint32_t kMaxQueueSize = 32768;
constexpr uint16_t kDescNext = 1;
constexpr uint16_t kDescWrite = 2;
constexpr uint16_t kDescIndirect = 4;
constexpr uint16_t kAvailNoInterrupt = 1;
constexpr uint64_t kDescSize = 16;
constexpr uint64_t kUsedElemSize = 8;
constexpr uint64_t kMaxChainBytes = 0xffffffffull;
constexpr uint64_t kPageShift = 12;

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

std::string Hex(uint64_t v) {
  char b[24];
  snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

bool IsPow2Size(uint32_t s) { return s >= 1 && s <= kMaxQueueSize && (s & (s - 1)) == 0; }

}  // namespace

uint8_t* GuestRamMap::Translate(uint64_t addr, uint64_t len) const {
  for (const RamRange& r : ranges_) {
    if (addr >= r.guestAddress && len <= r.size && addr - r.guestAddress <= r.size - len) return r.host + (addr - r.guestAddress);
  }
  return nullptr;
}

void GuestRamMap::MarkDirty(uint64_t addr, uint64_t len) const {
  if (len == 0) return;
  for (const RamRange& r : ranges_) {
    if (!r.dirty || addr < r.guestAddress || addr - r.guestAddress >= r.size) continue;
    uint64_t first = (addr - r.guestAddress) >> kPageShift;
    uint64_t last = (addr - r.guestAddress + len - 1) >> kPageShift;
    for (uint64_t p = first; p <= last && (p >> 3) < r.dirtyBytes; p++) {
      __atomic_fetch_or(r.dirty + (p >> 3), static_cast<uint8_t>(1u << (p & 7)), __ATOMIC_RELAXED);
    }
    return;
  }
}

std::string SplitQueue::RingsProblem() const {
  if (!IsPow2Size(q_.size)) return "queue size " + std::to_string(q_.size) + " is not a power of two from 1 to 32768";
  struct Ring {
    const char* what;
    uint64_t addr, align, len;
  } rings[] = {
      {"descriptor table", q_.desc, 16, kDescSize * q_.size},
      {"available ring", q_.avail, 2, 6 + 2ull * q_.size},
      {"used ring", q_.used, 4, 6 + kUsedElemSize * q_.size},
  };
  for (const Ring& r : rings) {
    if (r.addr % r.align != 0) return std::string(r.what) + " at " + Hex(r.addr) + " is not " + std::to_string(r.align) + "-byte aligned";
    if (!mem_.Translate(r.addr, r.len)) return std::string(r.what) + " at " + Hex(r.addr) + "+" + Hex(r.len) + " is not inside guest RAM";
  }
  return "";
}

// The index and event fields are exchanged with the driver: atomic, and sequentially
// consistent, which is also the barrier the notification protocol needs.
uint16_t SplitQueue::Load16(uint64_t addr) const {
  return __atomic_load_n(reinterpret_cast<uint16_t*>(mem_.Translate(addr, 2)), __ATOMIC_SEQ_CST);
}

void SplitQueue::Store16(uint64_t addr, uint16_t v) {
  __atomic_store_n(reinterpret_cast<uint16_t*>(mem_.Translate(addr, 2)), v, __ATOMIC_SEQ_CST);
  mem_.MarkDirty(addr, 2);
}

int SplitQueue::Available(std::string* err) const {
  uint16_t idx = Load16(q_.avail + 2);
  uint16_t n = static_cast<uint16_t>(idx - nextAvail_);
  if (n > q_.size) {
    *err = "available index " + std::to_string(idx) + " is " + std::to_string(n) + " entries past the device's " + std::to_string(nextAvail_) +
           ", more than the queue size " + std::to_string(q_.size);
    return -1;
  }
  return n;
}

bool SplitQueue::Pop(Chain* out, std::string* err) {
  out->Clear();
  int n = Available(err);
  if (n <= 0) return false;
  uint32_t slot = nextAvail_ % q_.size;
  uint16_t head;
  memcpy(&head, mem_.Translate(q_.avail + 4 + 2ull * slot, 2), 2);
  if (head >= q_.size) {
    *err = "available ring entry " + std::to_string(slot) + ": head descriptor " + std::to_string(head) + " is not below the queue size " + std::to_string(q_.size);
    return false;
  }
  out->head = head;
  uint64_t table = q_.desc;
  uint32_t entries = q_.size;
  bool indirect = false;
  uint32_t index = head;
  uint32_t buffers = 0;
  auto where = [&]() { return "chain " + std::to_string(head) + (indirect ? ": indirect table entry " : ": descriptor ") + std::to_string(index); };
  for (;;) {
    const uint8_t* dp = mem_.Translate(table + kDescSize * index, kDescSize);
    if (!dp) {
      *err = where() + ": the descriptor is not inside guest RAM";
      return false;
    }
    Desc d;
    memcpy(&d.addr, dp, 8);
    memcpy(&d.len, dp + 8, 4);
    memcpy(&d.flags, dp + 12, 2);
    memcpy(&d.next, dp + 14, 2);
    if (d.flags & kDescIndirect) {
      if (!q_.indirect) return *err = where() + ": INDIRECT, but indirect descriptors were not negotiated", false;
      if (indirect) return *err = where() + ": INDIRECT inside an indirect table", false;
      if (d.flags & kDescNext) return *err = where() + ": INDIRECT together with NEXT", false;
      if (d.len == 0 || d.len % kDescSize != 0) return *err = where() + ": indirect table length " + std::to_string(d.len) + " is not a non-zero multiple of 16", false;
      if (d.len > kDescSize * q_.size) return *err = where() + ": indirect table larger than the queue size", false;
      if (!mem_.Translate(d.addr, d.len)) return *err = where() + ": indirect table " + Hex(d.addr) + "+" + Hex(d.len) + " is not inside guest RAM", false;
      table = d.addr;
      entries = d.len / kDescSize;
      indirect = true;
      index = 0;
      continue;
    }
    if (++buffers > q_.size) return *err = "chain " + std::to_string(head) + ": more than " + std::to_string(q_.size) + " descriptors (the queue size), or a loop", false;
    if (d.len == 0) return *err = where() + ": zero-length buffer", false;
    uint8_t* host = mem_.Translate(d.addr, d.len);
    if (!host) return *err = where() + ": buffer " + Hex(d.addr) + "+" + Hex(d.len) + " is not inside guest RAM", false;
    if (d.flags & kDescWrite) {
      if (out->writableBytes + d.len > kMaxChainBytes) return *err = "chain " + std::to_string(head) + ": more than 2^32-1 device-writable bytes", false;
      out->writable.push_back({d.addr, d.len, host});
      out->writableBytes += d.len;
    } else {
      if (!out->writable.empty()) return *err = where() + ": device-readable buffer after a device-writable one", false;
      if (out->readableBytes + d.len > kMaxChainBytes) return *err = "chain " + std::to_string(head) + ": more than 2^32-1 device-readable bytes", false;
      out->readable.push_back({d.addr, d.len, host});
      out->readableBytes += d.len;
    }
    if (!(d.flags & kDescNext)) break;
    if (d.next >= entries) {
      *err = where() + ": next index " + std::to_string(d.next) + " is not below the " + (indirect ? "indirect table" : "queue") + " size " + std::to_string(entries);
      return false;
    }
    index = d.next;
  }
  nextAvail_++;
  return true;
}

void SplitQueue::PushUsed(uint16_t head, uint32_t written, bool publish) {
  uint64_t elem = q_.used + 4 + kUsedElemSize * (nextUsed_ % q_.size);
  uint8_t* p = mem_.Translate(elem, kUsedElemSize);
  uint32_t id = head;
  memcpy(p, &id, 4);
  memcpy(p + 4, &written, 4);
  mem_.MarkDirty(elem, kUsedElemSize);
  nextUsed_++;
  if (publish) PublishUsed();
}

void SplitQueue::PublishUsed() { Store16(q_.used + 2, nextUsed_); }

uint16_t SplitQueue::AvailIndex() const { return Load16(q_.avail + 2); }

void SplitQueue::PublishAvailEvent() { PublishAvailEvent(nextAvail_); }

void SplitQueue::PublishAvailEvent(uint16_t at) {
  if (q_.eventIdx) Store16(q_.used + 4 + kUsedElemSize * q_.size, at);
}

bool SplitQueue::ShouldInterrupt(uint16_t usedBefore) const {
  uint16_t moved = static_cast<uint16_t>(nextUsed_ - usedBefore);
  if (moved == 0) return false;
  if (q_.eventIdx) {
    uint16_t event = Load16(q_.avail + 4 + 2ull * q_.size);
    return static_cast<uint16_t>(nextUsed_ - event - 1) < moved;
  }
  return (Load16(q_.avail) & kAvailNoInterrupt) == 0;
}

namespace {

// fn(buffer, offset in it, bytes, bytes before) for each piece of `buffers` from byte `offset`
// on, `len` bytes at most, in order; returns the bytes covered.
template <typename F>
uint64_t ForEachPiece(const std::vector<ChainBuffer>& buffers, uint64_t offset, uint64_t len, F fn) {
  uint64_t skip = offset, done = 0;
  for (const ChainBuffer& b : buffers) {
    if (done >= len) break;
    if (skip >= b.len) {
      skip -= b.len;
      continue;
    }
    uint64_t n = std::min<uint64_t>(b.len - skip, len - done);
    fn(b, skip, n, done);
    done += n;
    skip = 0;
  }
  return done;
}

}  // namespace

uint64_t ChainIovecs(const std::vector<ChainBuffer>& buffers, uint64_t offset, uint64_t len, std::vector<iovec>* out) {
  return ForEachPiece(buffers, offset, len, [&](const ChainBuffer& b, uint64_t at, uint64_t n, uint64_t) { out->push_back({b.host + at, static_cast<size_t>(n)}); });
}

uint64_t CopyFromChain(const std::vector<ChainBuffer>& buffers, uint64_t offset, void* to, uint64_t len) {
  return ForEachPiece(buffers, offset, len, [&](const ChainBuffer& b, uint64_t at, uint64_t n, uint64_t done) { memcpy(static_cast<uint8_t*>(to) + done, b.host + at, n); });
}

uint64_t CopyToChain(const GuestRamMap& mem, const std::vector<ChainBuffer>& buffers, uint64_t offset, const void* from, uint64_t len) {
  return ForEachPiece(buffers, offset, len, [&](const ChainBuffer& b, uint64_t at, uint64_t n, uint64_t done) {
    memcpy(b.host + at, static_cast<const uint8_t*>(from) + done, n);
    mem.MarkDirty(b.addr + at, n);
  });
}

void MarkChainDirty(const GuestRamMap& mem, const std::vector<ChainBuffer>& buffers, uint64_t offset, uint64_t len) {
  ForEachPiece(buffers, offset, len, [&](const ChainBuffer& b, uint64_t at, uint64_t n, uint64_t) { mem.MarkDirty(b.addr + at, n); });
}

}  // namespace tern
