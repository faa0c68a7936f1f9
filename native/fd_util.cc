// errno -> JS Error, base64, value conversion, the eventfd helpers and pseudo-terminals.
#include "fd_util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "common.h"

namespace tern {

const char* const kInternalToken = "tern-native-internal";

std::string ErrnoName(int err) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char* n = strerrorname_np(err);
  if (n) return n;
#endif
  return "E" + std::to_string(err);
}

Napi::Error ErrnoError(Napi::Env env, const std::string& what, int err) {
  std::string name = ErrnoName(err);
  Napi::Error e = Napi::Error::New(env, what + " failed: " + strerror(err) + " (" + name + ")");
  e.Set("code", Napi::String::New(env, name));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("syscall", Napi::String::New(env, what));
  return e;
}

void ThrowErrno(Napi::Env env, const std::string& what, int err) {
  ErrnoError(env, what, err).ThrowAsJavaScriptException();
}

void ThrowError(Napi::Env env, const std::string& message, const char* code) {
  Napi::Error e = Napi::Error::New(env, message);
  if (code) e.Set("code", Napi::String::New(env, code));
  e.ThrowAsJavaScriptException();
}

std::string DescribeException(Napi::Env env, const Napi::Error& e, const std::string& fallback) {
  Napi::Value v = e.Value();
  std::string out = fallback;
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

void ThrowTypeError(Napi::Env env, const std::string& message) {
  Napi::TypeError::New(env, message).ThrowAsJavaScriptException();
}

static const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string Base64Encode(const void* data, size_t len) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  std::string out;
  out.reserve((len + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < len; i += 3) {
    uint32_t v = (p[i] << 16) | (p[i + 1] << 8) | p[i + 2];
    out += kB64[(v >> 18) & 63];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  if (i < len) {
    uint32_t v = p[i] << 16;
    if (i + 1 < len) v |= p[i + 1] << 8;
    out += kB64[(v >> 18) & 63];
    out += kB64[(v >> 12) & 63];
    out += (i + 1 < len) ? kB64[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

bool Base64Decode(const std::string& in, std::vector<uint8_t>* out) {
  out->clear();
  out->reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z') v = c - 'A';
    else if (c >= 'a' && c <= 'z') v = c - 'a' + 26;
    else if (c >= '0' && c <= '9') v = c - '0' + 52;
    else if (c == '+' || c == '-') v = 62;
    else if (c == '/' || c == '_') v = 63;
    else if (c == '=') { pad++; continue; }
    else if (c == '\n' || c == '\r' || c == ' ') continue;
    else return false;
    if (pad) return false;  // data after padding
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(static_cast<uint8_t>((acc >> bits) & 0xff));
    }
  }
  return pad <= 2;
}

int IoctlRetry(int fd, unsigned long req, void* arg) {
  int rc;
  do {
    rc = ioctl(fd, req, arg);
  } while (rc < 0 && errno == EINTR);
  return rc;
}

// ---- eventfd helpers -------------------------------------------------------------------

static Napi::Value EventFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t initial = 0;
  uint64_t flags = EFD_CLOEXEC | EFD_NONBLOCK;
  if (info.Length() > 0 && !info[0].IsUndefined() && !ToUint(env, info[0], "eventfd: initial", UINT32_MAX, &initial))
    return env.Undefined();
  if (info.Length() > 1 && !info[1].IsUndefined() && !ToUint(env, info[1], "eventfd: flags", INT32_MAX, &flags))
    return env.Undefined();
  int fd = eventfd(static_cast<unsigned>(initial), static_cast<int>(flags));
  if (fd < 0) {
    ThrowErrno(env, "eventfd", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, fd);
}

static bool FdArg(const Napi::CallbackInfo& info, size_t i, int* fd) { return ArgFd(info, i, "fd", fd); }

// A new pseudo-terminal for a console in pty mode: its master (non-blocking, close-on-exec),
// the path of its slave, which the user opens, and an fd of the slave that the VMM keeps open:
// without one, the master's reads fail (EIO) whenever no user has the slave open, and the slave
// is set raw, since data written to the master passes through the slave's line discipline (an
// echo would send the guest's output back to it as input).
static Napi::Value OpenPty(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    ThrowErrno(env, "posix_openpt", errno);
    return env.Undefined();
  }
  char name[128];
  const char* failed = nullptr;
  int slave = -1;
  struct termios t;
  if (grantpt(fd) < 0) failed = "grantpt";
  else if (unlockpt(fd) < 0) failed = "unlockpt";
  else if (ptsname_r(fd, name, sizeof name) != 0) failed = "ptsname_r";
  else if ((slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW)) < 0) failed = "open";
  else if (tcgetattr(slave, &t) < 0) failed = "tcgetattr";
  else {
    cfmakeraw(&t);
    if (tcsetattr(slave, TCSANOW, &t) < 0) failed = "tcsetattr";
  }
  if (failed) {
    int err = errno;
    if (slave >= 0) close(slave);
    close(fd);
    ThrowErrno(env, failed, err);
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("fd", Napi::Number::New(env, fd));
  out.Set("path", Napi::String::New(env, name));
  out.Set("slaveFd", Napi::Number::New(env, slave));
  return out;
}

static Napi::Value EventFdRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return env.Undefined();
  uint64_t v;
  ssize_t n;
  do {
    n = read(fd, &v, sizeof v);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return env.Null();
    ThrowErrno(env, "eventfd read", errno);
    return env.Undefined();
  }
  if (n != sizeof v) {
    ThrowError(env, "eventfd read: short read", "EIO");
    return env.Undefined();
  }
  return Big(env, v);
}

static Napi::Value EventFdWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return env.Undefined();
  uint64_t v = 1;
  // The counter's maximum is 2^64-2: eventfd refuses 2^64-1.
  if (info.Length() > 1 && !info[1].IsUndefined() && !ToUint(env, info[1], "eventfdWrite: value", UINT64_MAX - 1, &v))
    return env.Undefined();
  ssize_t n;
  do {
    n = write(fd, &v, sizeof v);
  } while (n < 0 && errno == EINTR);
  if (n < 0) ThrowErrno(env, "eventfd write", errno);
  return env.Undefined();
}

static Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return env.Undefined();
  if (close(fd) < 0 && errno != EINTR) ThrowErrno(env, "close", errno);
  return env.Undefined();
}

// flock(2) on an fd JS opened (Node has no binding for it). Returns false when the lock is
// held elsewhere and nonblocking was asked for, so callers can tell "busy" from a failure.
static Napi::Value Flock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return env.Undefined();
  bool exclusive = true, nonblocking = false, unlock = false;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    if (!info[1].IsObject()) {
      ThrowTypeError(env, "flock: options must be an object");
      return env.Undefined();
    }
    Napi::Object o = info[1].As<Napi::Object>();
    if (o.Has("exclusive")) exclusive = o.Get("exclusive").ToBoolean();
    if (o.Has("nonblocking")) nonblocking = o.Get("nonblocking").ToBoolean();
    if (o.Has("unlock")) unlock = o.Get("unlock").ToBoolean();
  }
  int op = unlock ? LOCK_UN : (exclusive ? LOCK_EX : LOCK_SH);
  if (nonblocking) op |= LOCK_NB;
  int rc;
  do {
    rc = flock(fd, op);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    if (errno == EWOULDBLOCK && nonblocking) return Napi::Boolean::New(env, false);
    ThrowErrno(env, "flock", errno);
    return env.Undefined();
  }
  return Napi::Boolean::New(env, true);
}

