// JavaScript-facing KVM objects: the /dev/kvm handle, a VM, and a vCPU.
#pragma once

#include <napi.h>

#include <linux/kvm.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common.h"
#include "guest_ram.h"

namespace tern {

class Kvm : public Napi::ObjectWrap<Kvm> {
 public:
  TERN_GUARDED_METHODS(Kvm)
  static Napi::Function Define(Napi::Env env);
  // openKvm(path?)
  static Napi::Value Open(const Napi::CallbackInfo& info);
  explicit Kvm(const Napi::CallbackInfo& info);
  ~Kvm() override;

 private:
  bool CheckOpen(Napi::Env env);
  Napi::Value ApiVersion(const Napi::CallbackInfo& info);
  Napi::Value CheckExtension(const Napi::CallbackInfo& info);
  Napi::Value SupportedCpuid(const Napi::CallbackInfo& info);
  Napi::Value MsrIndexList(const Napi::CallbackInfo& info);
  Napi::Value CreateVm(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  int fd_ = -1;
};

struct MemSlot {
  uint32_t slot = 0;
  uint64_t guestAddress = 0;
  size_t size = 0;
  int fd = -1;
  std::shared_ptr<HostMapping> mapping;
  std::shared_ptr<DirtyBitmap> vmmDirty;
  bool dirtyLogging = false;  // KVM_MEM_LOG_DIRTY_PAGES set on the slot
  Napi::Reference<Napi::ArrayBuffer> vmmDirtyBuffer;  // created on first vmmDirtyBitmap()
  Napi::Reference<Napi::Array> chunks;                 // the RAM's ArrayBuffers, made once
};

class Vm : public Napi::ObjectWrap<Vm> {
 public:
  TERN_GUARDED_METHODS(Vm)
  static Napi::Function Define(Napi::Env env);
  // new Vm(token, vmFd, vcpuMmapSize, xsaveSize)
  explicit Vm(const Napi::CallbackInfo& info);
  ~Vm() override;

 private:
  bool CheckOpen(Napi::Env env);
  void CloseAll();
  Napi::Value CreateIrqchip(const Napi::CallbackInfo& info);
  Napi::Value CreatePit2(const Napi::CallbackInfo& info);
  Napi::Value SetTssAddr(const Napi::CallbackInfo& info);
  Napi::Value SetIdentityMapAddr(const Napi::CallbackInfo& info);
  Napi::Value AddMemorySlot(const Napi::CallbackInfo& info);
  Napi::Value GetDirtyBitmap(const Napi::CallbackInfo& info);
  Napi::Value SetDirtyLogging(const Napi::CallbackInfo& info);
  Napi::Value VmmDirtyBitmap(const Napi::CallbackInfo& info);
  Napi::Value MemoryChunks(const Napi::CallbackInfo& info);
  Napi::Value IrqLine(const Napi::CallbackInfo& info);
  Napi::Value SetGsiRouting(const Napi::CallbackInfo& info);
  Napi::Value Irqfd(const Napi::CallbackInfo& info);
  Napi::Value Ioeventfd(const Napi::CallbackInfo& info);
  Napi::Value GetIrqchip(const Napi::CallbackInfo& info);
  Napi::Value SetIrqchip(const Napi::CallbackInfo& info);
  Napi::Value GetPit2(const Napi::CallbackInfo& info);
  Napi::Value SetPit2(const Napi::CallbackInfo& info);
  Napi::Value GetClock(const Napi::CallbackInfo& info);
  Napi::Value SetClock(const Napi::CallbackInfo& info);
  Napi::Value CreateVcpu(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  MemSlot* FindSlot(Napi::Env env, const Napi::Value& v);

  int fd_ = -1;
  int vcpuMmapSize_ = 0;
  int xsaveSize_ = 0;
  std::map<uint32_t, std::unique_ptr<MemSlot>> slots_;
};

struct VcpuCore;

class Vcpu : public Napi::ObjectWrap<Vcpu> {
 public:
  TERN_GUARDED_METHODS(Vcpu)
  static Napi::Function Define(Napi::Env env);
  // new Vcpu(token, vcpuFd, id, vcpuMmapSize, xsaveSize)
  explicit Vcpu(const Napi::CallbackInfo& info);
  ~Vcpu() override;
  // Keep the VM object (and so its guest RAM mappings) alive as long as this vCPU.
  void HoldVm(Napi::Object vm) { vm_ = Napi::Persistent(vm); }

 private:
  void Init(const Napi::CallbackInfo& info);
  // Join a finished thread, or ask a running one to stop and let it go.
  void StopThread();
  // Throws unless the fd is open and the thread is not inside KVM_RUN.
  bool CheckIdle(Napi::Env env);
  Napi::Value Id(const Napi::CallbackInfo& info);
  Napi::Value SetCpuid(const Napi::CallbackInfo& info);
  Napi::Value GetRegs(const Napi::CallbackInfo& info);
  Napi::Value SetRegs(const Napi::CallbackInfo& info);
  Napi::Value GetSregs(const Napi::CallbackInfo& info);
  Napi::Value SetSregs(const Napi::CallbackInfo& info);
  Napi::Value GetFpu(const Napi::CallbackInfo& info);
  Napi::Value SetFpu(const Napi::CallbackInfo& info);
  Napi::Value GetXsave(const Napi::CallbackInfo& info);
  Napi::Value SetXsave(const Napi::CallbackInfo& info);
  Napi::Value GetXcrs(const Napi::CallbackInfo& info);
  Napi::Value SetXcrs(const Napi::CallbackInfo& info);
  Napi::Value GetMsrs(const Napi::CallbackInfo& info);
  Napi::Value SetMsrs(const Napi::CallbackInfo& info);
  Napi::Value GetLapic(const Napi::CallbackInfo& info);
  Napi::Value SetLapic(const Napi::CallbackInfo& info);
  Napi::Value GetMpState(const Napi::CallbackInfo& info);
  Napi::Value Translate(const Napi::CallbackInfo& info);
  Napi::Value SetMpState(const Napi::CallbackInfo& info);
  Napi::Value GetVcpuEvents(const Napi::CallbackInfo& info);
  Napi::Value SetVcpuEvents(const Napi::CallbackInfo& info);
  Napi::Value GetDebugRegs(const Napi::CallbackInfo& info);
  Napi::Value SetDebugRegs(const Napi::CallbackInfo& info);
  Napi::Value KvmclockCtrl(const Napi::CallbackInfo& info);
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value RequestPause(const Napi::CallbackInfo& info);
  Napi::Value Resume(const Napi::CallbackInfo& info);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  // Raw struct get/set through base64.
  Napi::Value GetBlob(const Napi::CallbackInfo& info, unsigned long req, const char* name, size_t size);
  Napi::Value SetBlob(const Napi::CallbackInfo& info, unsigned long req, const char* name, size_t size);

  std::shared_ptr<VcpuCore> core_;
  Napi::ObjectReference vm_;
  std::thread thread_;
  uint32_t id_ = 0;
  int xsaveSize_ = 0;
};

}  // namespace tern
