#!/usr/bin/env bash
# Builds the test-guest material from Debian packages into $TERN_FIXTURES
# (default /var/cache/tern/fixtures; not /tmp: the lab VM cannot see a tmpfs
# /tmp). Idempotent: returns at once when the stamp matches.
#
# Produces:
#   bzImage         Debian kernel (boot/vmlinuz-*)
#   vmlinux         ELF kernel with the PVH entry note (from bzImage's xz payload)
#   modules/        the kernel's lib/modules/<release> tree
#   initramfs.img   gzip'ed newc cpio: static busybox, virtio/9p/ACPI button/
#                   evdev modules, /init, acpid's power-button handler, the
#                   migration tests' workload (/bin/migration-workload) and
#                   the disk and network benchmarks (/bin/blkbench and
#                   /bin/netbench, built static from guest/*.c)
#   busybox         the static busybox used
#   kernel.env      KERNEL_PACKAGE, KERNEL_VERSION, KERNEL_RELEASE
# Env: TERN_FIXTURES, TERN_GUEST_EXTRA_MODULES (more module names to add).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/kmods.sh
. "$here/lib/kmods.sh"
# shellcheck source=lib/initramfs.sh
. "$here/lib/initramfs.sh"

FIX=${TERN_FIXTURES:-/var/cache/tern/fixtures}
# Load order is resolved from each module's depends= (virtio_ring before
# virtio, netfs before fscache, ...). virtio_mmio is what QEMU microvm uses.
# button and evdev carry the ACPI power button to busybox acpid.
GUEST_MODULES="virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
  virtio_blk virtio_net virtio_console virtio_rng crc32c_generic crc16 mbcache jbd2 ext4 netfs fscache 9pnet 9pnet_virtio 9p button evdev ${TERN_GUEST_EXTRA_MODULES:-}"

log() { echo "guest-fixtures: $*" >&2; }
die() { log "error: $*"; exit 1; }

kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

is_static_elf() {
  [ -x "$1" ] || return 1
  if command -v readelf >/dev/null; then
    readelf -h "$1" >/dev/null 2>&1 && ! readelf -l "$1" 2>/dev/null | grep -q INTERP
  else
    # Without binutils, only trust the binary dpkg says is busybox-static's.
    dpkg -S "$1" 2>/dev/null | grep -q '^busybox-static:'
  fi
}

mkdir -p "$FIX"
exec 9> "$FIX/.lock"
flock 9

bb=/bin/busybox
is_static_elf "$bb" || bb=  # taken from the busybox-static package below
self_hash=$(cat "${BASH_SOURCE[0]}" "$here/lib/kmods.sh" "$here/lib/initramfs.sh" "$here/guest/init" \
  "$here/guest/acpi-power-button" "$here/guest/migration-workload" "$here/guest/blkbench.c" "$here/guest/netbench.c" | sha256sum | cut -c1-16)
outputs_ok() {
  [ -s "$FIX/bzImage" ] && [ -s "$FIX/vmlinux" ] && [ -s "$FIX/initramfs.img" ] && [ -d "$FIX/modules" ]
}

# Fast path without apt-cache (about 1 s a call where APT keeps no binary
# cache): the same apt lists, scripts and busybox give the same kernel.
lists=$(stat -c '%n %Y %s' /var/lib/apt/lists/*_Packages* 2>/dev/null | sha256sum | cut -c1-16)
bbsum=$( [ -n "$bb" ] && sha256sum "$bb" | cut -c1-16 || echo deb)
quick="lists=$lists busybox=$bbsum modules=$(echo $GUEST_MODULES) scripts=$self_hash"
if [ -f "$FIX/.stamp" ] && [ "$(sed -n 2p "$FIX/.stamp")" = "$quick" ] && outputs_ok; then
  exit 0
fi

kpkg=$(kernel_package)
if [ -z "$kpkg" ]; then
  log "apt lists have no linux-image-amd64; running apt-get update"
  apt-get update -qq >&2 || true
  kpkg=$(kernel_package)
fi
if [ -z "$kpkg" ]; then
  [ -f "$FIX/.stamp" ] && outputs_ok && { log "apt unavailable; keeping existing fixtures"; exit 0; }
  die "cannot find the kernel package of linux-image-amd64"
fi
kver=$(apt-cache show --no-all-versions "$kpkg" | sed -n 's/^Version: //p' | head -n1)
if [ -n "$bb" ]; then
  bbkey=$bbsum
else
  bbkey=$(apt-cache show --no-all-versions busybox-static | sed -n 's/^Version: //p' | head -n1)
fi

# The stamp's first line is keyed by the kernel package version.
key="$kpkg=$kver busybox=$bbkey modules=$(echo $GUEST_MODULES) scripts=$self_hash"
if [ -f "$FIX/.stamp" ] && [ "$(sed -n 1p "$FIX/.stamp")" = "$key" ] && outputs_ok; then
  printf '%s\n%s\n' "$key" "$quick" > "$FIX/.stamp"
  exit 0
fi

log "building into $FIX ($kpkg $kver)"
work=$FIX/.build
rm -rf "$work"
mkdir -p "$work/debs" "$FIX/debs"

deb() {  # deb PACKAGE: path of its downloaded .deb (cached in $FIX/debs)
  local pkg=$1 v f
  v=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n1)
  f=$(ls "$FIX/debs/${pkg}_${v//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$f" ]; then
    (cd "$work/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) || die "apt-get download $pkg failed"
    mv "$work/debs/${pkg}_"*.deb "$FIX/debs/"
    f=$(ls "$FIX/debs/${pkg}_"*.deb | head -n1)
  fi
  echo "$f"
}

# Kernel: bzImage, modules tree.
kdeb=$(deb "$kpkg")
dpkg-deb -x "$kdeb" "$work/kernel"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -n1)
krel=${vmlinuz##*/vmlinuz-}
[ -d "$work/kernel/lib/modules/$krel" ] || die "no modules for $krel in $kdeb"

