// File descriptors over a UNIX stream socket (SCM_RIGHTS), which Node cannot send or receive
// itself. Migration hands guest RAM's memfds to a VMM on the same host this way. The socket
// is usually a net.Socket's own fd, non-blocking and read by Node's event loop afterwards:
// both calls wait with poll() when the socket has no room or no data, and recvWithFds never
// reads a byte past the message it was asked for, so the rest of the stream stays Node's.
#include "fd_passing.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common.h"

namespace tern {

namespace {

// What one message may carry: enough for every RAM slot and device fd of a VM, small enough
// that a peer cannot make this side hold an unbounded number of descriptors or bytes.
constexpr uint64_t kMaxFds = 64;
constexpr uint64_t kMaxBytes = 64 * 1024;
// poll() takes an int of milliseconds; a day is far beyond any sensible wait.
constexpr uint64_t kMaxTimeoutMs = 24ull * 3600 * 1000;

// Wait until `fd` is ready for `events` or the deadline passes. Returns 0 when ready, ETIMEDOUT,
// or the errno of poll() itself. POLLERR/POLLHUP count as ready: the next sendmsg/recvmsg
// reports what happened.
int WaitReady(int fd, short events, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - MonotonicMs();
    if (left <= 0) return ETIMEDOUT;
    pollfd p{fd, events, 0};
    int rc = poll(&p, 1, static_cast<int>(left));
    if (rc > 0) return 0;
    if (rc == 0) return ETIMEDOUT;
    if (errno != EINTR) return errno;
  }
}

void CloseAll(const std::vector<int>& fds) {
  for (int fd : fds) close(fd);
}

// An error shaped like ErrnoError's (code, errno, syscall) for failures that are not one
// system call's errno: a timeout, a peer that hung up, a message with too many descriptors.
void ThrowCoded(Napi::Env env, const std::string& message, int err, const char* syscall) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("syscall", Napi::String::New(env, syscall));
  e.ThrowAsJavaScriptException();
}

void ThrowTimeout(Napi::Env env, const char* syscall, uint64_t timeoutMs) {
  ThrowCoded(env, std::string(syscall) + " timed out after " + std::to_string(timeoutMs) + " ms", ETIMEDOUT, syscall);
}

