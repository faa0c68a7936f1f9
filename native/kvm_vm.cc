// /dev/kvm handle and VM-level ioctls.
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <vector>

#include "kvm_abi.h"
#include "kvm_objects.h"

namespace tern {

namespace {

bool CheckToken(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString() || info[0].As<Napi::String>().Utf8Value() != kInternalToken) {
    ThrowTypeError(info.Env(), "this object is created by the native addon, not with new");
    return false;
  }
  return true;
}

bool ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t* out) {
  return ArgUint(info, i, name, UINT64_MAX, out);
}

bool ArgU32(const Napi::CallbackInfo& info, size_t i, const char* name, uint32_t* out) {
  return ArgField(info, i, name, out);
}

// KVM_MAX_IRQ_ROUTES: KVM refuses longer tables; refusing them here bounds the buffer too.
constexpr uint32_t kMaxIrqRoutes = 4096;

bool ArgBlob(const Napi::CallbackInfo& info, size_t i, const char* what, size_t size, void* dst) {
  std::vector<uint8_t> bytes;
  if (info.Length() <= i || !info[i].IsString() || !Base64Decode(info[i].As<Napi::String>().Utf8Value(), &bytes)) {
    ThrowTypeError(info.Env(), std::string(what) + ": expected a base64 string");
    return false;
  }
  if (bytes.size() != size) {
    ThrowTypeError(info.Env(), std::string(what) + ": expected " + std::to_string(size) + " bytes, got " +
                                   std::to_string(bytes.size()));
    return false;
  }
  memcpy(dst, bytes.data(), size);
  return true;
}

}  // namespace

// ---- Kvm ------------------------------------------------------------------------------------

Napi::Function Kvm::Define(Napi::Env env) {
  return DefineClass(env, "Kvm",
                     {
                         InstanceMethod<&Kvm::Guarded<&Kvm::ApiVersion>>("apiVersion"),
                         InstanceMethod<&Kvm::Guarded<&Kvm::CheckExtension>>("checkExtension"),
                         InstanceMethod<&Kvm::Guarded<&Kvm::SupportedCpuid>>("supportedCpuid"),
                         InstanceMethod<&Kvm::Guarded<&Kvm::MsrIndexList>>("msrIndexList"),
                         InstanceMethod<&Kvm::Guarded<&Kvm::CreateVm>>("createVm"),
                         InstanceMethod<&Kvm::Guarded<&Kvm::Close>>("close"),
                     });
}

Napi::Value Kvm::Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = "/dev/kvm";
  if (info.Length() > 0 && !info[0].IsUndefined()) {
    if (!info[0].IsString()) {
      ThrowTypeError(env, "openKvm: path must be a string");
      return env.Undefined();
    }
    path = info[0].As<Napi::String>().Utf8Value();
  }
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(env, "open " + path, errno);
    return env.Undefined();
  }
  Napi::Object obj = GetAddonData(env)->kvmCtor.New({Napi::String::New(env, kInternalToken), Napi::Number::New(env, fd)});
  if (env.IsExceptionPending()) {
    close(fd);
    return env.Undefined();
  }
  return obj;
}

