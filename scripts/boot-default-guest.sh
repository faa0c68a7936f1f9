#!/usr/bin/env bash
# Boots the default guest: Debian's kernel and the busybox initramfs, 2 vCPUs, 512 MiB, serial
# console on this terminal. Where the CPU has no vmx/svm (this /dev/kvm cannot boot Linux),
# the same command runs inside the nested lab, with a demo command instead of a shell.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${TERN_FIXTURES:-/var/cache/tern/fixtures}
if grep -qwE 'vmx|svm' /proc/cpuinfo; then
  exec node dist/bin/tern.js --kernel "$F/vmlinux" --initramfs "$F/initramfs.img" \
    --cmdline "console=ttyS0 quiet" --cpus boot=2 --memory size=512M --serial tty --console off
fi
echo "boot-default-guest: no vmx/svm on this CPU; booting inside the lab (non-interactive)" >&2
exec node dist/test/lab/run-in-lab.js "node dist/bin/tern.js --kernel $F/vmlinux --initramfs $F/initramfs.img \
  --cmdline 'console=ttyS0 quiet tern.cmd=\"uname -a; nproc; free -m; cat /proc/cmdline\"' \
  --cpus boot=2 --memory size=512M --serial tty --console off"
