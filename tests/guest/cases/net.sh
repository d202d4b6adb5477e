# x86 q35 + virtio-net-pci on a vhost-user netdev served by `hvisor-vhost net`, whose TAP lives in a network namespace
# of the case's own: every packet stays between the guest and that namespace (link-local 169.254.77.0/24), and the
# host's interfaces are never touched. Two queue pairs (multi-queue TAP, 2 guest CPUs, MQ + control queue). The guest
# pings the namespace side, then moves 4 MiB of random data each way over TCP (busybox nc in the guest, Python servers
# in the namespace), the guest's ends pinned to CPU 1 and CPU 0 so that both queue pairs carry one (virtio-net maps
# transmit queue N to CPU N, the TAP answers a flow on the queue it came from); both ends compare sha256.
#
# No iperf3: the guest initramfs holds only what scripts/guest-test puts there (busybox, util-linux tools, fio), and
# under TCG a throughput figure measures the emulator rather than the device; the timed transfers below report MB/s.
gt_describe "x86 q35 virtio-net-pci over vhost-user, 2 queue pairs, TAP in a private netns: ping, 4 MiB TCP each way with sha256"
[ "$(id -u)" = 0 ] || gt_skip "needs root (network namespace and TAP)"
[ -c /dev/net/tun ] || gt_skip "/dev/net/tun is missing"
command -v ip > /dev/null || gt_skip "ip (iproute2) is missing"
PYTHON=$(command -v python3) || gt_skip "python3 is missing (it serves the transfers in the namespace)"

NS=hvv-net-$$-$RANDOM
TAP=hvvtap0              # inside the namespace: cannot clash with the host's interfaces
HOST_IP=169.254.77.1
GUEST_IP=169.254.77.2
MAC=52:54:00:77:00:02
ip netns add "$NS" || gt_die "ip netns add $NS failed"
gt_at_exit ip netns delete "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" ip tuntap add dev "$TAP" mode tap multi_queue
ip -n "$NS" addr add "$HOST_IP/24" dev "$TAP"
ip -n "$NS" link set "$TAP" up

gt_backend net0 "$W/net0.sock" ip netns exec "$NS" "$HVISOR_VHOST_BIN" net --socket-path "$W/net0.sock" \
  --tap "$TAP" --mac "$MAC" --queue-pairs 2
GT_SMP=2
gt_qemu_args -chardev "socket,id=net0,path=$W/net0.sock" -netdev vhost-user,chardev=net0,id=n0,queues=2 \
  -device "virtio-net-pci,netdev=n0,mac=$MAC,mq=on,vectors=6"

# One connection per server: `recv PORT OUT` writes "<bytes> <sha256>" of what it received to OUT; `send PORT FILE`
# sends FILE and closes. Both give up after 240 s, so a stuck guest cannot leave them behind.
cat > "$W/serve.py" <<'EOF_PY'
import hashlib, os, socket, sys
mode, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
listener = socket.create_server((sys.argv[4], port))
listener.settimeout(240)
conn, _ = listener.accept()
conn.settimeout(240)
if mode == "recv":
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    with open(path + ".tmp", "w") as out:
        out.write(f"{total} {digest.hexdigest()}\n")
    os.rename(path + ".tmp", path)
else:
    with open(path, "rb") as f:
        conn.sendall(f.read())
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # wait for the guest's close, so no unread byte turns our close into a reset
conn.close()
EOF_PY
head -c $((4 << 20)) /dev/urandom > "$W/to-guest.bin"
TO_GUEST_SHA=$(sha256sum < "$W/to-guest.bin" | cut -d' ' -f1)
ip netns exec "$NS" "$PYTHON" "$W/serve.py" recv 5001 "$W/from-guest.sum" "$HOST_IP" > "$W/recv.log" 2>&1 &
RECV_PID=$!
gt_at_exit kill "$RECV_PID"
ip netns exec "$NS" "$PYTHON" "$W/serve.py" send 5002 "$W/to-guest.bin" "$HOST_IP" > "$W/send.log" 2>&1 &
SEND_PID=$!
gt_at_exit kill "$SEND_PID"

