# Kernel-module helpers for building initramfs images (sourced, not run).
#
# The Debian kernel package ships no modules.dep (depmod runs at install time)
# and kmod may be absent, so dependencies come from each .ko's own
# .modinfo "depends=" field.

# kmod_path MODDIR NAME: relative path of module NAME (dash and underscore are
# interchangeable, as in the kernel); empty when the module does not exist.
kmod_path() {
  local moddir=$1 name=$2 alt
  alt=${name//_/-}
  local f
  f=$(cd "$moddir" && find kernel \( -name "$name.ko" -o -name "$alt.ko" -o -name "${name//-/_}.ko" \
        -o -name "$name.ko.xz" -o -name "$alt.ko.xz" -o -name "$name.ko.zst" -o -name "$alt.ko.zst" \) -print -quit)
  printf '%s' "$f"
}

# kmod_builtin MODDIR NAME: true when NAME is built into the kernel.
kmod_builtin() {
  local moddir=$1 name=${2//-/_}
  [ -f "$moddir/modules.builtin" ] || return 1
  sed 's/-/_/g' "$moddir/modules.builtin" | grep -q "/$name\.ko$"
}

# kmod_depends MODDIR RELPATH: space-separated dependency names of a module.
kmod_depends() {
  local file=$1/$2
  case $file in
    *.xz) xz -dc "$file" ;;
    *.zst) zstd -dc "$file" ;;
    *) cat "$file" ;;
  esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

# kmod_resolve MODDIR NAME...: relative paths of NAMEs and their dependencies,
# dependencies first, each once. Missing or built-in names are reported on
# stderr and skipped.
kmod_resolve() {
  local moddir=$1; shift
  local -A _kmod_seen=()
  local _kmod_out=()
  _kmod_visit() {
    local n=${1//-/_} rel dep
    [ -n "${_kmod_seen[$n]:-}" ] && return 0
    _kmod_seen[$n]=1
    rel=$(kmod_path "$moddir" "$1")
    if [ -z "$rel" ]; then
      if kmod_builtin "$moddir" "$1"; then
        echo "kmods: $1 is built in" >&2
      else
        echo "kmods: $1 not found, skipped" >&2
      fi
      return 0
    fi
    for dep in $(kmod_depends "$moddir" "$rel"); do
      _kmod_visit "$dep"
    done
    _kmod_out+=("$rel")
  }
  local m
  for m in "$@"; do _kmod_visit "$m"; done
  [ ${#_kmod_out[@]} -eq 0 ] || printf '%s\n' "${_kmod_out[@]}"
}
