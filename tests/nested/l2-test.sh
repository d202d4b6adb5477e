# The L2 guest's checks for one zone alone (busybox sh, stdout is /dev/kmsg). Exit status =
# number of failures. Parameters come from the kernel command line: nested.mode=full|bench,
# nested.netsha=SHA, nested.disks=NAME@ADDR,... (the blk devices to check, by the address of
# their virtio-mmio window; the first is the built-in one the sustained I/O runs on),
# nested.vsock=PORT (a vsock device: send a stream to the host's PORT), nested.vfstag=TAG and
# nested.vfsha=SHA (a virtio-fs device: its file from-host has that sha256; write from-guest).
. /l2-lib.sh
MODE=$(arg mode); MODE=${MODE:-full}

# The disk behind the virtio-mmio window at ADDR (e.g. a000000).
disk_at() {
  for d in /sys/block/vd*; do
    case "$(readlink -f "$d/device")" in */$1.virtio_mmio/*) echo "/dev/${d##*/}" ;; esac
  done
}

# Guest-visible throughput of DISK, as VALUE NAME_READ_CS / NAME_WRITE_CS (centiseconds).
throughput() { # NAME DISK
  echo 3 > /proc/sys/vm/drop_caches
  t0=$(now_cs); dd if=$2 of=/dev/null bs=1M count=32 iflag=direct 2>/dev/null; t1=$(now_cs)
  value "$1_READ_CS" $((t1 - t0))
  info "$1 blk read 32 MiB O_DIRECT bs=1M: $((t1 - t0)) cs = $((32 * 100 * 100 / (t1 - t0 + 1) )) centi-MiB/s"
  t0=$(now_cs); dd if=/dev/zero of=$2 bs=1M count=16 seek=40 oflag=direct conv=fsync 2>/dev/null; t1=$(now_cs)
  value "$1_WRITE_CS" $((t1 - t0))
  info "$1 blk write 16 MiB O_DIRECT bs=1M: $((t1 - t0)) cs"
}

if [ "$MODE" = bench ]; then
  # The QEMU reference run: its one disk.
  [ -b /dev/vda ] || { fail "no /dev/vda (virtio devices: $(ls /sys/bus/virtio/devices))"; exit $F; }
  for round in 1 2 3; do throughput vhost-user /dev/vda; done
  exit $F
fi

# (1) blk data integrity on every disk: a pattern written with fsync, read back after dropping
# caches (VALUE NAME_BLKPAT; the host checks the same range of each image file afterwards).
# Then the disks' throughput, three rounds taking turns, so that they share the host's moods.
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
PAT=$(sha256sum /tmp/pat | cut -c1-64)
DISK= MEASURED=
for entry in $(arg disks | tr ',' ' '); do
  NAME=${entry%@*} D=$(disk_at "${entry#*@}")
  [ -b "$D" ] || { fail "$NAME blk: no disk at ${entry#*@} (virtio devices: $(ls /sys/bus/virtio/devices | tr '\n' ' '))"; continue; }
  [ -n "$DISK" ] || DISK=$D
  info "$NAME blk: $D, $(cat /sys/block/${D#/dev/}/size) sectors, at ${entry#*@}"
  value "${NAME}_BLKPAT" "$PAT"
  if dd if=/tmp/pat of=$D bs=1M seek=16 conv=fsync 2>/dev/null; then ok "$NAME blk: 4 MiB pattern written at 16 MiB with fsync"; else fail "$NAME blk: pattern write"; fi
  echo 3 > /proc/sys/vm/drop_caches
  GOT=$(dd if=$D bs=1M skip=16 count=4 2>/dev/null | sha256sum | cut -c1-64)
  [ "$GOT" = "$PAT" ] && ok "$NAME blk: pattern reads back after drop_caches" || fail "$NAME blk: pattern read back as $GOT, wrote $PAT"
  MEASURED="$MEASURED $NAME@$D"
done
[ -n "$DISK" ] || { fail "no disk to run the sustained I/O on"; exit $F; }
for round in 1 2 3; do
  for entry in $MEASURED; do throughput "${entry%@*}" "${entry#*@}"; done
done

# (2) sustained I/O: 30 s of O_DIRECT write+read-back rounds; no round may take over 5 s.
END=$(( $(now_cs) + 3000 )); ROUNDS=0; MAXGAP=0; BAD=0; LAST=$(now_cs)
while [ "$(now_cs)" -lt "$END" ]; do
  OFF=$(( 24 + ROUNDS % 8 ))
  dd if=/tmp/pat of=$DISK bs=256K count=1 skip=$((ROUNDS % 16)) seek=$((OFF * 4)) oflag=direct 2>/dev/null || BAD=$((BAD + 1))
  A=$(dd if=/tmp/pat bs=256K count=1 skip=$((ROUNDS % 16)) 2>/dev/null | md5sum | cut -c1-32)
  B=$(dd if=$DISK bs=256K count=1 skip=$((OFF * 4)) iflag=direct 2>/dev/null | md5sum | cut -c1-32)
  [ "$A" = "$B" ] || BAD=$((BAD + 1))
  T=$(now_cs); GAP=$((T - LAST)); LAST=$T; [ $GAP -gt $MAXGAP ] && MAXGAP=$GAP
  ROUNDS=$((ROUNDS + 1))