// sendWithFds(socketFd, data, fds, timeoutMs)
Napi::Value SendWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock;
  if (!ArgFd(info, 0, "sendWithFds: socketFd", &sock)) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, "sendWithFds: data must be a Uint8Array");
    return env.Undefined();
  }
  Napi::Uint8Array data = info[1].As<Napi::Uint8Array>();
  if (data.ByteLength() == 0 || data.ByteLength() > kMaxBytes) {
    Napi::RangeError::New(env, "sendWithFds: data must be 1.." + std::to_string(kMaxBytes) + " bytes, got " +
                                   std::to_string(data.ByteLength()))
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (info.Length() < 3 || !info[2].IsArray()) {
    ThrowTypeError(env, "sendWithFds: fds must be an array of file descriptors");
    return env.Undefined();
  }
  Napi::Array arr = info[2].As<Napi::Array>();
  if (arr.Length() > kMaxFds) {
    Napi::RangeError::New(env, "sendWithFds: at most " + std::to_string(kMaxFds) + " fds, got " + std::to_string(arr.Length()))
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::vector<int> fds(arr.Length());
  for (uint32_t i = 0; i < arr.Length(); i++) {
    uint64_t v;
    if (!ToUint(env, arr.Get(i), "sendWithFds: fds[" + std::to_string(i) + "]", INT32_MAX, &v)) return env.Undefined();
    fds[i] = static_cast<int>(v);
  }
  uint64_t timeoutMs;
  if (!ArgUint(info, 3, "sendWithFds: timeoutMs", kMaxTimeoutMs, &timeoutMs)) return env.Undefined();

  // Copied: the loop below may poll, and the bytes must not change under it.
  std::vector<uint8_t> bytes(data.Data(), data.Data() + data.ByteLength());
  std::vector<char> control(fds.empty() ? 0 : CMSG_SPACE(sizeof(int) * fds.size()), 0);
  int64_t deadline = MonotonicMs() + static_cast<int64_t>(timeoutMs);
  size_t sent = 0;
  while (sent < bytes.size()) {
    iovec iov{bytes.data() + sent, bytes.size() - sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    // The descriptors ride with the first byte only: once any byte is out, they are too.
    if (sent == 0 && !fds.empty()) {
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int err = WaitReady(sock, POLLOUT, deadline);
      if (err == ETIMEDOUT) {
        ThrowTimeout(env, "sendmsg", timeoutMs);
        return env.Undefined();
      }
      if (err != 0) {
        ThrowErrno(env, "poll", err);
        return env.Undefined();
      }
      continue;
    }
    ThrowErrno(env, "sendmsg", n < 0 ? errno : EIO);
    return env.Undefined();
  }
  return env.Undefined();
}

// recvWithFds(socketFd, length, maxFds, timeoutMs) -> { data, fds }
Napi::Value RecvWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock;
  if (!ArgFd(info, 0, "recvWithFds: socketFd", &sock)) return env.Undefined();
  uint64_t length, maxFds, timeoutMs;
  if (!ArgUint(info, 1, "recvWithFds: length", kMaxBytes, &length)) return env.Undefined();
  if (length == 0) {
    Napi::RangeError::New(env, "recvWithFds: length must be in 1.." + std::to_string(kMaxBytes) + ", got 0").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!ArgUint(info, 2, "recvWithFds: maxFds", kMaxFds, &maxFds)) return env.Undefined();
  if (!ArgUint(info, 3, "recvWithFds: timeoutMs", kMaxTimeoutMs, &timeoutMs)) return env.Undefined();

  std::vector<uint8_t> bytes(length);
  std::vector<int> received;
  // Room for one more descriptor than allowed: a sender that attaches too many is then seen
  // as "too many" (and its extra ones arrive and get closed) rather than as truncation.
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (kMaxFds + 1)), 0);
  int64_t deadline = MonotonicMs() + static_cast<int64_t>(timeoutMs);
  size_t got = 0;
  // Every exit after a descriptor may have arrived closes them: none may leak to the caller
  // of a failed call.
  auto fail = [&](auto thrower) {
    CloseAll(received);
    thrower();
    return env.Undefined();
  };
  while (got < length) {
    iovec iov{bytes.data() + got, length - got};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int err = WaitReady(sock, POLLIN, deadline);
      if (err == ETIMEDOUT) return fail([&] { ThrowTimeout(env, "recvmsg", timeoutMs); });
      if (err != 0) return fail([&] { ThrowErrno(env, "poll", err); });
      continue;
    }
    if (n < 0) {
      int err = errno;
      return fail([&] { ThrowErrno(env, "recvmsg", err); });
    }
    // Descriptors that arrived are ours to close from here on, whatever else is wrong.
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* p = CMSG_DATA(c);
      for (size_t i = 0; i < count; i++) {
        int fd;
        memcpy(&fd, p + i * sizeof(int), sizeof(int));
        received.push_back(fd);
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
      return fail([&] {
        ThrowCoded(env, "recvWithFds: the control data was truncated (more descriptors than " + std::to_string(kMaxFds) +
                            " or another control message); every descriptor received was closed",
                   EMSGSIZE, "recvmsg");
      });
    }
    if (received.size() > maxFds) {
      size_t count = received.size();
      return fail([&] {
        ThrowCoded(env, "recvWithFds: the peer sent " + std::to_string(count) + " descriptors, at most " +
                            std::to_string(maxFds) + " were allowed; every descriptor received was closed",
                   EMSGSIZE, "recvmsg");
      });
    }
    if (n == 0) {
      return fail([&] {
        ThrowCoded(env, "recvWithFds: the peer closed the connection after " + std::to_string(got) + " of " +
                            std::to_string(length) + " bytes",
                   ECONNRESET, "recvmsg");
      });
    }
    got += static_cast<size_t>(n);
  }
  // Past this point nothing may fail silently with descriptors open: a pending exception
  // (out of memory while building the result) closes them.
  Napi::Object out = Napi::Object::New(env);
  out.Set("data", Napi::Buffer<uint8_t>::Copy(env, bytes.data(), bytes.size()));
  Napi::Array fdArr = Napi::Array::New(env, received.size());
  for (size_t i = 0; i < received.size(); i++) fdArr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, received[i]));
  out.Set("fds", fdArr);
  if (env.IsExceptionPending()) {
    CloseAll(received);
    return env.Undefined();
  }
  return out;
}

// peekFds(socketFd, maxFds) -> null | { bytes, fds }: the descriptors sent with the first
// bytes waiting on the socket, without taking those bytes (MSG_PEEK; the kernel gives this
// process its own copies of the descriptors, and whoever reads the bytes later without room
// for control data gets none). null: nothing has arrived yet; bytes 0: the peer closed. More
// than maxFds descriptors, or truncated control data, is an error, with every one closed.
Napi::Value PeekFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock;
  uint64_t maxFds;
  if (!ArgFd(info, 0, "peekFds: socketFd", &sock)) return env.Undefined();
  if (!ArgUint(info, 1, "peekFds: maxFds", kMaxFds, &maxFds)) return env.Undefined();
  uint8_t byte;
  iovec iov{&byte, 1};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (kMaxFds + 1)), 0);
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t n;
  do n = recvmsg(sock, &msg, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return env.Null();
  if (n < 0) return ThrowErrno(env, "recvmsg", errno), env.Undefined();
  std::vector<int> received;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      received.push_back(fd);
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) || received.size() > maxFds) {
    size_t count = received.size();
    CloseAll(received);
    ThrowCoded(env, "peekFds: the peer sent " + std::to_string(count) + " descriptors or truncated control data, at most " + std::to_string(maxFds) + " are taken; every one was closed",
               EMSGSIZE, "recvmsg");
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(n)));
  Napi::Array fdArr = Napi::Array::New(env, received.size());
  for (size_t i = 0; i < received.size(); i++) fdArr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, received[i]));
  out.Set("fds", fdArr);
  if (env.IsExceptionPending()) CloseAll(received);
  return out;
}

}  // namespace

void InitFdPassing(Napi::Env env, Napi::Object exports) {
  exports.Set("peekFds", Napi::Function::New(env, Guarded<PeekFds>, "peekFds"));
  exports.Set("sendWithFds", Napi::Function::New(env, Guarded<SendWithFds>, "sendWithFds"));
  exports.Set("recvWithFds", Napi::Function::New(env, Guarded<RecvWithFds>, "recvWithFds"));
}

}  // namespace tern
