// Tap devices: open (or create) a tap with a virtio-net header on every queue, set the
// offloads the guest accepted, and give the host side an address, a MAC, an MTU and a link.
// The VMM decides all of that (src/vmm/net-backend.ts); this only makes the system calls.
#include "tap.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common.h"

namespace tern {

namespace {

constexpr int kVnetHeaderBytes = 12;  // struct virtio_net_hdr_v1
constexpr uint32_t kMaxQueues = 256;

// The interface name in `v` (a string shorter than IFNAMSIZ), into ifr.ifr_name.
bool IfName(Napi::Env env, Napi::Value v, const char* fn, ifreq* ifr) {
  if (!v.IsString()) return ThrowTypeError(env, std::string(fn) + ": the interface name must be a string"), false;
  std::string name = v.As<Napi::String>().Utf8Value();
  if (name.empty() || name.size() >= IFNAMSIZ || name.find('/') != std::string::npos) {
    ThrowError(env, std::string(fn) + ": an interface name is 1 to " + std::to_string(IFNAMSIZ - 1) + " bytes without '/'", "EINVAL");
    return false;
  }
  memset(ifr, 0, sizeof *ifr);
  memcpy(ifr->ifr_name, name.data(), name.size());
  return true;
}

// openTap(name, queues): `queues` file descriptors of the tap `name` (created when it does not
// exist; a name with %d lets the kernel number it), each nonblocking with a 12-byte
// virtio_net_hdr_v1 on every frame. Returns {name, fds, multiQueue}.
//
// Taps are multi-queue even for one queue: a second VMM on this host (a local migration, a
// restore while the first still runs) can then open queues of the same tap, where a
// single-queue tap answers EBUSY. A tap someone made single-queue is opened as it is.
Napi::Value OpenTap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ifreq ifr;
  if (!IfName(env, info[0], "openTap", &ifr)) return env.Undefined();
  uint32_t queues;
  if (!ArgField(info, 1, "queues", &queues)) return env.Undefined();
  if (queues < 1 || queues > kMaxQueues) {
    ThrowError(env, "openTap: queues must be 1 to " + std::to_string(kMaxQueues), "EINVAL");
    return env.Undefined();
  }
  short flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
  std::vector<int> fds;
  auto fail = [&](const char* what, int err) {
    for (int fd : fds) close(fd);
    ThrowErrno(env, what, err);
    return env.Undefined();
  };
  for (uint32_t i = 0; i < queues; i++) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return fail("open /dev/net/tun", errno);
    fds.push_back(fd);
    ifr.ifr_flags = flags;
    int r = IoctlRetry(fd, TUNSETIFF, &ifr);
    if (r < 0 && errno == EINVAL && queues == 1) {
      // (an existing single-queue tap: the flags must match its own)
      flags &= ~IFF_MULTI_QUEUE;
      ifr.ifr_flags = flags;
      r = IoctlRetry(fd, TUNSETIFF, &ifr);
    }
    if (r < 0) return fail("TUNSETIFF", errno);
    int hdr = kVnetHeaderBytes;
    if (IoctlRetry(fd, TUNSETVNETHDRSZ, &hdr) < 0) return fail("TUNSETVNETHDRSZ", errno);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("name", Napi::String::New(env, std::string(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ))));
  Napi::Array arr = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  out.Set("fds", arr);
  out.Set("multiQueue", Napi::Boolean::New(env, (flags & IFF_MULTI_QUEUE) != 0));
  return out;
}

