# The L2 guest's checks when two zones share one bridge and one daemon (nested.mode=zones,
# nested.zone=ID). Exit status = number of failures. Run with `io-worker CPU` it is one I/O
# worker, started pinned to that CPU.
. /l2-lib.sh
Z=$(arg zone)
DISK=/dev/vda
BLOCK=262144                # bytes per write
BLOCKS=32                   # blocks per worker: worker c owns blocks [c*32, c*32+32) of the disk
IO_CS=3000                  # 30 s of I/O

# One CPU's share of the I/O: round r writes block r%32 of its region with O_DIRECT, filled with
# the line "hvisor-zone<Z>-cpu<c>-round<r>" (the host regenerates the whole image from the round
# counts), reads it back with O_DIRECT and compares; every round also reads the Status register
# of every device from this CPU (synchronous requests through this CPU's cfg_values entry).
# No round may take over 10 s (three vCPUs share L1's two CPUs and a busy host: rounds take
# 1 to 4 s; a lost interrupt would be a stall).
io_worker() {
  c=$1; TAG=hvisor-zone$Z-cpu$c
  END=$(( $(now_cs) + IO_CS )); R=0; BAD=0; MAXGAP=0; LAST=$(now_cs); SREADS=0; SBAD=0
  while [ "$(now_cs)" -lt "$END" ]; do
    B=$(( c * BLOCKS + R % BLOCKS ))
    yes "$TAG-round$R" | head -c $BLOCK > /tmp/w$c
    dd if=/tmp/w$c of=$DISK bs=$BLOCK seek=$B oflag=direct 2>/dev/null || BAD=$((BAD + 1))
    dd if=$DISK bs=$BLOCK count=1 skip=$B iflag=direct 2>/dev/null | cmp -s - /tmp/w$c || BAD=$((BAD + 1))
    for pass in 1 2 3 4 5; do
      for s in /sys/bus/virtio/devices/virtio*/status; do
        read v < $s
        SREADS=$((SREADS + 1)); [ "$v" = 0x0000000f ] || SBAD=$((SBAD + 1))
      done
    done
    T=$(now_cs); GAP=$((T - LAST)); LAST=$T; [ $GAP -gt $MAXGAP ] && MAXGAP=$GAP
    R=$((R + 1))
  done
  echo "rounds=$R bad=$BAD maxgap_cs=$MAXGAP status_reads=$SREADS status_bad=$SBAD cpu_now=$(awk '{print $39}' /proc/self/stat)" > /tmp/worker$c
}
if [ "$1" = io-worker ]; then io_worker "$2"; exit 0; fi

NCPU=$(nproc)
info "zone $Z: $NCPU CPUs, devices: $(ls /sys/bus/virtio/devices | tr '\n' ' ')"
value CPUS "$NCPU"
[ -b $DISK ] || { fail "no $DISK"; exit $F; }

# (1) console, host->guest. L1 holds the payload back until every zone has sent its marker, so
# it is also the start signal: the zones' I/O phases begin together.
[ -c /dev/hvc0 ] || { fail "no /dev/hvc0"; exit $F; }
exec 3<>/dev/hvc0
stty -F /dev/hvc0 raw -echo
seq $((Z * 10000 + 1)) $((Z * 10000 + 800)) > /tmp/h2g.expected
N=$(wc -c < /tmp/h2g.expected)
head -c "$N" /dev/hvc0 > /tmp/h2g.got & RD=$!
printf 'ZONE%s-READY\n' "$Z" > /dev/hvc0
i=0; while kill -0 $RD 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
kill $RD 2>/dev/null
cmp -s /tmp/h2g.got /tmp/h2g.expected && ok "console host->guest: $N bytes exact" \
  || fail "console host->guest: got $(wc -c < /tmp/h2g.got) bytes, differing from the expected $N"

# (2) 30 s of I/O on every CPU at once, each worker pinned to its CPU.
say "IO-START"
for c in $(seq 0 $((NCPU - 1))); do taskset -c "$c" sh /l2-zones.sh io-worker "$c" & done
wait
say "IO-END"
for c in $(seq 0 $((NCPU - 1))); do
  W=$(cat /tmp/worker$c 2>/dev/null); value "WORKER$c" "$W"
  set -- $(echo "$W" | tr '=' ' ')   # rounds R bad B maxgap_cs G status_reads S status_bad SB cpu_now C
  if [ "${2:-0}" -ge 10 ] && [ "$4" = 0 ] && [ "${6:-9999}" -le 1000 ] && [ "${12}" = "$c" ]; then
    ok "cpu $c I/O: $2 write+verify rounds, longest $6 cs, no mismatch, ran on CPU $c"
  else
    fail "cpu $c I/O: $W"
  fi
  if [ "${8:-0}" -gt 0 ] && [ "${10}" = 0 ]; then ok "cpu $c status reads: $8, all 0x0000000f"
  else fail "cpu $c status reads: $8 with ${10} wrong values"; fi
done

# (3) interrupts: every virtio interrupt of the zone arrives at its first CPU (CPU0), where
# Linux routes SPIs and hvisor injects.
COUNTS=$(awk -v n="$NCPU" '/virtio/ { for (i = 2; i <= n + 1; i++) s[i - 2] += $i }
  END { for (i = 0; i < n; i++) printf "%s%d", (i ? " " : ""), s[i] }' /proc/interrupts)
value IRQS_PER_CPU "$COUNTS"
set -- $COUNTS
FIRST=$1; shift; OTHERS=0; for n in "$@"; do OTHERS=$((OTHERS + n)); done
[ "$FIRST" -gt 0 ] && [ "$OTHERS" = 0 ] && ok "virtio interrupts: $FIRST on CPU0, none elsewhere" \
  || fail "virtio interrupts per CPU: $COUNTS"

# (4) console, guest->host (compared in L1; short: each 16-byte chunk is a round trip the vCPU
# spins for), and rng.
seq $((Z * 10000 + 2000)) $((Z * 10000 + 2100)) > /dev/hvc0
ok "console guest->host: sent $(seq $((Z * 10000 + 2000)) $((Z * 10000 + 2100)) | wc -c) bytes (checked in L1)"
exec 3>&-
RC=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
R=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | hexdump -v -e '1/1 "%02x"')
case "$RC" in virtio_rng*) [ ${#R} = 128 ] && [ "$R" != "$(printf '%0128d' 0)" ] ;; *) false ;; esac \
  && ok "rng: 64 bytes from $RC" || fail "rng: rng_current '$RC', read '$R'"
exit $F
