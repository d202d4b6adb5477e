# Runs inside L1 (arm64 Linux with KVM, under QEMU TCG): plays the root zone. Starts the
# stand-in (hvisor's role) and the daemon, lets the L2 guest run its checks, then checks what
# only L1 can see. Binaries and the L2 kernel/initramfs are in /usr/bin.
B=/usr/bin
F=0
ok() { echo "ok: L1: $*"; }
fail() { echo "FAIL: L1: $*"; F=$((F + 1)); }
cd /tmp
[ -c /dev/kvm ] && ok "/dev/kvm present" || { fail "no /dev/kvm in L1 (is QEMU run with virtualization=on?)"; exit 1; }
[ -b /dev/vda ] || { fail "no /dev/vda in L1 (the host's image)"; exit 1; }

$B/hvisor-standin mktap tap0 && ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up \
  || fail "cannot set up tap0"
mkdir -p /srv && head -c 1048576 /dev/urandom > /srv/blob
NETSHA=$(sha256sum /srv/blob | cut -c1-64)
httpd -p 8080 -h /srv
seq 1 800 > /tmp/h2g.txt

cat > /tmp/virtio_cfg.json <<'JSON'
{ "zones": [ { "id": 1,
  "memory_region": [ { "zone0_ipa": "0x50000000", "zonex_ipa": "0x40000000", "size": "0x20000000" } ],
  "devices": [
    { "type": "blk", "addr": "0xa000000", "len": "0x200", "irq": 48, "img": "/dev/vda", "status": "enable" },
    { "type": "console", "addr": "0xa000200", "len": "0x200", "irq": 49, "socket": "/tmp/con.sock", "status": "enable" },
    { "type": "rng", "addr": "0xa000400", "len": "0x200", "irq": 50, "status": "enable" },
    { "type": "net", "addr": "0xa000600", "len": "0x200", "irq": 51, "tap": "tap0",
      "mac": ["0x02", "0x16", "0x3e", "0x10", "0x20", "0x30"], "status": "enable" } ] } ] }
JSON

$B/hvisor-standin console-peer --socket /tmp/con.sock --marker CONSOLE-READY --send /tmp/h2g.txt \
  --out /tmp/g2h.bin --timeout 400 2>/tmp/peer.log &
PEER=$!
Q=quiet; grep -q "nested.l2verbose=1" /proc/cmdline && Q="loglevel=7"
CMDLINE="earlycon=uart8250,mmio,0x9000000 keep_bootcon printk.devkmsg=on panic=-1 $Q rdinit=/init nested.mode=full nested.netsha=$NETSHA"
T0=$(cut -d' ' -f1 /proc/uptime)
$B/hvisor-standin run --config /tmp/virtio_cfg.json --socket /tmp/hv.sock --kernel $B/Image \
  --initrd $B/l2.cpio.gz --cmdline "$CMDLINE" 2>&1 &
SI=$!
# The stand-in listens first; the daemon connects like to any hypervisor socket.
i=0; while [ ! -S /tmp/hv.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
RUST_LOG=warn $B/hvisor-vhost hvisor --config /tmp/virtio_cfg.json --hypervisor-socket /tmp/hv.sock > /tmp/daemon.log 2>&1 &
DAEMON=$!
wait $SI; SRC=$?
echo "info: L1: L2 run took $(awk -v a="$T0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.1f", b-a}') s (L1 clock)"
[ $SRC = 0 ] && ok "stand-in exited 0 (guest powered off)" || fail "stand-in exited with status $SRC"
i=0; while kill -0 $DAEMON 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $DAEMON 2>/dev/null; then fail "daemon still running 10 s after the hypervisor socket closed"; kill $DAEMON; fi
wait $DAEMON; DRC=$?
[ $DRC = 0 ] && ok "daemon exited 0 after the hypervisor closed" || fail "daemon exited with status $DRC"
i=0; while kill -0 $PEER 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
kill $PEER 2>/dev/null

printf 'CONSOLE-READY\n' > /tmp/g2h.expected; seq 2000 2600 >> /tmp/g2h.expected
if cmp -s /tmp/g2h.bin /tmp/g2h.expected; then ok "console guest->host: $(wc -c < /tmp/g2h.bin) bytes exact"
else fail "console guest->host: got $(wc -c < /tmp/g2h.bin 2>/dev/null) bytes, expected $(wc -c < /tmp/g2h.expected) ($(head -c 80 /tmp/g2h.bin | od -c | head -3 | tr '\n' ' '))"; fi
sync
echo "info: L1: daemon log (last 15 lines):"; tail -n 15 /tmp/daemon.log | sed 's/^/info: L1:   /'
echo "info: L1: console peer: $(cat /tmp/peer.log | tr '\n' ' ')"
exit $F
