# x86 q35 + two vhost-user-rng-pci devices: rng0 on the default source (/dev/urandom), rng1 on a host file of 8-byte
# little-endian counters (record i holds i). The guest's hwrng core must pick a virtio_rng, /dev/hwrng must return
# exactly the bytes asked for, and from rng1 the guest must read the file's records uncorrupted and in file order.
#
# What Linux guarantees about the order (drivers/char/hw_random): every byte the device returns goes to exactly one
# consumer (the core's early-randomness read at registration, the khwrngd thread, or /dev/hwrng readers), in the
# device's order. So a reader sees a subsequence of the file: strictly increasing records, possibly with gaps where
# another consumer took some. Records stay 8-byte aligned because every consumer asks for multiples of 8 bytes and
# the device fills each 64-byte driver buffer completely until end of file. The case checks that, and reports where
# the reader started and how much other consumers took.
gt_describe "x86 q35 vhost-user-rng-pci x2: hwrng from /dev/urandom (256 KiB), then from a host file of counters"
RECORDS=$((512 << 10))   # 4 MiB of counters: far more than the guest and its kernel consume
python3 -c 'import struct, sys
n = int(sys.argv[1])
sys.stdout.buffer.write(b"".join(struct.pack("<Q", i) for i in range(n)))' "$RECORDS" > "$W/counters.bin"
gt_backend rng0 "$W/rng0.sock" "$HVISOR_VHOST_BIN" rng --socket-path "$W/rng0.sock"
gt_backend rng1 "$W/rng1.sock" "$HVISOR_VHOST_BIN" rng --socket-path "$W/rng1.sock" --source "$W/counters.bin"
# Fixed PCI slots: devices are probed in slot order, so rng0 becomes virtio_rng.0 and rng1 virtio_rng.1.
gt_vhost_user_dev rng0 vhost-user-rng-pci,addr=0x5
gt_vhost_user_dev rng1 vhost-user-rng-pci,addr=0x6
gt_guest_script BYTES=$((256 << 10)) FILE_BYTES=$((64 << 10)) <<'EOF_GUEST'
HW=/sys/class/misc/hw_random
info "rng_available: $(cat $HW/rng_available); quality: $(cat $HW/rng_quality 2>/dev/null || echo n/a)"
case "$(cat $HW/rng_current)" in
  virtio_rng*) ok "rng_current is a virtio_rng ($(cat $HW/rng_current))";;
  *) fail "rng_current is '$(cat $HW/rng_current)', not a virtio_rng";;
esac
expect_eq "current hwrng is the first device (urandom source)" "$(cat $HW/rng_current)" virtio_rng.0
T0=$(cut -d' ' -f1 /proc/uptime)
head -c "$BYTES" /dev/hwrng > /tmp/urandom
T1=$(cut -d' ' -f1 /proc/uptime)
expect_eq "bytes read from /dev/hwrng (urandom source)" "$(wc -c < /tmp/urandom)" "$BYTES"
info "$(awk -v b="$BYTES" -v a="$T0" -v z="$T1" 'BEGIN { t = z - a; if (t <= 0) t = 0.01; printf "hwrng read: %d bytes in %.2f s = %.0f KiB/s", b, t, b / t / 1024 }')"
# 16 KiB of real randomness holds every byte value (a value is missing with probability about 256 * e^-64).
expect_eq "distinct byte values in the first 16 KiB" "$(head -c 16384 /tmp/urandom | od -An -v -tu1 -w1 | sort -u | wc -l)" 256

echo virtio_rng.1 > $HW/rng_current
expect_eq "rng_current switched to the file-backed device" "$(cat $HW/rng_current)" virtio_rng.1
head -c "$FILE_BYTES" /dev/hwrng > /tmp/file
expect_eq "bytes read from /dev/hwrng (file source)" "$(wc -c < /tmp/file)" "$FILE_BYTES"
# first record, records read, records out of order, gaps, records skipped in gaps, last record
set -- $(od -An -v -tu8 -w8 /tmp/file | awk '
  NR == 1 { first = $1 }
  NR > 1 && $1 <= prev { disorder++ }
  NR > 1 && $1 > prev + 1 { gaps++; skipped += $1 - prev - 1 }
  { prev = $1 }
  END { print first, NR, disorder + 0, gaps + 0, skipped + 0, prev }')
info "file source: first record $1, $2 records, last $6; other consumers took $5 records in $4 gaps"
expect_eq "records read" "$2" $((FILE_BYTES / 8))
expect_eq "records out of order or repeated" "$3" 0
if [ "$1" -lt 64 ]; then ok "reading starts near the file's beginning (record $1)"
else fail "reading starts at record $1: the device skipped the file's beginning"; fi
# What the kernel's consumers took is bounded: early randomness, khwrngd until the CRNG is seeded, a 64-byte buffer.
if [ "$5" -lt 1024 ]; then ok "records taken by other consumers while reading: $5"
else fail "$5 records vanished while reading (more than the kernel's consumers take)"; fi
value FIRST "$1"
value LAST "$6"
EOF_GUEST
gt_guest_run x86 300
gt_check "rng0 still serving after the guest" gt_backend_alive rng0
gt_check "rng1 still serving after the guest" gt_backend_alive rng1
gt_backend_kill rng0 TERM
gt_backend_kill rng1 TERM
gt_eq "rng0 exit status after SIGTERM" "${GT_BE_STATUS[rng0]}" 0
gt_eq "rng1 exit status after SIGTERM" "${GT_BE_STATUS[rng1]}" 0
