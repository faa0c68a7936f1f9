// C++ view of the KVM structures that end in a flexible array member.
//
// The UAPI headers declare those arrays with __DECLARE_FLEX_ARRAY, which in C++ (before
// the kernel's C++-specific variant) wraps them in a struct holding an empty struct: that
// member takes one byte in C++, so both sizeof() -- hence the ioctl numbers -- and the
// offset of the array differ from the kernel's C layout. These mirrors have the C layout,
// and the ioctl numbers are pinned to the values a C compiler computes (x86-64).
#pragma once

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace tern {
namespace abi {

// Header of struct kvm_cpuid2; kvm_cpuid_entry2 entries follow at offset 8.
struct Cpuid2 {
  uint32_t nent;
  uint32_t padding;
};
// Header of struct kvm_msrs; kvm_msr_entry entries follow at offset 8.
struct Msrs {
  uint32_t nmsrs;
  uint32_t pad;
};
// Header of struct kvm_msr_list; u32 indices follow at offset 4.
struct MsrList {
  uint32_t nmsrs;
};
// Header of struct kvm_irq_routing; kvm_irq_routing_entry entries follow at offset 8.
struct IrqRouting {
  uint32_t nr;
  uint32_t flags;
};
// struct kvm_xsave without its trailing flexible array.
struct Xsave {
  uint32_t region[1024];
};

static_assert(sizeof(Cpuid2) == 8 && sizeof(Msrs) == 8 && sizeof(MsrList) == 4, "C layout");
static_assert(sizeof(IrqRouting) == 8 && sizeof(Xsave) == 4096, "C layout");

constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, Cpuid2);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, Cpuid2);
constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, MsrList);
constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, Msrs);
constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, Msrs);
constexpr unsigned long kSetGsiRouting = _IOW(KVMIO, 0x6a, IrqRouting);
constexpr unsigned long kGetXsave = _IOR(KVMIO, 0xa4, Xsave);
constexpr unsigned long kSetXsave = _IOW(KVMIO, 0xa5, Xsave);
constexpr unsigned long kGetXsave2 = _IOR(KVMIO, 0xcf, Xsave);

static_assert(kGetSupportedCpuid == 0xc008ae05 && kSetCpuid2 == 0x4008ae90 && kGetMsrIndexList == 0xc004ae02, "ABI");
static_assert(kGetMsrs == 0xc008ae88 && kSetMsrs == 0x4008ae89 && kSetGsiRouting == 0x4008ae6a, "ABI");
static_assert(kGetXsave == 0x9000aea4 && kSetXsave == 0x5000aea5 && kGetXsave2 == 0x9000aecf, "ABI");

template <typename Entry, typename Header>
inline Entry* Entries(Header* h) {
  return reinterpret_cast<Entry*>(reinterpret_cast<uint8_t*>(h) + sizeof(Header));
}

}  // namespace abi
}  // namespace tern
