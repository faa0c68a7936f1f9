#!/usr/bin/env bash
# Builds the lab VM's initramfs ($TERN_FIXTURES/lab/initramfs.img) from the
# guest fixtures (kernel modules, static busybox): kvm for AMD SVM and the
# virtio-pci 9p stack for the host share. Idempotent; prints nothing when
# up to date.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/kmods.sh
. "$here/lib/kmods.sh"
# shellcheck source=lib/initramfs.sh
. "$here/lib/initramfs.sh"

FIX=${TERN_FIXTURES:-/var/cache/tern/fixtures}
LAB=$FIX/lab
# kvm-amd needs ccp (SEV) and kvm, kvm needs irqbypass; 9p needs netfs and
# fscache; virtio_ring goes before virtio. The resolver orders them. veth joins the network
# namespaces that play two hosts in the migration tests; tun gives the guests' net cards taps.
LAB_MODULES="irqbypass kvm ccp kvm-amd virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
  virtio_pci netfs fscache 9pnet 9pnet_virtio 9p veth tun"

bash "$here/guest-fixtures.sh"

mkdir -p "$LAB/jobs"
exec 9> "$LAB/.lock"
flock 9

key="$(sed -n 1p "$FIX/.stamp") lab=$(cat "${BASH_SOURCE[0]}" "$here/lab/init" "$here/lib/kmods.sh" "$here/lib/initramfs.sh" | sha256sum | cut -c1-16)"
if [ -f "$LAB/.stamp" ] && [ "$(cat "$LAB/.stamp")" = "$key" ] && [ -s "$LAB/initramfs.img" ]; then
  exit 0
fi

work=$LAB/.build
rm -rf "$work"
ir_busybox_root "$work" "$FIX/busybox"
install -m 0755 "$here/lab/init" "$work/init"
ir_add_modules "$work" "$FIX/modules" $LAB_MODULES
ir_pack "$work" "$LAB/initramfs.img"
rm -rf "$work"
echo "$key" > "$LAB/.stamp"
echo "lab-initramfs: built $LAB/initramfs.img ($(du -h "$LAB/initramfs.img" | cut -f1))" >&2