done
value SUSTAINED "rounds=$ROUNDS maxgap_cs=$MAXGAP bad=$BAD"
if [ $BAD = 0 ] && [ $ROUNDS -ge 10 ] && [ $MAXGAP -le 500 ]; then
  ok "sustained I/O 30 s: $ROUNDS write+verify rounds, longest round $MAXGAP cs, no mismatch"
else
  fail "sustained I/O: rounds=$ROUNDS longest=${MAXGAP}cs mismatches=$BAD"
fi

# (3) console, both ways, exact bytes: the L1 peer sends its payload after our marker.
if [ -c /dev/hvc0 ]; then
  # Keep the tty open for the whole test: hvc resets its termios when the last descriptor
  # closes, which would bring back echo and \n -> \r\n translation.
  exec 3<>/dev/hvc0
  stty -F /dev/hvc0 raw -echo
  seq 1 800 > /tmp/h2g.expected
  N=$(wc -c < /tmp/h2g.expected)
  head -c "$N" /dev/hvc0 > /tmp/h2g.got & RD=$!
  printf 'CONSOLE-READY\n' > /dev/hvc0
  i=0; while kill -0 $RD 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
  kill $RD 2>/dev/null
  cmp -s /tmp/h2g.got /tmp/h2g.expected && ok "console host->guest: $N bytes exact" \
    || fail "console host->guest: got $(wc -c < /tmp/h2g.got) bytes, differing from the expected $N"
  seq 2000 2600 > /dev/hvc0
  ok "console guest->host: sent $(seq 2000 2600 | wc -c) bytes (checked in L1)"
  exec 3>&-
else
  fail "no /dev/hvc0"
fi

# (4) rng
RC=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
case "$RC" in virtio_rng*) ok "hw_random uses $RC";; *) fail "rng_current is '$RC'";; esac
R=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | hexdump -v -e '1/1 "%02x"')
[ ${#R} = 128 ] && [ "$R" != "$(printf '%0128d' 0)" ] && ok "64 bytes from /dev/hwrng (${R%${R#????????????????}}...)" || fail "hwrng read gave '$R'"

# (5) net over the TAP in L1
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.2/24 dev eth0
  ping -c 3 -W 5 10.0.2.1 >/tmp/ping 2>&1 && ok "ping 10.0.2.1: $(grep -o '[0-9]* packets received' /tmp/ping)" || fail "ping: $(tail -n 2 /tmp/ping | tr '\n' ' ')"
  t0=$(now_cs)
  if wget -q -O /tmp/blob http://10.0.2.1:8080/blob; then
    t1=$(now_cs)
    S=$(sha256sum /tmp/blob | cut -c1-64)
    [ "$S" = "$(arg netsha)" ] && ok "1 MiB over HTTP from L1 in $((t1 - t0)) cs, sha256 matches" || fail "HTTP transfer sha256 $S, expected $(arg netsha)"
  else
    fail "wget from L1 failed"
  fi
else
  fail "no eth0"
fi

# (6) vsock: `seq 1 40000` to the host (CID 2) on PORT; L1 compares what arrived.
VPORT=$(arg vsock)
if [ -n "$VPORT" ]; then
  seq 1 40000 > /tmp/vsock.out
  if hvisor-standin vsock-send --port "$VPORT" --file /tmp/vsock.out --timeout 60 2>/tmp/vsock.err; then
    ok "vsock: $(wc -c < /tmp/vsock.out) bytes sent to the host's port $VPORT ($(tr '\n' ' ' < /tmp/vsock.err))"
  else
    fail "vsock: $(tr '\n' ' ' < /tmp/vsock.err)"
  fi
fi

# (7) virtiofs: the host's file read exactly, ours written for L1 to compare.
TAG=$(arg vfstag)
if [ -n "$TAG" ]; then
  mkdir -p /mnt/share
  if mount -t virtiofs "$TAG" /mnt/share 2>/tmp/mount.err; then
    S=$(sha256sum /mnt/share/from-host | cut -c1-64)
    [ "$S" = "$(arg vfsha)" ] && ok "virtiofs: host file reads back exactly ($(wc -c < /mnt/share/from-host) bytes)" \
      || fail "virtiofs: host file sha256 $S, expected $(arg vfsha)"
    # In 256 KiB writes: with --cache never each write(2) is one request, and seq writes a line
    # at a time.
    seq 1 30000 > /tmp/from-guest
    dd if=/tmp/from-guest of=/mnt/share/from-guest bs=256k 2>/dev/null && sync \
      && ok "virtiofs: from-guest written ($(wc -c < /mnt/share/from-guest) bytes)" || fail "virtiofs: writing from-guest"
    umount /mnt/share || fail "virtiofs: umount"
  else
    fail "virtiofs: mount -t virtiofs $TAG: $(tr '\n' ' ' < /tmp/mount.err)"
  fi
fi
exit $F
