#include "vcpu_seccomp.h"

#include <errno.h>
#include <linux/audit.h>
#include <linux/kvm.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <mutex>

namespace tern {

namespace {

// What a vCPU thread calls, and why. Everything else is refused.
const int kAllowed[] = {
    SYS_futex,           // its mutex and condition variable; the thread-safe function's queue
    SYS_write,           // uv_async_send wakes the JavaScript loop through an eventfd; the SIGSYS report
    SYS_rt_sigreturn,    // return from the kick signal's handler
    SYS_rt_sigprocmask,  // glibc masks signals around thread exit and abort()
    SYS_restart_syscall, // a futex wait interrupted by the kick signal
    SYS_mmap,            // malloc (exit messages): arena growth
    SYS_munmap,
    SYS_mprotect,
    SYS_madvise,  // malloc trimming; glibc releases the stack of an ending thread
    SYS_brk,
    SYS_mremap,
    SYS_sched_yield,
    SYS_clock_gettime,  // when the vDSO cannot answer
    SYS_exit,           // the thread ends
    SYS_getpid,         // abort() and the SIGSYS report raise a signal at this thread
    SYS_gettid,
    SYS_tgkill,
};

// The x32 ABI shares AUDIT_ARCH_X86_64 and marks its numbers with this bit.
constexpr uint32_t kX32SyscallBit = 0x40000000;

sock_filter Stmt(uint16_t code, uint32_t k) { return BPF_STMT(code, k); }
sock_filter Jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) { return BPF_JUMP(code, k, jt, jf); }

uint32_t ViolationAction(SeccompMode mode) {
  switch (mode) {
    case SeccompMode::kLog: return SECCOMP_RET_LOG;
    case SeccompMode::kErrno: return SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
    default: return SECCOMP_RET_TRAP;
  }
}

// Async-signal-safe decimal.
size_t FormatUnsigned(char* out, unsigned long v) {
  char tmp[24];
  size_t n = 0;
  do {
    tmp[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
  return n;
}

void OnSigsys(int sig, siginfo_t* info, void*) {
  // Runs on the offending thread, under its filter: write, getpid, gettid and tgkill only.
  static const char head[] = "tern: seccomp: a vCPU thread made a forbidden system call (number ";
  static const char tail[] = "); the process ends with SIGSYS\n";
  char buf[sizeof head + sizeof tail + 24];
  size_t n = 0;
  memcpy(buf, head, sizeof head - 1);
  n += sizeof head - 1;
  n += FormatUnsigned(buf + n, static_cast<unsigned long>(info->si_syscall));
  memcpy(buf + n, tail, sizeof tail - 1);
  n += sizeof tail - 1;
  ssize_t w = write(STDERR_FILENO, buf, n);
  (void)w;
  // SA_RESETHAND made the disposition the default again: the signal, delivered as soon as
  // this handler returns, ends the process the way an unhandled SIGSYS does.
  syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), sig);
}

}  // namespace

bool ParseSeccompMode(const std::string& name, SeccompMode* out) {
  if (name == "trap") *out = SeccompMode::kTrap;
  else if (name == "log") *out = SeccompMode::kLog;
  else if (name == "errno") *out = SeccompMode::kErrno;
  else if (name == "off") *out = SeccompMode::kOff;
  else return false;
  return true;
}

std::vector<sock_filter> VcpuSeccompProgram(SeccompMode mode, int vcpuFd) {
  std::vector<sock_filter> p;
  if (mode == SeccompMode::kOff) return p;
  const uint32_t violation = ViolationAction(mode);
  const size_t allowedCount = sizeof kAllowed / sizeof kAllowed[0];
  // Layout: arch check, number load, x32 check, ioctl rule (5), allowed numbers, then the two
  // returns: [violation, allow]. Jumps are forward distances to those.
  const size_t ioctlAt = 5;
  const size_t listAt = ioctlAt + 5;
  const size_t violationAt = listAt + allowedCount;
  const size_t allowAt = violationAt + 1;
  auto to = [](size_t from, size_t target) { return static_cast<uint8_t>(target - from - 1); };

  // 0-2: another architecture's numbers mean other calls: kill the process outright.
  p.push_back(Stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)));
  p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
  p.push_back(Stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
  // 3-4
  p.push_back(Stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)));
  p.push_back(Jump(BPF_JMP | BPF_JGE | BPF_K, kX32SyscallBit, to(4, violationAt), 0));
  // 5-9: ioctl(vcpuFd, KVM_RUN) only. The kernel takes fd and cmd as 32-bit values.
  p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 0, to(5, listAt)));
  p.push_back(Stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[0])));
  p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(vcpuFd), 0, to(7, violationAt)));
  p.push_back(Stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[1])));
  p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, KVM_RUN, to(9, allowAt), to(9, violationAt)));
  // listAt...: the number is still in the accumulator.
  for (size_t i = 0; i < allowedCount; i++) {
    size_t at = listAt + i;
    p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(kAllowed[i]), to(at, allowAt), 0));
  }
  p.push_back(Stmt(BPF_RET | BPF_K, violation));
  p.push_back(Stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  return p;
}

int InstallSeccompFilter(const std::vector<sock_filter>& program) {
  if (program.empty()) return 0;
  // A thread's first malloc picks its arena, and the one that takes the process past eight
  // arenas has glibc count the CPUs by opening /sys/devices/system/cpu/online: under the filter
  // that ends the process. Allocating once here ties this thread to its arena first.
  void* volatile first = malloc(64);
  free(first);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
  sock_fprog prog;
  prog.len = static_cast<unsigned short>(program.size());
  prog.filter = const_cast<sock_filter*>(program.data());
  // The seccomp(2) call, not prctl(PR_SET_SECCOMP): no TSYNC flag, so this thread alone.
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) return errno;
  return 0;
}

void InstallSigsysReporter() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = OnSigsys;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigaction(SIGSYS, &sa, nullptr);
  });
}

}  // namespace tern