// adoptTap(fd): a tap opened by someone else (fd= of --net, or passed over the API socket),
// made ready as openTap makes its own: it must be a tap with a virtio-net header (that flag
// cannot be added after TUNSETIFF); it is made nonblocking and given the 12-byte header.
// Returns {name, multiQueue, fd}: fd is a close-on-exec duplicate the caller owns, so a card
// can close its queues at shutdown and adopt the same tap again at the next boot.
Napi::Value AdoptTap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return env.Undefined();
  struct stat st;
  if (fstat(fd, &st) < 0) return ThrowErrno(env, "fstat", errno), env.Undefined();
  ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  if (!S_ISCHR(st.st_mode) || IoctlRetry(fd, TUNGETIFF, &ifr) < 0) {
    ThrowError(env, "adoptTap: the file descriptor is not a tap", "EINVAL");
    return env.Undefined();
  }
  if ((ifr.ifr_flags & (IFF_TAP | IFF_TUN)) != IFF_TAP || !(ifr.ifr_flags & IFF_NO_PI) || !(ifr.ifr_flags & IFF_VNET_HDR)) {
    ThrowError(env, "adoptTap: the tap was not opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR", "EINVAL");
    return env.Undefined();
  }
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return ThrowErrno(env, "fcntl", errno), env.Undefined();
  int hdr = kVnetHeaderBytes;
  if (IoctlRetry(fd, TUNSETVNETHDRSZ, &hdr) < 0) return ThrowErrno(env, "TUNSETVNETHDRSZ", errno), env.Undefined();
  int dup = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (dup < 0) return ThrowErrno(env, "fcntl F_DUPFD_CLOEXEC", errno), env.Undefined();
  Napi::Object out = Napi::Object::New(env);
  out.Set("name", Napi::String::New(env, std::string(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ))));
  out.Set("multiQueue", Napi::Boolean::New(env, (ifr.ifr_flags & IFF_MULTI_QUEUE) != 0));
  out.Set("fd", Napi::Number::New(env, dup));
  return out;
}

// tapSetQueue(fd, attached): attach or detach one queue of a multi-queue tap (TUNSETQUEUE); the
// kernel steers received frames only to attached queues. A queue already so is left as it is.
Napi::Value TapSetQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return env.Undefined();
  if (!info[1].IsBoolean()) return ThrowTypeError(env, "tapSetQueue: attached must be a boolean"), env.Undefined();
  ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = info[1].As<Napi::Boolean>().Value() ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE;
  if (IoctlRetry(fd, TUNSETQUEUE, &ifr) < 0 && errno != EINVAL) ThrowErrno(env, "TUNSETQUEUE", errno);
  return env.Undefined();
}

// tapSetOffload(fd, flags): TUNSETOFFLOAD with TUN_F_* flags (what the guest accepts).
Napi::Value TapSetOffload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint32_t flags;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgField(info, 1, "flags", &flags)) return env.Undefined();
  if (IoctlRetry(fd, TUNSETOFFLOAD, reinterpret_cast<void*>(static_cast<unsigned long>(flags))) < 0) ThrowErrno(env, "TUNSETOFFLOAD", errno);
  return env.Undefined();
}

bool Inet4(Napi::Env env, Napi::Value v, const char* what, sockaddr* out) {
  if (!v.IsString()) return ThrowTypeError(env, std::string("configureInterface: ") + what + " must be a string"), false;
  sockaddr_in sin;
  memset(&sin, 0, sizeof sin);
  sin.sin_family = AF_INET;
  if (inet_pton(AF_INET, v.As<Napi::String>().Utf8Value().c_str(), &sin.sin_addr) != 1) {
    return ThrowError(env, std::string("configureInterface: ") + what + " is not an IPv4 address", "EINVAL"), false;
  }
  memcpy(out, &sin, sizeof sin);
  return true;
}

// struct in6_ifreq of linux/ipv6.h, whose header clashes with glibc's netinet/in.h.
struct In6Ifreq {
  in6_addr addr;
  uint32_t prefixlen;
  int ifindex;
};

// An IPv6 address with its prefix length on interface `name` (SIOCSIFADDR on an AF_INET6
// socket). Throws and returns false on failure.
bool AddInet6(Napi::Env env, const ifreq& named, Napi::Value ip, uint64_t prefix) {
  if (!ip.IsString()) return ThrowTypeError(env, "configureInterface: ip6 must be a string"), false;
  In6Ifreq req;
  memset(&req, 0, sizeof req);
  if (inet_pton(AF_INET6, ip.As<Napi::String>().Utf8Value().c_str(), &req.addr) != 1) {
    return ThrowError(env, "configureInterface: ip6 is not an IPv6 address", "EINVAL"), false;
  }
  req.prefixlen = static_cast<uint32_t>(prefix);
  int s = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return ThrowErrno(env, "socket AF_INET6", errno), false;
  ifreq ifr = named;
  if (IoctlRetry(s, SIOCGIFINDEX, &ifr) < 0) {
    int err = errno;
    close(s);
    return ThrowErrno(env, std::string("SIOCGIFINDEX ") + named.ifr_name, err), false;
  }
  req.ifindex = ifr.ifr_ifindex;
  // (an address the interface already has is what was asked for)
  if (IoctlRetry(s, SIOCSIFADDR, &req) < 0 && errno != EEXIST) {
    int err = errno;
    close(s);
    return ThrowErrno(env, std::string("SIOCSIFADDR (IPv6) ") + named.ifr_name, err), false;
  }
  close(s);
  return true;
}