gt_guest_script HOST_IP=$HOST_IP GUEST_IP=$GUEST_IP MAC=$MAC TO_GUEST_SHA="$TO_GUEST_SHA" <<'EOF_GUEST'
# rate LABEL BYTES T0 T1: one info line with the throughput (uptime has 10 ms resolution)
rate() { info "$(awk -v l="$1" -v b="$2" -v a="$3" -v z="$4" 'BEGIN { t = z - a; if (t <= 0) t = 0.01; printf "%s: %d bytes in %.2f s = %.2f MB/s", l, b, t, b / t / 1e6 }')"; }
expect_eq "eth0 MAC address" "$(cat /sys/class/net/eth0/address)" "$MAC"
check "address $GUEST_IP/24 on eth0" ip addr add "$GUEST_IP/24" dev eth0
check "eth0 up" ip link set eth0 up
FEATURES=$(cat /sys/class/net/eth0/device/features)
info "negotiated virtio features (bit 0 first): $FEATURES"
expect_eq "VIRTIO_NET_F_MQ (bit 22) negotiated" "$(echo "$FEATURES" | cut -c23)" 1
expect_eq "eth0 queues" "$(ls /sys/class/net/eth0/queues | tr '\n' ' ')" "rx-0 rx-1 tx-0 tx-1 "
# Pinned to CPU 0, so only the CPU-1 sender below can use TX queue 1.
taskset 1 ping -c 5 -w 30 "$HOST_IP" > /tmp/ping 2>&1
sed 's/^/info: ping: /' /tmp/ping | tail -n 3
REPLIES=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping)
expect_eq "ping replies" "$REPLIES" 5
value RTT "$(sed -n 's|.*min/avg/max = ||p' /tmp/ping)"
if [ "${REPLIES:-0}" = 0 ]; then
  fail "no connectivity to $HOST_IP: transfers not attempted"
  exit "$GT_FAILS"
fi

dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null
value FROM_GUEST_SHA "$(sha256sum < /tmp/blob | cut -d' ' -f1)"
T0=$(cut -d' ' -f1 /proc/uptime)
check "nc on CPU 1: 4 MiB guest -> host" taskset 2 nc -w 20 "$HOST_IP" 5001 < /tmp/blob
T1=$(cut -d' ' -f1 /proc/uptime)
rate "guest -> host" $((4 << 20)) "$T0" "$T1"
T0=$(cut -d' ' -f1 /proc/uptime)
# The redirection belongs to nc inside the check, or the check's own "ok:" line lands in the file.
check "nc on CPU 0: 4 MiB host -> guest" sh -c "taskset 1 nc -w 20 $HOST_IP 5002 < /dev/null > /tmp/rx"
T1=$(cut -d' ' -f1 /proc/uptime)
rate "host -> guest" $((4 << 20)) "$T0" "$T1"
expect_eq "bytes received from the host" "$(wc -c < /tmp/rx)" $((4 << 20))
expect_eq "sha256 of what the host sent" "$(sha256sum < /tmp/rx | cut -d' ' -f1)" "$TO_GUEST_SHA"
# queue_irqs NAME: interrupts of queue NAME (input.0, output.1, ...) summed over both CPUs
queue_irqs() { grep -E "virtio[0-9]+-$1\$" /proc/interrupts | awk '{ print $2 + $3 }'; }
info "queue interrupts: input.0 $(queue_irqs input.0), output.0 $(queue_irqs output.0), input.1 $(queue_irqs input.1), output.1 $(queue_irqs output.1)"
# The data sent from CPU 1 completes on TX queue 1; pair 0 carries the other transfer's ACKs. How many
# interrupts a transfer costs depends on how the completions batch (on a loaded host a few dozen, on a quiet
# one thousands), so TX queue 1 must only have been used well beyond what a stray packet would cost.
check "queue pair 1 carried the guest's data" test "$(queue_irqs output.1)" -ge 10
check "queue pair 0 carried traffic" test "$(queue_irqs input.0)" -gt 0 -a "$(queue_irqs output.0)" -gt 0
info "eth0 counters: $(cat /sys/class/net/eth0/statistics/rx_packets) rx / $(cat /sys/class/net/eth0/statistics/tx_packets) tx packets, $(cat /sys/class/net/eth0/statistics/rx_errors) rx errors"
EOF_GUEST
gt_guest_run x86 400
# finished PID: the server ended (within 10 s) and succeeded
finished() {
  local i
  for ((i = 0; i < 100; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$1" 2>/dev/null && return 1
  wait "$1"
}
# The guest reports FROM_GUEST_SHA only once it had connectivity and started the transfers.
if [ -n "$(gt_guest_value FROM_GUEST_SHA)" ]; then
  gt_check "receiving server finished (log: $(tr '\n' ' ' < "$W/recv.log"))" finished "$RECV_PID"
  gt_check "sending server finished (log: $(tr '\n' ' ' < "$W/send.log"))" finished "$SEND_PID"
  gt_eq "what the host received from the guest (bytes, sha256)" "$(cat "$W/from-guest.sum" 2>/dev/null || true)" \
    "$((4 << 20)) $(gt_guest_value FROM_GUEST_SHA)"
fi
gt_log "ping rtt min/avg/max: $(gt_guest_value RTT)"
gt_check "net0 still serving after the guest" gt_backend_alive net0
# The daemon survives a dropped frontend connection, so only its log tells that QEMU's was refused.
if grep -q 'frontend connection ended' "$W/net0.log"; then
  gt_fail "net0 ended QEMU's connection: $(grep 'frontend connection ended' "$W/net0.log" | head -n 1)"
fi
gt_backend_kill net0 TERM
gt_eq "net0 exit status after SIGTERM" "${GT_BE_STATUS[net0]}" 0