// lseek(2) with SEEK_DATA or SEEK_HOLE (Node has neither): where the next data or hole at or
// after `offset` starts in a sparse file, or -1 when there is no more data (ENXIO).
static Napi::Value SeekExtent(const Napi::CallbackInfo& info, int whence, const char* what) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return env.Undefined();
  uint64_t offset;
  if (!ArgUint(info, 1, std::string(what) + ": offset", INT64_MAX, &offset)) return env.Undefined();
  off_t r = lseek(fd, static_cast<off_t>(offset), whence);
  if (r < 0) {
    if (errno == ENXIO) return Napi::Number::New(env, -1);
    ThrowErrno(env, what, errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

static Napi::Value SeekData(const Napi::CallbackInfo& info) { return SeekExtent(info, SEEK_DATA, "lseek(SEEK_DATA)"); }
static Napi::Value SeekHole(const Napi::CallbackInfo& info) { return SeekExtent(info, SEEK_HOLE, "lseek(SEEK_HOLE)"); }

// renameat2(RENAME_NOREPLACE) (Node has no binding): rename that fails with EEXIST instead of
// replacing an existing target, atomically, so no check-then-rename race exists.
static Napi::Value RenameNoReplace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
    ThrowTypeError(env, "renameNoReplace: expected two paths");
    return env.Undefined();
  }
  std::string from = info[0].As<Napi::String>().Utf8Value();
  std::string to = info[1].As<Napi::String>().Utf8Value();
  if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) < 0) {
    ThrowErrno(env, "renameat2", errno);
  }
  return env.Undefined();
}

// fallocate(2) (Node has no binding): punches holes in or zeroes a range of an image file.
// Only the hole-punching and zeroing modes, always with FALLOC_FL_KEEP_SIZE, so a disk image
// never changes size. Returns false when the file system does not support the mode
// (EOPNOTSUPP), so the caller can write zeroes instead.
static Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!FdArg(info, 0, &fd)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsString()) {
    ThrowTypeError(env, "fallocate: mode must be 'punch-hole' or 'zero-range'");
    return env.Undefined();
  }
  std::string m = info[1].As<Napi::String>().Utf8Value();
  int mode;
  if (m == "punch-hole") mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  else if (m == "zero-range") mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
  else {
    ThrowTypeError(env, "fallocate: mode must be 'punch-hole' or 'zero-range'");
    return env.Undefined();
  }
  uint64_t offset, length;
  if (!ArgUint(info, 2, "fallocate: offset", INT64_MAX, &offset)) return env.Undefined();
  if (!ArgUint(info, 3, "fallocate: length", INT64_MAX - offset, &length)) return env.Undefined();
  int rc;
  do {
    rc = fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    if (errno == EOPNOTSUPP) return Napi::Boolean::New(env, false);
    ThrowErrno(env, "fallocate", errno);
    return env.Undefined();
  }
  return Napi::Boolean::New(env, true);
}

// Zeroed memory aligned to 4 KiB, as O_DIRECT reads and writes need (a Node Buffer's address
// has no such guarantee). Freed when the ArrayBuffer is collected.
static Napi::Value AlignedBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t size;
  if (!ArgUint(info, 0, "alignedBuffer: size", 64ull << 20, &size)) return env.Undefined();
  void* p = nullptr;
  size_t bytes = size == 0 ? 4096 : static_cast<size_t>(size);
  int err = posix_memalign(&p, 4096, bytes);
  if (err != 0) {
    ThrowErrno(env, "posix_memalign", err);
    return env.Undefined();
  }
  memset(p, 0, bytes);
  return Napi::ArrayBuffer::New(env, p, static_cast<size_t>(size), [](Napi::Env, void* data) { free(data); });
}

void InitFdUtil(Napi::Env env, Napi::Object exports) {
  exports.Set("renameNoReplace", Napi::Function::New(env, Guarded<RenameNoReplace>, "renameNoReplace"));
  exports.Set("seekData", Napi::Function::New(env, Guarded<SeekData>, "seekData"));
  exports.Set("seekHole", Napi::Function::New(env, Guarded<SeekHole>, "seekHole"));
  exports.Set("eventfd", Napi::Function::New(env, Guarded<EventFd>, "eventfd"));
  exports.Set("eventfdRead", Napi::Function::New(env, Guarded<EventFdRead>, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, Guarded<EventFdWrite>, "eventfdWrite"));
  exports.Set("closeFd", Napi::Function::New(env, Guarded<CloseFd>, "closeFd"));
  exports.Set("openPty", Napi::Function::New(env, Guarded<OpenPty>, "openPty"));
  exports.Set("flock", Napi::Function::New(env, Guarded<Flock>, "flock"));
  exports.Set("fallocate", Napi::Function::New(env, Guarded<Fallocate>, "fallocate"));
  exports.Set("alignedBuffer", Napi::Function::New(env, Guarded<AlignedBuffer>, "alignedBuffer"));
}

}  // namespace tern
