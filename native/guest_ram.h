// Host mappings of guest RAM and the VMM-side dirty bitmaps, exposed to JavaScript as
// zero-copy external ArrayBuffers that keep the mapping alive while referenced.
#pragma once

#include <napi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tern {

// One mmap'ed range; unmapped when the last owner (VM or ArrayBuffer chunk) lets go.
class HostMapping {
 public:
  HostMapping(uint8_t* base, size_t size) : base_(base), size_(size) {}
  ~HostMapping();
  HostMapping(const HostMapping&) = delete;
  HostMapping& operator=(const HostMapping&) = delete;
  uint8_t* base() const { return base_; }
  size_t size() const { return size_; }

 private:
  uint8_t* base_;
  size_t size_;
};

struct RamOptions {
  std::string name = "tern-guest-ram";
  size_t size = 0;
  int fromFd = -1;        // map this fd instead of creating a memfd
  uint64_t fileOffset = 0;
  bool privateMap = false;
  // madvise(MADV_HUGEPAGE) on a shared mapping: the kernel backs it with 2 MiB pages where its
  // shmem_enabled setting allows (advise and up), and KVM can then map the guest in 2 MiB pages.
  bool hugePages = false;
};

struct GuestRam {
  int fd = -1;  // owned by the caller after success
  std::shared_ptr<HostMapping> mapping;
};

// Create (or map) the backing of a RAM slot. On failure sets *failedCall (the syscall, or
// empty when fromFd is shorter than fileOffset + size) and *err.
bool CreateGuestRam(const RamOptions& opts, GuestRam* out, std::string* failedCall, int* err);

// Largest chunk handed to JavaScript (ArrayBuffer size limits).
constexpr size_t kMaxChunk = size_t(1) << 30;

// External ArrayBuffer over [data, data+len) that holds `keep` until collected.
Napi::ArrayBuffer ExternalBuffer(Napi::Env env, void* data, size_t len, std::shared_ptr<void> keep);

// Split a mapping into chunks of at most kMaxChunk bytes.
Napi::Array MappingChunks(Napi::Env env, const std::shared_ptr<HostMapping>& m, size_t chunkSize);

// One bit per 4 KiB page, stored in 64-bit words as KVM_GET_DIRTY_LOG expects.
class DirtyBitmap {
 public:
  explicit DirtyBitmap(size_t pages) : pages_(pages), words_((pages + 63) / 64, 0) {}
  size_t pages() const { return pages_; }
  size_t byteLength() const { return (pages_ + 7) / 8; }
  size_t wordCount() const { return words_.size(); }
  uint64_t* words() { return words_.data(); }
  // Atomically take and clear word i (JS writers mark bytes; native code reads words).
  uint64_t TakeWord(size_t i);

 private:
  size_t pages_;
  std::vector<uint64_t> words_;
};

}  // namespace tern
