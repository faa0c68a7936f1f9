#include "guest_ram.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace tern {

HostMapping::~HostMapping() {
  if (base_ && size_) munmap(base_, size_);
}

bool CreateGuestRam(const RamOptions& opts, GuestRam* out, std::string* failedCall, int* err) {
  int fd = -1;
  if (opts.fromFd >= 0) {
    // Own a private duplicate so the caller may close theirs.
    fd = fcntl(opts.fromFd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
      *failedCall = "fcntl(F_DUPFD_CLOEXEC)";
      *err = errno;
      return false;
    }
    // Touching a mapping beyond the end of the file raises SIGBUS: refuse short files.
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        static_cast<uint64_t>(st.st_size) < opts.fileOffset + opts.size) {
      *failedCall = "";  // not a syscall failure
      *err = EINVAL;
      close(fd);
      return false;
    }
  } else {
    fd = memfd_create(opts.name.c_str(), MFD_CLOEXEC);
    if (fd < 0) {
      *failedCall = "memfd_create";
      *err = errno;
      return false;
    }
    if (ftruncate(fd, static_cast<off_t>(opts.size)) < 0) {
      *failedCall = "ftruncate";
      *err = errno;
      close(fd);
      return false;
    }
  }
  int flags = (opts.privateMap ? MAP_PRIVATE : MAP_SHARED) | MAP_NORESERVE;
  void* p = mmap(nullptr, opts.size, PROT_READ | PROT_WRITE, flags, fd, static_cast<off_t>(opts.fileOffset));
  if (p == MAP_FAILED) {
    *failedCall = "mmap";
    *err = errno;
    close(fd);
    return false;
  }
  // Only advice: a kernel without transparent huge pages (EINVAL) maps 4 KiB pages as before.
  if (opts.hugePages && !opts.privateMap) (void)madvise(p, opts.size, MADV_HUGEPAGE);
  out->fd = fd;
  out->mapping = std::make_shared<HostMapping>(static_cast<uint8_t*>(p), opts.size);
  return true;
}

Napi::ArrayBuffer ExternalBuffer(Napi::Env env, void* data, size_t len, std::shared_ptr<void> keep) {
  auto* hint = new std::shared_ptr<void>(std::move(keep));
  return Napi::ArrayBuffer::New(
      env, data, len, [](Napi::Env, void*, std::shared_ptr<void>* h) { delete h; }, hint);
}

Napi::Array MappingChunks(Napi::Env env, const std::shared_ptr<HostMapping>& m, size_t chunkSize) {
  Napi::Array arr = Napi::Array::New(env);
  uint32_t i = 0;
  for (size_t off = 0; off < m->size(); off += chunkSize) {
    size_t n = std::min(chunkSize, m->size() - off);
    arr.Set(i++, ExternalBuffer(env, m->base() + off, n, m));
  }
  return arr;
}

uint64_t DirtyBitmap::TakeWord(size_t i) {
  return __atomic_exchange_n(&words_[i], 0, __ATOMIC_ACQ_REL);
}

}  // namespace tern
