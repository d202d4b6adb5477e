# Runs inside L1 (arm64 Linux with KVM, under QEMU TCG): plays the root zone. Starts the
# stand-in (hvisor's role) and the daemon, lets the L2 guests run their checks, then checks what
# only L1 can see. Two runs: one zone with every device type, then two zones (three vCPUs) on
# one bridge page and one daemon. Binaries and the L2 kernel/initramfs are in /usr/bin; the
# host's images are L1 disks told apart by their serial.
B=/usr/bin
F=0
ok() { echo "ok: L1: $*"; }
fail() { echo "FAIL: L1: $*"; F=$((F + 1)); }
info() { echo "info: L1: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# `bind` creates a socket file just before `listen` runs: wait for the listening flag.
listening() { grep -q " 00010000 .* $1\$" /proc/net/unix; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}'; }
disk() { # SERIAL -> /dev/vdX
  for d in /sys/block/vd*; do [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${d##*/}"; done
}
cd /tmp
[ -c /dev/kvm ] && ok "/dev/kvm present" || { fail "no /dev/kvm in L1 (is QEMU run with virtualization=on?)"; exit 1; }
DISK=$(disk single); XDISK=$(disk external); QDISK=$(disk qsd); Z1DISK=$(disk zone1); Z2DISK=$(disk zone2)
[ -b "$DISK" ] && [ -b "$XDISK" ] && [ -b "$QDISK" ] && [ -b "$Z1DISK" ] && [ -b "$Z2DISK" ] \
  || { fail "host images missing in L1: single='$DISK' external='$XDISK' qsd='$QDISK' zone1='$Z1DISK' zone2='$Z2DISK'"; exit 1; }
Q=quiet; grep -q "nested.l2verbose=1" /proc/cmdline && Q="loglevel=7"
L2ARGS="earlycon=uart8250,mmio,0x9000000 keep_bootcon printk.devkmsg=on panic=-1 $Q rdinit=/init"
# Bounds of one stand-in run: a guest stuck on a lost interrupt never powers off. On SIGTERM
# the stand-in prints what every vCPU did and was waiting for, and exits 1.
RUN_TIMEOUT=$(sed -n 's/.*nested\.run_timeout=\([0-9]*\).*/\1/p' /proc/cmdline); RUN_TIMEOUT=${RUN_TIMEOUT:-400}
# A synchronous answer later than this is an error naming the CPU and register (hvisor would
# spin forever).
STANDIN="$B/hvisor-standin run --answer-timeout 60 --kernel $B/Image --initrd $B/l2.cpio.gz"

# Waits for the stand-in ($1) to end, then for the daemon ($2) to follow; NAME is $3.
finish_run() {
  wait "$1"; SRC=$?
  [ $SRC = 0 ] && ok "$3: stand-in exited 0 (guests powered off)" || fail "$3: stand-in exited with status $SRC"
  i=0; while kill -0 "$2" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$2" 2>/dev/null; then fail "$3: daemon still running 10 s after the hypervisor socket closed"; kill "$2"; fi
  wait "$2"; DRC=$?
  [ $DRC = 0 ] && ok "$3: daemon exited 0 after the hypervisor closed" || fail "$3: daemon exited with status $DRC"
}
# Compares what a console peer recorded with MARKER + the guest's `seq FROM TO`.
check_console() { # LABEL RECORDED MARKER FROM TO
  { printf '%s\n' "$3"; seq "$4" "$5"; } > /tmp/expected.g2h
  if cmp -s "$2" /tmp/expected.g2h; then ok "$1 console guest->host: $(wc -c < "$2") bytes exact"
  else fail "$1 console guest->host: got $(wc -c < "$2" 2>/dev/null) bytes, expected $(wc -c < /tmp/expected.g2h) ($(head -c 80 "$2" | od -c | head -3 | tr '\n' ' '))"; fi
}
stop_peer() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done; kill "$1" 2>/dev/null; }

# Waits until the socket at $1 listens; fails naming $2 otherwise.
wait_listening() {
  i=0; while ! listening "$1" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  listening "$1" || fail "$2 does not listen on $1 after 10 s"
}
# Stops an external backend ($1, named $2), which must still be running, with SIGTERM; it must
# then exit with status $3 (0; 143 for one that leaves SIGTERM's default action).
stop_backend() {
  kill -0 "$1" 2>/dev/null || fail "one zone: $2 exited before the end of the run"
  kill -TERM "$1" 2>/dev/null
  i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$1" 2>/dev/null; then fail "$2 still running 5 s after SIGTERM"; kill -KILL "$1"; fi
  wait "$1"; BRC=$?
  [ $BRC = "$3" ] && ok "one zone: $2 exited $BRC after SIGTERM" || fail "one zone: $2 exited with status $BRC, not $3"
}

###############################################################################
# Run 1: one zone, one vCPU: blk, console, rng, net, and devices served by external vhost-user
# backends in L1: a blk by our own `hvisor-vhost blk`, and, when L1 has them, a blk by
# qemu-storage-daemon, a vsock by vhost-device-vsock and a virtio-fs by virtiofsd.
echo "=== L1 run 1: one zone"
RUST_LOG=warn $B/hvisor-vhost blk --socket-path /tmp/xblk.sock --image "$XDISK" > /tmp/xblk.log 2>&1 &
XBLK=$!
EXTERNAL='{ "type": "blk", "addr": "0xa000800", "len": "0x200", "irq": 52, "socket": "/tmp/xblk.sock", "status": "enable" }'
DISKS="builtin@a000000,external@a000800"
if [ -x $B/qemu-storage-daemon ]; then
  $B/qemu-storage-daemon --blockdev "driver=host_device,node-name=q0,filename=$QDISK,aio=threads" \
    --export "type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on,num-queues=1" \
    > /tmp/qsd.log 2>&1 &
  QSD=$!
  EXTERNAL="$EXTERNAL,
    { \"type\": \"vhost-user\", \"device_id\": 2, \"addr\": \"0xa000a00\", \"len\": \"0x200\", \"irq\": 53, \"socket\": \"/tmp/qsd.sock\", \"status\": \"enable\" }"
  DISKS="$DISKS,qsd@a000a00"
  wait_listening /tmp/qsd.sock qemu-storage-daemon
  info "qemu-storage-daemon: $($B/qemu-storage-daemon --version | head -1)"
else
  QSD=
  info "SKIPPED: qemu-storage-daemon case: L1 has no qemu-storage-daemon (see the run script's output)"
fi
# rust-vmm's vhost-device-vsock: the guest connects to the host (CID 2) port 5000, which the
# backend turns into a connection to the Unix socket /tmp/vsock.uds_5000.
VSOCK=; VSOCK_ARG=
if [ -x $B/vhost-device-vsock ]; then
  seq 1 40000 > /tmp/vsock.expected
  $B/hvisor-standin unix-sink --socket /tmp/vsock.uds_5000 --out /tmp/vsock.got --bytes $(wc -c < /tmp/vsock.expected) --timeout 500 2>/tmp/vsock-sink.log &
  VSINK=$!
  RUST_LOG=warn $B/vhost-device-vsock --guest-cid 3 --socket /tmp/vsock-vu.sock --uds-path /tmp/vsock.uds \
    > /tmp/vsock.log 2>&1 &
  VSOCK=$!
  EXTERNAL="$EXTERNAL,
    { \"type\": \"vhost-user\", \"device_id\": 19, \"addr\": \"0xa000c00\", \"len\": \"0x200\", \"irq\": 54, \"socket\": \"/tmp/vsock-vu.sock\", \"status\": \"enable\" }"
  VSOCK_ARG="nested.vsock=5000"
  wait_listening /tmp/vsock-vu.sock vhost-device-vsock
else
  info "SKIPPED: vhost-device-vsock case: L1 has no vhost-device-vsock (see the run script's output)"
fi
# virtiofsd sharing /srv/share under the tag hvshare; the guest reads from-host and writes
# from-guest.
VFSD=; VFSD_ARG=
if [ -x $B/virtiofsd ]; then
  mkdir -p /srv/share && head -c 262144 /dev/urandom > /srv/share/from-host
  VFSD_ARG="nested.vfstag=hvshare nested.vfsha=$(sha256sum /srv/share/from-host | cut -c1-64)"
  $B/virtiofsd --socket-path /tmp/vfsd.sock --shared-dir /srv/share --tag hvshare --sandbox none --seccomp log \
    --cache never > /tmp/vfsd.log 2>&1 &
  VFSD=$!
  EXTERNAL="$EXTERNAL,
    { \"type\": \"vhost-user\", \"device_id\": 26, \"addr\": \"0xa000e00\", \"len\": \"0x200\", \"irq\": 55, \"socket\": \"/tmp/vfsd.sock\", \"status\": \"enable\" }"
  wait_listening /tmp/vfsd.sock virtiofsd
else
  info "SKIPPED: virtiofsd case: L1 has no virtiofsd (see the run script's output)"
fi
wait_listening /tmp/xblk.sock "hvisor-vhost blk"
$B/hvisor-standin mktap tap0 && ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up \
  || fail "cannot set up tap0"
mkdir -p /srv && head -c 1048576 /dev/urandom > /srv/blob
NETSHA=$(sha256sum /srv/blob | cut -c1-64)
httpd -p 8080 -h /srv
seq 1 800 > /tmp/h2g.txt

cat > /tmp/virtio_cfg.json <<JSON
{ "zones": [ { "id": 1,
  "memory_region": [ { "zone0_ipa": "0x50000000", "zonex_ipa": "0x40000000", "size": "0x20000000" } ],
  "devices": [
    { "type": "blk", "addr": "0xa000000", "len": "0x200", "irq": 48, "img": "$DISK", "status": "enable" },
    { "type": "console", "addr": "0xa000200", "len": "0x200", "irq": 49, "socket": "/tmp/con.sock", "status": "enable" },
    { "type": "rng", "addr": "0xa000400", "len": "0x200", "irq": 50, "status": "enable" },
    { "type": "net", "addr": "0xa000600", "len": "0x200", "irq": 51, "tap": "tap0",
      "mac": ["0x02", "0x16", "0x3e", "0x10", "0x20", "0x30"], "status": "enable" },
    $EXTERNAL ] } ] }
JSON

$B/hvisor-standin console-peer --socket /tmp/con.sock --marker CONSOLE-READY --send /tmp/h2g.txt \
  --out /tmp/g2h.bin --timeout 400 2>/tmp/peer.log &
PEER=$!
T0=$(uptime_s)
timeout "$RUN_TIMEOUT" $STANDIN --config /tmp/virtio_cfg.json --socket /tmp/hv.sock \
  --cmdline "$L2ARGS nested.mode=full nested.netsha=$NETSHA nested.disks=$DISKS $VSOCK_ARG $VFSD_ARG" 2>&1 &
SI=$!
# The stand-in listens first; the daemon connects like to any hypervisor socket.
i=0; while ! listening /tmp/hv.sock && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
RUST_LOG=warn $B/hvisor-vhost hvisor --config /tmp/virtio_cfg.json --hypervisor-socket /tmp/hv.sock > /tmp/daemon.log 2>&1 &
finish_run $SI $! "one zone"
info "one-zone run took $(since "$T0") s (L1 clock)"
stop_backend $XBLK "hvisor-vhost blk (external backend)" 0
info "external hvisor-vhost blk log (last 5 lines):"; tail -n 5 /tmp/xblk.log | sed 's/^/info: L1:   /'
if [ -n "$QSD" ]; then
  stop_backend $QSD qemu-storage-daemon 0
  info "qemu-storage-daemon log (last 5 lines):"; tail -n 5 /tmp/qsd.log | sed 's/^/info: L1:   /'
fi
if [ -n "$VSOCK" ]; then
  # vhost-device-vsock waits for the next frontend forever and has no SIGTERM handler.
  stop_backend $VSOCK vhost-device-vsock 143
  stop_peer $VSINK
  if cmp -s /tmp/vsock.got /tmp/vsock.expected; then ok "one zone: vsock guest->host: $(wc -c < /tmp/vsock.got) bytes exact"
  else fail "one zone: vsock guest->host: got $(wc -c < /tmp/vsock.got 2>/dev/null) bytes, expected $(wc -c < /tmp/vsock.expected)"; fi
  info "vsock sink: $(tr '\n' ' ' < /tmp/vsock-sink.log); backend log (last 5 lines):"
  tail -n 5 /tmp/vsock.log | sed 's/^/info: L1:   /'
fi
if [ -n "$VFSD" ]; then
  # virtiofsd serves one frontend and exits once it has left.
  i=0; while kill -0 $VFSD 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 $VFSD 2>/dev/null; then fail "one zone: virtiofsd still running 10 s after its frontend left"; kill $VFSD; fi
  wait $VFSD; VRC=$?
  [ $VRC = 0 ] && ok "one zone: virtiofsd exited 0 after its frontend left" || fail "one zone: virtiofsd exited with status $VRC"
  seq 1 30000 > /tmp/from-guest.expected
  if cmp -s /srv/share/from-guest /tmp/from-guest.expected; then ok "one zone: virtiofs guest->host: $(wc -c < /srv/share/from-guest) bytes exact"
  else fail "one zone: virtiofs guest->host: /srv/share/from-guest has $(wc -c < /srv/share/from-guest 2>/dev/null) bytes, expected $(wc -c < /tmp/from-guest.expected)"; fi
  info "virtiofsd log (last 5 lines):"; tail -n 5 /tmp/vfsd.log | sed 's/^/info: L1:   /'
fi
stop_peer $PEER
check_console "one zone:" /tmp/g2h.bin CONSOLE-READY 2000 2600
info "one-zone daemon log (last 15 lines):"; tail -n 15 /tmp/daemon.log | sed 's/^/info: L1:   /'
info "console peer: $(cat /tmp/peer.log | tr '\n' ' ')"

###############################################################################
# Run 2: zones 1 and 2 in one stand-in, one bridge page, one daemon. The same device addresses
# in both zones, each zone its own interrupt numbers, disk and console. Zone 1 runs 2 vCPUs
# (physical CPUs 1 and 2), zone 2 one (CPU 3): each vCPU answers through its own cfg_flags and
# cfg_values entry.
echo "=== L1 run 2: two zones"
cat > /tmp/zones.json <<JSON
{ "zones": [
  { "id": 1, "memory_region": [ { "zone0_ipa": "0x50000000", "zonex_ipa": "0x40000000", "size": "0x10000000" } ],
    "devices": [
      { "type": "blk", "addr": "0xa000000", "len": "0x200", "irq": 48, "img": "$Z1DISK", "status": "enable" },
      { "type": "console", "addr": "0xa000200", "len": "0x200", "irq": 49, "socket": "/tmp/z1con.sock", "status": "enable" },
      { "type": "rng", "addr": "0xa000400", "len": "0x200", "irq": 50, "status": "enable" } ] },
  { "id": 2, "memory_region": [ { "zone0_ipa": "0x60000000", "zonex_ipa": "0x40000000", "size": "0x10000000" } ],
    "devices": [
      { "type": "blk", "addr": "0xa000000", "len": "0x200", "irq": 52, "img": "$Z2DISK", "status": "enable" },
      { "type": "console", "addr": "0xa000200", "len": "0x200", "irq": 53, "socket": "/tmp/z2con.sock", "status": "enable" },
      { "type": "rng", "addr": "0xa000400", "len": "0x200", "irq": 54, "status": "enable" } ] } ] }
JSON
PEERS=""
for z in 1 2; do
  seq $((z * 10000 + 1)) $((z * 10000 + 800)) > /tmp/z$z.h2g
  $B/hvisor-standin console-peer --socket "/tmp/z${z}con.sock" --marker "ZONE$z-READY" --send /tmp/z$z.h2g \
    --out /tmp/z$z.g2h --ready /tmp/z$z.ready --go /tmp/zones.go --timeout 500 2>/tmp/z$z.peer.log &
  PEERS="$PEERS $!"
done
T0=$(uptime_s)
timeout "$RUN_TIMEOUT" $STANDIN --config /tmp/zones.json --socket /tmp/hv2.sock \
  --cmdline "$L2ARGS nested.mode=zones nested.zone={zone}" --zone 1:1,2 --zone 2:3 2>&1 &
SI=$!
i=0; while ! listening /tmp/hv2.sock && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
RUST_LOG=warn $B/hvisor-vhost hvisor --config /tmp/zones.json --hypervisor-socket /tmp/hv2.sock > /tmp/daemon2.log 2>&1 &
DAEMON=$!
# Start both zones' I/O together: release the console payloads once both guests are ready.
i=0; while { [ ! -e /tmp/z1.ready ] || [ ! -e /tmp/z2.ready ]; } && kill -0 $SI 2>/dev/null && [ $i -lt 3000 ]; do
  sleep 0.1; i=$((i + 1))
done
[ -e /tmp/z1.ready ] && [ -e /tmp/z2.ready ] && info "both zones ready after $(since "$T0") s" \
  || fail "zones not both ready (zone 1: $([ -e /tmp/z1.ready ] && echo yes || echo no), zone 2: $([ -e /tmp/z2.ready ] && echo yes || echo no))"
touch /tmp/zones.go
finish_run $SI $DAEMON "two zones"
info "two-zone run took $(since "$T0") s (L1 clock)"
for p in $PEERS; do stop_peer $p; done
for z in 1 2; do
  check_console "zone $z:" /tmp/z$z.g2h "ZONE$z-READY" $((z * 10000 + 2000)) $((z * 10000 + 2100))
  info "zone $z console peer: $(cat /tmp/z$z.peer.log | tr '\n' ' ')"
done
info "two-zone daemon log (last 15 lines):"; tail -n 15 /tmp/daemon2.log | sed 's/^/info: L1:   /'
sync
exit $F