Kvm::Kvm(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Kvm>(info) {
  GuardCall(info.Env(), [&] {
    if (CheckToken(info)) fd_ = info[1].As<Napi::Number>().Int32Value();
    return Napi::Value();
  });
}

Kvm::~Kvm() {
  if (fd_ >= 0) close(fd_);
}

bool Kvm::CheckOpen(Napi::Env env) {
  if (fd_ < 0) {
    ThrowError(env, "KVM handle is closed", "EBADF");
    return false;
  }
  return true;
}

Napi::Value Kvm::ApiVersion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  int v = IoctlRetry(fd_, KVM_GET_API_VERSION, nullptr);
  if (v < 0) {
    ThrowErrno(env, "KVM_GET_API_VERSION", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, v);
}

Napi::Value Kvm::CheckExtension(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  uint32_t cap;
  if (!ArgU32(info, 0, "cap", &cap)) return env.Undefined();
  int v = ioctl(fd_, KVM_CHECK_EXTENSION, static_cast<unsigned long>(cap));
  if (v < 0) {
    ThrowErrno(env, "KVM_CHECK_EXTENSION", errno);
    return env.Undefined();
  }
  return Napi::Number::New(env, v);
}

Napi::Value Kvm::SupportedCpuid(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  std::vector<uint8_t> buf;
  abi::Cpuid2* c = nullptr;
  for (uint32_t n = 64;; n *= 2) {
    buf.assign(sizeof(abi::Cpuid2) + n * sizeof(kvm_cpuid_entry2), 0);
    c = reinterpret_cast<abi::Cpuid2*>(buf.data());
    c->nent = n;
    if (IoctlRetry(fd_, abi::kGetSupportedCpuid, c) == 0) break;
    if (errno != E2BIG || n >= 65536) {
      ThrowErrno(env, "KVM_GET_SUPPORTED_CPUID", errno);
      return env.Undefined();
    }
  }
  Napi::Array arr = Napi::Array::New(env, c->nent);
  for (uint32_t i = 0; i < c->nent; i++) {
    const kvm_cpuid_entry2& e = abi::Entries<kvm_cpuid_entry2>(c)[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("function", Napi::Number::New(env, e.function));
    o.Set("index", Napi::Number::New(env, e.index));
    o.Set("flags", Napi::Number::New(env, e.flags));
    o.Set("eax", Napi::Number::New(env, e.eax));
    o.Set("ebx", Napi::Number::New(env, e.ebx));
    o.Set("ecx", Napi::Number::New(env, e.ecx));
    o.Set("edx", Napi::Number::New(env, e.edx));
    arr.Set(i, o);
  }
  return arr;
}

Napi::Value Kvm::MsrIndexList(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  std::vector<uint32_t> buf(1 + 64);
  for (;;) {
    auto* l = reinterpret_cast<abi::MsrList*>(buf.data());
    l->nmsrs = static_cast<uint32_t>(buf.size() - 1);
    if (IoctlRetry(fd_, abi::kGetMsrIndexList, l) == 0) break;
    if (errno != E2BIG || l->nmsrs <= buf.size() - 1) {
      ThrowErrno(env, "KVM_GET_MSR_INDEX_LIST", errno);
      return env.Undefined();
    }
    buf.resize(1 + l->nmsrs);  // KVM reported the needed count
  }
  auto* l = reinterpret_cast<abi::MsrList*>(buf.data());
  Napi::Array arr = Napi::Array::New(env, l->nmsrs);
  for (uint32_t i = 0; i < l->nmsrs; i++) arr.Set(i, Napi::Number::New(env, buf[1 + i]));
  return arr;
}

Napi::Value Kvm::CreateVm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  int vmfd;
  do {
    vmfd = ioctl(fd_, KVM_CREATE_VM, 0UL);
  } while (vmfd < 0 && errno == EINTR);
  if (vmfd < 0) {
    ThrowErrno(env, "KVM_CREATE_VM", errno);
    return env.Undefined();
  }
  int mmapSize = ioctl(fd_, KVM_GET_VCPU_MMAP_SIZE, 0UL);
  if (mmapSize < 0) {
    int e = errno;
    close(vmfd);
    ThrowErrno(env, "KVM_GET_VCPU_MMAP_SIZE", e);
    return env.Undefined();
  }
  // The VM fd answers for its own xsave size; 0 means KVM_GET_XSAVE2 is unavailable.
  int xsave = ioctl(vmfd, KVM_CHECK_EXTENSION, static_cast<unsigned long>(KVM_CAP_XSAVE2));
  if (xsave < 0) xsave = 0;
  Napi::Object obj = GetAddonData(env)->vmCtor.New({Napi::String::New(env, kInternalToken), Napi::Number::New(env, vmfd),
                                                    Napi::Number::New(env, mmapSize), Napi::Number::New(env, xsave)});
  if (env.IsExceptionPending()) {
    close(vmfd);
    return env.Undefined();
  }
  return obj;
}

Napi::Value Kvm::Close(const Napi::CallbackInfo& info) {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  return info.Env().Undefined();
}

// ---- Vm -------------------------------------------------------------------------------------

Napi::Function Vm::Define(Napi::Env env) {
  return DefineClass(env, "Vm",
                     {
                         InstanceMethod<&Vm::Guarded<&Vm::CreateIrqchip>>("createIrqchip"),
                         InstanceMethod<&Vm::Guarded<&Vm::CreatePit2>>("createPit2"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetTssAddr>>("setTssAddr"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetIdentityMapAddr>>("setIdentityMapAddr"),
                         InstanceMethod<&Vm::Guarded<&Vm::AddMemorySlot>>("addMemorySlot"),
                         InstanceMethod<&Vm::Guarded<&Vm::GetDirtyBitmap>>("getDirtyBitmap"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetDirtyLogging>>("setDirtyLogging"),
                         InstanceMethod<&Vm::Guarded<&Vm::VmmDirtyBitmap>>("vmmDirtyBitmap"),
                         InstanceMethod<&Vm::Guarded<&Vm::MemoryChunks>>("memoryChunks"),
                         InstanceMethod<&Vm::Guarded<&Vm::IrqLine>>("irqLine"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetGsiRouting>>("setGsiRouting"),
                         InstanceMethod<&Vm::Guarded<&Vm::Irqfd>>("irqfd"),
                         InstanceMethod<&Vm::Guarded<&Vm::Ioeventfd>>("ioeventfd"),
                         InstanceMethod<&Vm::Guarded<&Vm::GetIrqchip>>("getIrqchip"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetIrqchip>>("setIrqchip"),
                         InstanceMethod<&Vm::Guarded<&Vm::GetPit2>>("getPit2"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetPit2>>("setPit2"),
                         InstanceMethod<&Vm::Guarded<&Vm::GetClock>>("getClock"),
                         InstanceMethod<&Vm::Guarded<&Vm::SetClock>>("setClock"),
                         InstanceMethod<&Vm::Guarded<&Vm::CreateVcpu>>("createVcpu"),
                         InstanceMethod<&Vm::Guarded<&Vm::Close>>("close"),
                     });
}

Vm::Vm(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Vm>(info) {
  GuardCall(info.Env(), [&] {
    if (!CheckToken(info)) return Napi::Value();
    fd_ = info[1].As<Napi::Number>().Int32Value();
    vcpuMmapSize_ = info[2].As<Napi::Number>().Int32Value();
    xsaveSize_ = info[3].As<Napi::Number>().Int32Value();
    return Napi::Value();
  });
}

Vm::~Vm() { CloseAll(); }

void Vm::CloseAll() {
  for (auto& kv : slots_) {
    if (kv.second->fd >= 0) close(kv.second->fd);
  }
  slots_.clear();
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

bool Vm::CheckOpen(Napi::Env env) {
  if (fd_ < 0) {
    ThrowError(env, "VM is closed", "EBADF");
    return false;
  }
  return true;
}

Napi::Value Vm::CreateIrqchip(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  if (IoctlRetry(fd_, KVM_CREATE_IRQCHIP, nullptr) < 0) ThrowErrno(env, "KVM_CREATE_IRQCHIP", errno);
  return env.Undefined();
}

Napi::Value Vm::CreatePit2(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_pit_config cfg{};
  cfg.flags = 0;
  if (IoctlRetry(fd_, KVM_CREATE_PIT2, &cfg) < 0) ThrowErrno(env, "KVM_CREATE_PIT2", errno);
  return env.Undefined();
}

Napi::Value Vm::SetTssAddr(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  uint64_t addr;
  if (!ArgU64(info, 0, "addr", &addr)) return env.Undefined();
  if (ioctl(fd_, KVM_SET_TSS_ADDR, static_cast<unsigned long>(addr)) < 0) ThrowErrno(env, "KVM_SET_TSS_ADDR", errno);
  return env.Undefined();
}

Napi::Value Vm::SetIdentityMapAddr(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  uint64_t addr;
  if (!ArgU64(info, 0, "addr", &addr)) return env.Undefined();
  if (IoctlRetry(fd_, KVM_SET_IDENTITY_MAP_ADDR, &addr) < 0) ThrowErrno(env, "KVM_SET_IDENTITY_MAP_ADDR", errno);
  return env.Undefined();
}

Napi::Value Vm::AddMemorySlot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  if (info.Length() < 1 || !info[0].IsObject()) {
    ThrowTypeError(env, "addMemorySlot: expected an options object");
    return env.Undefined();
  }
  Napi::Object o = info[0].As<Napi::Object>();
  uint32_t slot;
  uint64_t gpa, size64;
  // Sizes and offsets stay within off_t, so fileOffset + size cannot wrap.
  if (!GetField(o, "slot", &slot) || !GetField(o, "guestAddress", &gpa) || !GetUint(o, "size", INT64_MAX, &size64))
    return env.Undefined();
  RamOptions ro;
  ro.size = static_cast<size_t>(size64);
  uint64_t fromFd = UINT64_MAX;
  if (!GetOptUint(o, "fromFd", INT32_MAX, &fromFd) || !GetOptUint(o, "fileOffset", INT64_MAX - size64, &ro.fileOffset))
    return env.Undefined();
  if (fromFd != UINT64_MAX) ro.fromFd = static_cast<int>(fromFd);
  Napi::Value name = o.Get("name");
  if (name.IsString()) ro.name = name.As<Napi::String>().Utf8Value();
  ro.privateMap = o.Get("privateMap").ToBoolean().Value();
  ro.hugePages = o.Get("hugePages").ToBoolean().Value();
  // (default on: the caller may start without the log, which also lets KVM map large pages)
  Napi::Value logOpt = o.Get("dirtyLogging");
  bool dirtyLogging = logOpt.IsUndefined() || logOpt.ToBoolean().Value();
  // Each ArrayBuffer over guest RAM counts as external memory to V8, and the first ones make
  // it run a full GC: a restore that does not touch RAM from JS defers them to memoryChunks().
  bool deferChunks = o.Get("deferChunks").ToBoolean().Value();
  if (ro.size == 0 || (ro.size & 0xfff) || (gpa & 0xfff)) {
    ThrowError(env, "addMemorySlot: size and guestAddress must be non-zero multiples of 4096", "EINVAL");
    return env.Undefined();
  }
  if (slots_.count(slot)) {
    ThrowError(env, "addMemorySlot: slot " + std::to_string(slot) + " is already in use", "EEXIST");
    return env.Undefined();
  }

  GuestRam ram;
  std::string failed;
  int err = 0;
  if (!CreateGuestRam(ro, &ram, &failed, &err)) {
    if (failed.empty())
      ThrowError(env, "addMemorySlot: the file behind fromFd is shorter than fileOffset + size", "EINVAL");
    else
      ThrowErrno(env, failed, err);
    return env.Undefined();
  }
  kvm_userspace_memory_region region{};
  region.slot = slot;
  // While KVM logs a slot's writes it maps the slot in 4 KiB pages only.
  region.flags = dirtyLogging ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  region.guest_phys_addr = gpa;
  region.memory_size = ro.size;
  region.userspace_addr = reinterpret_cast<uint64_t>(ram.mapping->base());
  if (IoctlRetry(fd_, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
    int e = errno;
    close(ram.fd);
    ThrowErrno(env, "KVM_SET_USER_MEMORY_REGION", e);
    return env.Undefined();
  }

  auto s = std::make_unique<MemSlot>();
  s->slot = slot;
  s->guestAddress = gpa;
  s->size = ro.size;
  s->fd = ram.fd;
  s->mapping = ram.mapping;
  s->dirtyLogging = dirtyLogging;
  s->vmmDirty = std::make_shared<DirtyBitmap>(ro.size >> 12);

  Napi::Object res = Napi::Object::New(env);
  res.Set("slot", Napi::Number::New(env, slot));
  res.Set("guestAddress", Big(env, gpa));
  res.Set("size", Napi::Number::New(env, static_cast<double>(ro.size)));
  res.Set("fd", Napi::Number::New(env, ram.fd));
  if (!deferChunks) {
    Napi::Array chunks = MappingChunks(env, ram.mapping, kMaxChunk);
    s->chunks = Napi::Persistent(chunks);
    res.Set("chunks", chunks);
  }
  res.Set("chunkSize", Napi::Number::New(env, static_cast<double>(kMaxChunk)));
  slots_[slot] = std::move(s);
  return res;
}

MemSlot* Vm::FindSlot(Napi::Env env, const Napi::Value& v) {
  uint64_t slot;
  if (!ToUint(env, v, "slot", UINT32_MAX, &slot)) return nullptr;
  auto it = slots_.find(static_cast<uint32_t>(slot));
  if (it == slots_.end()) {
    ThrowError(env, "no memory slot " + std::to_string(slot), "ENOENT");
    return nullptr;
  }
  return it->second.get();
}

// setDirtyLogging(slot, on): KVM starts (or stops) logging the slot's writes. Turning it on
// write-protects the slot, so the log that follows holds every page written from here on.
Napi::Value Vm::SetDirtyLogging(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  MemSlot* s = FindSlot(env, info.Length() ? info[0] : env.Undefined());
  if (!s) return env.Undefined();
  bool on = info.Length() > 1 && info[1].ToBoolean().Value();
  kvm_userspace_memory_region region{};
  region.slot = s->slot;
  region.flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  region.guest_phys_addr = s->guestAddress;
  region.memory_size = s->size;
  region.userspace_addr = reinterpret_cast<uint64_t>(s->mapping->base());
  if (IoctlRetry(fd_, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
    ThrowErrno(env, "KVM_SET_USER_MEMORY_REGION", errno);
    return env.Undefined();
  }
  s->dirtyLogging = on;
  return env.Undefined();
}

Napi::Value Vm::GetDirtyBitmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  MemSlot* s = FindSlot(env, info.Length() ? info[0] : env.Undefined());
  if (!s) return env.Undefined();
  if (!s->dirtyLogging) {
    ThrowError(env, "getDirtyBitmap: dirty logging is off for slot " + std::to_string(s->slot), "EINVAL");
    return env.Undefined();
  }
  DirtyBitmap& vmm = *s->vmmDirty;
  std::vector<uint64_t> words(vmm.wordCount(), 0);
  kvm_dirty_log log{};
  log.slot = s->slot;
  log.dirty_bitmap = words.data();
  if (IoctlRetry(fd_, KVM_GET_DIRTY_LOG, &log) < 0) {
    ThrowErrno(env, "KVM_GET_DIRTY_LOG", errno);
    return env.Undefined();
  }
  for (size_t i = 0; i < words.size(); i++) words[i] |= vmm.TakeWord(i);
  Napi::Uint8Array out = Napi::Uint8Array::New(env, vmm.byteLength());
  memcpy(out.Data(), words.data(), vmm.byteLength());
  return out;
}

Napi::Value Vm::MemoryChunks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  MemSlot* s = FindSlot(env, info.Length() ? info[0] : env.Undefined());
  if (!s) return env.Undefined();
  // Made once: V8 must not see two buffers over the same memory.
  if (s->chunks.IsEmpty()) s->chunks = Napi::Persistent(MappingChunks(env, s->mapping, kMaxChunk));
  return s->chunks.Value();
}

Napi::Value Vm::VmmDirtyBitmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  MemSlot* s = FindSlot(env, info.Length() ? info[0] : env.Undefined());
  if (!s) return env.Undefined();
  // One ArrayBuffer per bitmap: V8 must not see two buffers over the same memory.
  if (s->vmmDirtyBuffer.IsEmpty()) {
    std::shared_ptr<DirtyBitmap> bm = s->vmmDirty;
    Napi::ArrayBuffer ab = ExternalBuffer(env, bm->words(), bm->wordCount() * 8, bm);
    s->vmmDirtyBuffer = Napi::Persistent(ab);
  }
  Napi::ArrayBuffer ab = s->vmmDirtyBuffer.Value();
  return Napi::Uint8Array::New(env, s->vmmDirty->byteLength(), ab, 0);
}

Napi::Value Vm::IrqLine(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_irq_level l{};
  uint32_t irq;
  uint64_t level;
  if (!ArgU32(info, 0, "irq", &irq) || !ArgUint(info, 1, "level", 1, &level)) return env.Undefined();
  l.irq = irq;
  l.level = static_cast<uint32_t>(level);
  if (IoctlRetry(fd_, KVM_IRQ_LINE, &l) < 0) ThrowErrno(env, "KVM_IRQ_LINE", errno);
  return env.Undefined();
}

Napi::Value Vm::SetGsiRouting(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  if (info.Length() < 1 || !info[0].IsArray()) {
    ThrowTypeError(env, "setGsiRouting: expected an array of routes");
    return env.Undefined();
  }
  Napi::Array routes = info[0].As<Napi::Array>();
  uint32_t n = routes.Length();
  if (n > kMaxIrqRoutes) {
    Napi::RangeError::New(env, "setGsiRouting: at most " + std::to_string(kMaxIrqRoutes) + " routes, got " + std::to_string(n))
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::vector<uint8_t> buf(sizeof(abi::IrqRouting) + n * sizeof(kvm_irq_routing_entry), 0);
  auto* r = reinterpret_cast<abi::IrqRouting*>(buf.data());
  r->nr = n;
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = routes.Get(i);
    if (!v.IsObject()) {
      ThrowTypeError(env, "setGsiRouting: route " + std::to_string(i) + " is not an object");
      return env.Undefined();
    }
    Napi::Object o = v.As<Napi::Object>();
    kvm_irq_routing_entry& e = abi::Entries<kvm_irq_routing_entry>(r)[i];
    if (!GetField(o, "gsi", &e.gsi)) return env.Undefined();
    std::string type = o.Get("type").ToString().Utf8Value();
    if (type == "irqchip") {
      e.type = KVM_IRQ_ROUTING_IRQCHIP;
      if (!GetField(o, "irqchip", &e.u.irqchip.irqchip) || !GetField(o, "pin", &e.u.irqchip.pin)) return env.Undefined();
    } else if (type == "msi") {
      e.type = KVM_IRQ_ROUTING_MSI;
      if (!GetField(o, "addressLo", &e.u.msi.address_lo) || !GetOptField(o, "addressHi", &e.u.msi.address_hi) ||
          !GetField(o, "data", &e.u.msi.data))
        return env.Undefined();
      Napi::Value devid = o.Get("devid");
      if (!devid.IsUndefined() && !devid.IsNull()) {
        if (!GetField(o, "devid", &e.u.msi.devid)) return env.Undefined();
        e.flags = KVM_MSI_VALID_DEVID;
      }
    } else {
      ThrowTypeError(env, "setGsiRouting: unknown route type '" + type + "'");
      return env.Undefined();
    }
  }
  if (IoctlRetry(fd_, abi::kSetGsiRouting, r) < 0) ThrowErrno(env, "KVM_SET_GSI_ROUTING", errno);
  return env.Undefined();
}

Napi::Value Vm::Irqfd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_irqfd f{};
  int fd;
  uint32_t gsi;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgU32(info, 1, "gsi", &gsi)) return env.Undefined();
  f.fd = fd;
  f.gsi = gsi;
  if (info.Length() > 2 && info[2].IsObject()) {
    Napi::Object o = info[2].As<Napi::Object>();
    if (o.Get("deassign").ToBoolean().Value()) f.flags |= KVM_IRQFD_FLAG_DEASSIGN;
    uint64_t resample = UINT64_MAX;
    if (!GetOptUint(o, "resampleFd", INT32_MAX, &resample)) return env.Undefined();
    if (resample != UINT64_MAX) {
      f.flags |= KVM_IRQFD_FLAG_RESAMPLE;
      f.resamplefd = static_cast<uint32_t>(resample);
    }
  }
  if (IoctlRetry(fd_, KVM_IRQFD, &f) < 0) ThrowErrno(env, "KVM_IRQFD", errno);
  return env.Undefined();
}

Napi::Value Vm::Ioeventfd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_ioeventfd f{};
  int fd;
  uint64_t addr, len;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgU64(info, 1, "addr", &addr) || !ArgUint(info, 2, "len", 8, &len))
    return env.Undefined();
  f.fd = fd;
  f.addr = addr;
  f.len = static_cast<uint32_t>(len);
  if (info.Length() > 3 && info[3].IsObject()) {
    Napi::Object o = info[3].As<Napi::Object>();
    if (o.Get("pio").ToBoolean().Value()) f.flags |= KVM_IOEVENTFD_FLAG_PIO;
    if (o.Get("deassign").ToBoolean().Value()) f.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
    Napi::Value dm = o.Get("datamatch");
    if (!dm.IsUndefined() && !dm.IsNull()) {
      if (!GetField(o, "datamatch", &f.datamatch)) return env.Undefined();
      f.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
    }
  }
  if (IoctlRetry(fd_, KVM_IOEVENTFD, &f) < 0) ThrowErrno(env, "KVM_IOEVENTFD", errno);
  return env.Undefined();
}

Napi::Value Vm::GetIrqchip(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_irqchip c{};
  uint32_t chip;
  if (!ArgU32(info, 0, "chip", &chip)) return env.Undefined();
  c.chip_id = chip;
  if (IoctlRetry(fd_, KVM_GET_IRQCHIP, &c) < 0) {
    ThrowErrno(env, "KVM_GET_IRQCHIP", errno);
    return env.Undefined();
  }
  return Napi::String::New(env, Base64Encode(&c, sizeof c));
}

Napi::Value Vm::SetIrqchip(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_irqchip c{};
  uint32_t chip;
  if (!ArgU32(info, 0, "chip", &chip) || !ArgBlob(info, 1, "setIrqchip", sizeof c, &c)) return env.Undefined();
  c.chip_id = chip;
  if (IoctlRetry(fd_, KVM_SET_IRQCHIP, &c) < 0) ThrowErrno(env, "KVM_SET_IRQCHIP", errno);
  return env.Undefined();
}

Napi::Value Vm::GetPit2(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_pit_state2 p{};
  if (IoctlRetry(fd_, KVM_GET_PIT2, &p) < 0) {
    ThrowErrno(env, "KVM_GET_PIT2", errno);
    return env.Undefined();
  }
  return Napi::String::New(env, Base64Encode(&p, sizeof p));
}

Napi::Value Vm::SetPit2(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_pit_state2 p{};
  if (!ArgBlob(info, 0, "setPit2", sizeof p, &p)) return env.Undefined();
  if (IoctlRetry(fd_, KVM_SET_PIT2, &p) < 0) ThrowErrno(env, "KVM_SET_PIT2", errno);
  return env.Undefined();
}

Napi::Value Vm::GetClock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_clock_data c{};
  if (IoctlRetry(fd_, KVM_GET_CLOCK, &c) < 0) {
    ThrowErrno(env, "KVM_GET_CLOCK", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("clock", Big(env, c.clock));
  o.Set("flags", Napi::Number::New(env, c.flags));
  return o;
}

Napi::Value Vm::SetClock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  kvm_clock_data c{};
  uint64_t clock;
  if (!ArgU64(info, 0, "clock", &clock)) return env.Undefined();
  c.clock = clock;
  if (IoctlRetry(fd_, KVM_SET_CLOCK, &c) < 0) ThrowErrno(env, "KVM_SET_CLOCK", errno);
  return env.Undefined();
}

Napi::Value Vm::CreateVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!CheckOpen(env)) return env.Undefined();
  uint32_t id;
  if (!ArgU32(info, 0, "id", &id)) return env.Undefined();
  int vfd;
  do {
    vfd = ioctl(fd_, KVM_CREATE_VCPU, static_cast<unsigned long>(id));
  } while (vfd < 0 && errno == EINTR);
  if (vfd < 0) {
    ThrowErrno(env, "KVM_CREATE_VCPU", errno);
    return env.Undefined();
  }
  Napi::Object obj = GetAddonData(env)->vcpuCtor.New(
      {Napi::String::New(env, kInternalToken), Napi::Number::New(env, vfd), Napi::Number::New(env, id),
       Napi::Number::New(env, vcpuMmapSize_), Napi::Number::New(env, xsaveSize_)});
  if (env.IsExceptionPending()) {
    close(vfd);
    return env.Undefined();
  }
  Vcpu::Unwrap(obj)->HoldVm(Value());
  return obj;
}

Napi::Value Vm::Close(const Napi::CallbackInfo& info) {
  CloseAll();
  return info.Env().Undefined();
}

}  // namespace tern
