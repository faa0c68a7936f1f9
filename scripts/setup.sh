#!/usr/bin/env bash
# Installs what Tern needs on a Debian 12 machine (as root): build tools, the QEMU used as the
# nested lab and as the side-by-side peer, qemu-img (the disk image tests create and check images
# with it), busybox and cpio for guest initramfs images, acpica-tools for checking our ACPI
# tables, openssl for the certificates of the TLS migration tests; then the npm packages, the
# native addon, the TypeScript build and the guest fixtures built from Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential python3 qemu-system-x86 qemu-utils busybox-static cpio xz-utils gzip acpica-tools binutils e2fsprogs libxxhash-dev iproute2 openssl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  npm ci --no-audit --no-fund
else
  npx node-gyp rebuild >/dev/null
fi
npm run build
bash scripts/guest-fixtures.sh

# `tern` and `tern-remote` on the PATH, as the README's examples call them.
bindir="$(npm prefix -g)/bin"
mkdir -p "$bindir"
# tern through its launcher (it starts from the startup snapshot when it can), tern-remote as it is
ln -sfn "$PWD/dist/bin/tern" "$bindir/tern"
ln -sfn "$PWD/dist/bin/tern-remote.js" "$bindir/tern-remote"
