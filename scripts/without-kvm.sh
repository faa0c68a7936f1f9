#!/usr/bin/env bash
# Runs a command as on a machine without /dev/kvm: in a private mount namespace whose /dev is a
# copy of this one minus kvm. Used to check that `npm test` passes there too (every KVM test then
# runs in the nested lab). As root: scripts/without-kvm.sh npm test
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
exec unshare --mount --propagation private bash -c '
  set -euo pipefail
  dev=$(mktemp -d /run/tern-dev.XXXXXX)
  mount -t tmpfs -o mode=0755 tmpfs "$dev"
  for f in /dev/*; do
    case "${f##*/}" in kvm|pts|shm|mqueue|hugepages) continue ;; esac
    cp -a "$f" "$dev/"
  done
  mkdir -p "$dev/pts" "$dev/shm"
  mount --bind /dev/pts "$dev/pts"
  mount --bind /dev/shm "$dev/shm"
  mount --move "$dev" /dev
  exec "$@"
' bash "$@"
