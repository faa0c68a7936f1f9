// The seccomp filter every vCPU thread runs under: a vCPU thread only runs KVM_RUN on its own
// fd and hands exits to JavaScript, so a guest that finds a way to run code in it can make
// no other system call.
#pragma once

#include <linux/filter.h>

#include <string>
#include <vector>

namespace tern {

enum class SeccompMode {
  kOff,    // no filter
  kTrap,   // a forbidden call raises SIGSYS: the process reports it on stderr and dies of it
  kLog,    // a forbidden call is allowed and logged by the kernel (audit)
  kErrno,  // a forbidden call fails with EPERM (lets tests observe the filter)
};

// "trap" / "log" / "errno" / "off"; false for anything else.
bool ParseSeccompMode(const std::string& name, SeccompMode* out);

// The BPF program for a vCPU thread whose fd is `vcpuFd`. Built before the thread starts, so
// the thread needs no allocation to install it.
std::vector<sock_filter> VcpuSeccompProgram(SeccompMode mode, int vcpuFd);

// Install `program` on the calling thread only (no_new_privs first, as seccomp requires
// without CAP_SYS_ADMIN). Returns 0 or an errno; a no-op for an empty program.
int InstallSeccompFilter(const std::vector<sock_filter>& program);

// Process-wide SIGSYS handler for kTrap: names the forbidden system call on stderr, then the
// process dies of SIGSYS as it would by default. Installed once, from the JavaScript thread.
void InstallSigsysReporter();

}  // namespace tern
