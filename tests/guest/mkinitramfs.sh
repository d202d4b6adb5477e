#!/bin/bash
# Build a tiny initramfs: busybox-static + virtio modules from an extracted Debian kernel .deb
# + optional extra host binaries (copied with their shared libraries) + an init that runs /test.sh.
# usage: mkinitramfs.sh KROOT KVER OUT [extra-binary ...]
#   KROOT: directory where the linux-image .deb was dpkg -x'ed (has lib/modules/KVER)
#   env BUSYBOX=path to a static busybox
#   env MODS="virtio_pci virtio_mmio ..." modules to load (deps resolved from modules.dep)
#   env COMPRESS=gzip|none
# The per-test /test.sh is appended later as a second cpio archive (the kernel merges them).
# Extra binaries are host (x86_64) binaries: only use them with the x86 kernel.
set -euo pipefail
KROOT=$(realpath "$1"); KVER=$2; OUT=$(realpath -m "$3"); shift 3
BUSYBOX=${BUSYBOX:?set BUSYBOX to a static busybox}
MODS=${MODS:-"virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtio-rng vmw_vsock_virtio_transport"}
COMPRESS=${COMPRESS:-gzip}
MD=$KROOT/lib/modules/$KVER
[ -f "$MD/modules.dep" ] || depmod -b "$KROOT" "$KVER"
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/{bin,sbin,proc,sys,dev,tmp,etc,mnt,lib/modules,usr/bin,usr/sbin,usr/lib}
cp "$BUSYBOX" "$W/bin/busybox"

# resolve module dependencies (depth first, deps before the module), record load order
declare -A seen; order=()
add_mod() { # $1 = path relative to $MD
  local p=$1 deps d; [ -n "${seen[$p]:-}" ] && return 0; seen[$p]=1
  deps=$(grep -E "^${p}:" "$MD/modules.dep" | cut -d: -f2)
  for d in $deps; do add_mod "$d"; done
  order+=("$p")
}
for m in $MODS; do
  p=$(grep -E "/${m//_/[-_]}\.ko(\.xz|\.zst|\.gz)?:" "$MD/modules.dep" | head -1 | cut -d: -f1 || true)
  if [ -z "$p" ]; then echo "note: module $m not found as .ko (built-in or absent)" >&2; continue; fi
  add_mod "$p"
done
: > "$W/etc/modules.order"
for p in "${order[@]}"; do
  b=$(basename "$p")
  case "$b" in
    *.xz) xz -dc "$MD/$p" > "$W/lib/modules/${b%.xz}"; b=${b%.xz};;
    *.zst) zstd -qdc "$MD/$p" > "$W/lib/modules/${b%.zst}"; b=${b%.zst};;
    *.gz) gzip -dc "$MD/$p" > "$W/lib/modules/${b%.gz}"; b=${b%.gz};;
    *) cp "$MD/$p" "$W/lib/modules/$b";;
  esac
  echo "$b" >> "$W/etc/modules.order"
done

# extra binaries with their shared libraries (ldd closure), placed under /usr/bin (found before busybox applets)
for bin in "$@"; do
  cp -L "$bin" "$W/usr/bin/"
  for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$W$(dirname "$lib")"; cp -Ln "$lib" "$W$lib" 2>/dev/null || true
  done
done
# the dynamic loader is looked up at /lib64 on x86_64
[ -e "$W/lib64" ] || { [ -d "$W/usr/lib64" ] && ln -s usr/lib64 "$W/lib64"; } || true

cat > "$W/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m 2>/dev/null || echo "insmod $m failed"; done
echo "HARNESS: booted $(uname -r) $(uname -m) at uptime $(cut -d' ' -f1 /proc/uptime)s"
rc=0
if [ -f /test.sh ]; then sh /test.sh; rc=$?; else echo "HARNESS: no /test.sh"; rc=99; fi
sync
echo "HARNESS-RESULT: rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)s"
poweroff -f
INIT
chmod +x "$W/init"
( cd "$W" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet ) > "$OUT.tmp"
case "$COMPRESS" in
  gzip) gzip -1 -c "$OUT.tmp" > "$OUT"; rm "$OUT.tmp";;
  none) mv "$OUT.tmp" "$OUT";;
  *) echo "bad COMPRESS=$COMPRESS" >&2; exit 1;;
esac
echo "built $(basename "$OUT") ($(du -h "$OUT" | cut -f1)), modules: $(tr '\n' ' ' < "$W/etc/modules.order")"
