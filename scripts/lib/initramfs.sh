# Helpers to lay out and pack a busybox initramfs (sourced, not run).
# Needs: cpio, gzip; kmods.sh sourced for ir_add_modules.

# ir_busybox_root DIR BUSYBOX: minimal tree with a static busybox and its
# applet links made at build time (saves `busybox --install` at every boot).
ir_busybox_root() {
  local root=$1 bb=$2 applet
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/modules,mnt}
  install -m 0755 "$bb" "$root/bin/busybox"
  for applet in $("$bb" --list-full); do
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
  # The kernel opens /dev/console for init before devtmpfs is mounted.
  [ -e "$root/dev/console" ] || mknod -m 0600 "$root/dev/console" c 5 1
  [ -e "$root/dev/null" ] || mknod -m 0666 "$root/dev/null" c 1 3
  chmod 1777 "$root/tmp"
}

# ir_add_modules DIR MODDIR NAME...: copies NAMEs and their dependencies
# (uncompressed, as busybox insmod wants) under DIR/lib/modules and writes
# DIR/etc/modules.load: one path per line in load order.
ir_add_modules() {
  local root=$1 moddir=$2; shift 2
  local rel base
  : > "$root/etc/modules.load"
  while IFS= read -r rel; do
    base=${rel##*/}
    case $base in
      *.xz) base=${base%.xz}; xz -dc "$moddir/$rel" > "$root/lib/modules/$base" ;;
      *.zst) base=${base%.zst}; zstd -qdc "$moddir/$rel" > "$root/lib/modules/$base" ;;
      *) cp "$moddir/$rel" "$root/lib/modules/$base" ;;
    esac
    echo "/lib/modules/$base" >> "$root/etc/modules.load"
  done < <(kmod_resolve "$moddir" "$@")
}

# ir_pack DIR OUT: gzip'ed newc cpio of DIR, owned by root, sorted for
# reproducible output.
ir_pack() {
  local root=$1 out=$2
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    | gzip -9 -n > "$out.part"
  mv -f "$out.part" "$out"
}
