// A split virtqueue (virtio 1.2, 2.7) served from a native thread: the same checks as
// src/devices/virtio/virtqueue.ts, over host mappings of guest RAM. It holds the queue's
// configuration and cursors only while a worker serves the queue; the store gets the cursors
// back when the worker stops. No N-API here: the worker thread must not touch JavaScript.
//
// Everything read from guest memory is untrusted: each descriptor is copied once and only the
// copy is checked and used; a broken queue is an error string, never an assertion.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tern {

// One range of guest RAM mapped at `host`, with the VMM-side dirty bitmap that covers it (one
// bit per 4 KiB page from the range's start; null when writes are not tracked).
struct RamRange {
  uint64_t guestAddress = 0;
  uint64_t size = 0;
  uint8_t* host = nullptr;
  uint8_t* dirty = nullptr;
  size_t dirtyBytes = 0;
};

class GuestRamMap {
 public:
  void Add(const RamRange& r) { ranges_.push_back(r); }
  // Host address of [addr, addr+len) when it lies wholly in one range, else null.
  uint8_t* Translate(uint64_t addr, uint64_t len) const;
  // Mark the pages of [addr, addr+len) dirty (atomically: JavaScript marks the same bytes).
  void MarkDirty(uint64_t addr, uint64_t len) const;

 private:
  std::vector<RamRange> ranges_;
};

struct QueueConfig {
  uint32_t size = 0;
  uint64_t desc = 0, avail = 0, used = 0;
  bool eventIdx = false;
  bool indirect = false;
};

// A buffer of a chain: its guest address, length and host address.
struct ChainBuffer {
  uint64_t addr;
  uint32_t len;
  uint8_t* host;
};

struct Chain {
  uint16_t head = 0;
  std::vector<ChainBuffer> readable, writable;
  uint64_t readableBytes = 0, writableBytes = 0;
  void Clear() {
    readable.clear();
    writable.clear();
    readableBytes = writableBytes = 0;
  }
};

class SplitQueue {
 public:
  SplitQueue(const GuestRamMap& mem, const QueueConfig& q, uint16_t nextAvail, uint16_t nextUsed)
      : mem_(mem), q_(q), nextAvail_(nextAvail), nextUsed_(nextUsed) {}
  // Why the rings cannot be used as configured, or empty.
  std::string RingsProblem() const;
  // Chains available and not yet taken; -1 with *err set when the index is impossible.
  int Available(std::string* err) const;
  // Take the next chain into *out: true when there was one; false with *err set when it is broken.
  bool Pop(Chain* out, std::string* err);
  // Hand a chain back, `written` bytes of it written by the device. Without `publish`, the
  // driver sees it only at the next PublishUsed() (a frame spread over several chains is
  // handed back whole).
  void PushUsed(uint16_t head, uint32_t written, bool publish = true);
  void PublishUsed();
  // Give back the chains taken since the cursor was `nextAvail` and not used: taken again later.
  void Rewind(uint16_t nextAvail) { nextAvail_ = nextAvail; }
  // The driver's available index now.
  uint16_t AvailIndex() const;
  // With EVENT_IDX: ask for a kick at the next chain the driver makes available after `at`
  // (default: after the ones taken).
  void PublishAvailEvent();
  void PublishAvailEvent(uint16_t at);
  // Whether the driver wants an interrupt for what was used since `usedBefore`.
  bool ShouldInterrupt(uint16_t usedBefore) const;
  uint16_t nextAvail() const { return nextAvail_; }
  uint16_t nextUsed() const { return nextUsed_; }
  bool eventIdx() const { return q_.eventIdx; }

 private:
  uint16_t Load16(uint64_t addr) const;
  void Store16(uint64_t addr, uint16_t v);

  const GuestRamMap& mem_;
  QueueConfig q_;
  uint16_t nextAvail_, nextUsed_;
};

// The pieces of `buffers` from byte `offset` on, `len` bytes at most, as iovecs; returns the bytes covered.
uint64_t ChainIovecs(const std::vector<ChainBuffer>& buffers, uint64_t offset, uint64_t len, std::vector<iovec>* out);
// Copy `len` bytes of `buffers` from byte `offset` into `to`; returns the bytes copied.
uint64_t CopyFromChain(const std::vector<ChainBuffer>& buffers, uint64_t offset, void* to, uint64_t len);
// Mark the pages of `len` bytes of `buffers` from byte `offset` on dirty (after the device wrote them).
void MarkChainDirty(const GuestRamMap& mem, const std::vector<ChainBuffer>& buffers, uint64_t offset, uint64_t len);
// Copy `len` bytes into `buffers` from byte `offset` on (pages marked dirty); returns the bytes copied.
uint64_t CopyToChain(const GuestRamMap& mem, const std::vector<ChainBuffer>& buffers, uint64_t offset, const void* from, uint64_t len);

}  // namespace tern