# vmlinux: the first xz stream in the bzImage that decompresses to an ELF.
# --single-stream ignores the trailing bytes after the payload.
found=
for off in $(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | cut -d: -f1); do
  # (tail gets SIGPIPE once xz stops reading: only xz's status counts.)
  if (set +o pipefail; tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream > "$work/vmlinux" 2>/dev/null) \
     && [ "$(head -c4 "$work/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
    found=1; break
  fi
done
[ -n "$found" ] || die "no xz-compressed ELF found in $vmlinuz"
if command -v readelf >/dev/null; then
  # XEN_ELFNOTE_PHYS32_ENTRY (0x12): the PVH entry point.
  readelf -n "$work/vmlinux" | grep -A0 -E '^\s+Xen\s' | grep -q -i -E '0x00000012|PHYS32_ENTRY' \
    || die "vmlinux has no PVH (Xen 0x12) note"
else
  log "readelf missing: PVH note not verified"
fi

# Busybox: the host's if it is static, else the busybox-static package's.
if [ -z "$bb" ]; then
  dpkg-deb -x "$(deb busybox-static)" "$work/busybox-pkg"
  bb=$work/busybox-pkg/bin/busybox
  is_static_elf "$bb" || die "busybox-static package has no static /bin/busybox"
fi

# Initramfs.
root=$work/initramfs
ir_busybox_root "$root" "$bb"
install -m 0755 "$here/guest/init" "$root/init"
install -D -m 0755 "$here/guest/acpi-power-button" "$root/etc/acpi/PWRF/00000080"
install -m 0755 "$here/guest/migration-workload" "$root/bin/migration-workload"
# The benchmarks run in the guest: built static, as the initramfs has no libraries.
gcc -O2 -static -pthread -o "$root/bin/blkbench" "$here/guest/blkbench.c" || die "cannot build blkbench (gcc, libc6-dev)"
gcc -O2 -static -o "$root/bin/netbench" "$here/guest/netbench.c" || die "cannot build netbench (gcc, libc6-dev)"
printf '%s\n' 'export PS1="tern# "' > "$root/etc/profile"
ir_add_modules "$root" "$work/kernel/lib/modules/$krel" $GUEST_MODULES
ir_pack "$root" "$work/initramfs.img"

# Publish: replace the outputs, stamp last.
rm -f "$FIX/.stamp"
install -m 0755 "$bb" "$FIX/busybox"
mv -f "$vmlinuz" "$FIX/bzImage"
mv -f "$work/vmlinux" "$FIX/vmlinux"
mv -f "$work/initramfs.img" "$FIX/initramfs.img"
rm -rf "$FIX/modules"
mv "$work/kernel/lib/modules/$krel" "$FIX/modules"
cp "$work"/kernel/boot/config-* "$FIX/config"
printf 'KERNEL_PACKAGE=%s\nKERNEL_VERSION=%s\nKERNEL_RELEASE=%s\n' "$kpkg" "$kver" "$krel" > "$FIX/kernel.env"
rm -rf "$work"
# Older kernel debs are no longer needed.
find "$FIX/debs" -name 'linux-image-*.deb' ! -name "${kpkg}_*" -delete
printf '%s\n%s\n' "$key" "$quick" > "$FIX/.stamp"
log "done: $(du -h "$FIX/initramfs.img" | cut -f1) initramfs, kernel $krel"