// configureInterface(name, {ip?, mask?, ip6?, prefix6?, mac?: number[6], mtu?, up?}): the
// host side of a tap (an IPv4 address and mask, and/or an IPv6 address and prefix length).
Napi::Value ConfigureInterface(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ifreq ifr;
  if (!IfName(env, info[0], "configureInterface", &ifr)) return env.Undefined();
  if (!info[1].IsObject()) {
    ThrowTypeError(env, "configureInterface(name, settings)");
    return env.Undefined();
  }
  Napi::Object o = info[1].As<Napi::Object>();
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) {
    ThrowErrno(env, "socket", errno);
    return env.Undefined();
  }
  auto call = [&](unsigned long req, const char* what) {
    if (IoctlRetry(s, req, &ifr) == 0) return true;
    int err = errno;
    close(s);
    ThrowErrno(env, std::string(what) + " " + ifr.ifr_name, err);
    return false;
  };
  auto bail = [&]() {
    close(s);
    return env.Undefined();
  };
  if (o.Has("ip") && !o.Get("ip").IsUndefined()) {
    if (!Inet4(env, o.Get("ip"), "ip", &ifr.ifr_addr)) return bail();
    if (!call(SIOCSIFADDR, "SIOCSIFADDR")) return env.Undefined();
  }
  if (o.Has("mask") && !o.Get("mask").IsUndefined()) {
    if (!Inet4(env, o.Get("mask"), "mask", &ifr.ifr_netmask)) return bail();
    if (!call(SIOCSIFNETMASK, "SIOCSIFNETMASK")) return env.Undefined();
  }
  if (o.Has("mac") && !o.Get("mac").IsUndefined()) {
    Napi::Value mv = o.Get("mac");
    if (!mv.IsArray() || mv.As<Napi::Array>().Length() != 6) {
      ThrowTypeError(env, "configureInterface: mac must be 6 bytes");
      return bail();
    }
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    for (uint32_t i = 0; i < 6; i++) {
      uint64_t b;
      if (!ToUint(env, mv.As<Napi::Array>().Get(i), "a MAC byte", 255, &b)) return bail();
      ifr.ifr_hwaddr.sa_data[i] = static_cast<char>(b);
    }
    if (!call(SIOCSIFHWADDR, "SIOCSIFHWADDR")) return env.Undefined();
  }
  if (o.Has("mtu") && !o.Get("mtu").IsUndefined()) {
    uint64_t mtu;
    if (!GetUint(o, "mtu", 65535, &mtu)) return bail();
    ifr.ifr_mtu = static_cast<int>(mtu);
    if (!call(SIOCSIFMTU, "SIOCSIFMTU")) return env.Undefined();
  }
  if (o.Get("up").ToBoolean().Value()) {
    if (!call(SIOCGIFFLAGS, "SIOCGIFFLAGS")) return env.Undefined();
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (!call(SIOCSIFFLAGS, "SIOCSIFFLAGS")) return env.Undefined();
  }
  close(s);
  if (o.Has("ip6") && !o.Get("ip6").IsUndefined()) {
    uint64_t prefix = 64;
    if (o.Has("prefix6") && !o.Get("prefix6").IsUndefined() && !GetUint(o, "prefix6", 128, &prefix)) return env.Undefined();
    AddInet6(env, ifr, o.Get("ip6"), prefix);
  }
  return env.Undefined();
}

}  // namespace

void InitTap(Napi::Env env, Napi::Object exports) {
  exports.Set("openTap", Napi::Function::New(env, Guarded<OpenTap>, "openTap"));
  exports.Set("adoptTap", Napi::Function::New(env, Guarded<AdoptTap>, "adoptTap"));
  exports.Set("tapSetQueue", Napi::Function::New(env, Guarded<TapSetQueue>, "tapSetQueue"));
  exports.Set("tapSetOffload", Napi::Function::New(env, Guarded<TapSetOffload>, "tapSetOffload"));
  exports.Set("configureInterface", Napi::Function::New(env, Guarded<ConfigureInterface>, "configureInterface"));
}

}  // namespace tern
