# Backend crash under load: fio keeps requests in flight on a 2-queue disk (one job per vCPU, libaio, O_DIRECT, mixed
# 4k/64k/256k requests submitted 16 at a time, queue depth 32; the host image is opened O_DIRECT too, so requests go
# through io_uring and complete out of order) while the host SIGKILLs the backend 10 times, each at a random moment
# 0.3-2 s after QEMU (chardev reconnect-ms) has reconnected to the restarted backend, and with our backend then at the
# first instant it holds requests in flight, read from its inflight region while the backend is stopped (SIGSTOP), so
# that they cannot be answered before the kill. The TCG guest issues requests slower than the host completes them:
# without the wait most kills would find none, and read on the fly only 0-2 kills in 10 caught any. fio checks every
# block it writes (crc32c, verify_backlog: read back and compared while the job runs) and stops at the first error.
# Passes when fio exits 0 with no verify error, the guest kernel logs no I/O error and no broken ring ("id N is not a
# head": a request answered twice), all 10 kills hit a connected backend while fio ran, and (our backend) at least
# half of the restarts resubmitted requests the killed one had left in flight. A guest whose ring broke fails the case
# at once.
gt_describe "x86 q35 vhost-user-blk-pci, 2 queues: 10 SIGKILLs of the backend during fio randrw + crc32c verify"
KILLS=${GT_KILLS:-10}
RUNTIME=${GT_KILL_RUNTIME:-36}   # seconds of fio; a kill and its reconnection take about 2.3 s
GT_SMP=2
GT_GUEST_TIMEOUT=$((RUNTIME + 120))
# Written in full first: random O_DIRECT writes into a sparse file fragment it, and deleting it then takes seconds.
gt_mkimage "$W/disk.img" 128M 128
gt_blk_backend blk0 --image "$W/disk.img" --direct --num-queues 2
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=2 reconnect
gt_guest_initrd fio
gt_guest_script RUNTIME="$RUNTIME" <<'EOF_GUEST'
# Each job on its own 64 MiB, so that one job's verification never reads the other's blocks.
fio --name=kill --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randrw --bssplit=4k/60:64k/30:256k/10 \
  --iodepth=32 --iodepth_batch_submit=16 --numjobs=2 --cpus_allowed_policy=split --cpus_allowed=0-1 \
  --size=64M --offset_increment=64M --time_based --runtime="$RUNTIME" \
  --verify=crc32c --do_verify=1 --verify_backlog=512 --verify_fatal=1 --group_reporting > /tmp/fio.out 2>&1 &
FIO=$!
mark fio-running
wait $FIO; ST=$?
mark fio-done
grep -E '^ +(read|write): IOPS' /tmp/fio.out | sed 's/^ */info: fio: /'
grep -E 'verify: |bad (magic|header|checksum)|err= *[1-9]|[Ee]rror' /tmp/fio.out | sed 's/^/info: fio: /'
value ISSUED "$(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/reads=\1 writes=\2/p' /tmp/fio.out | head -n 1)"
expect_eq "fio exit status (randrw + crc32c verify_backlog under backend kills)" "$ST" 0
check "fio reports no error" sh -c "! grep -qE 'err= *[1-9]|verify: bad|bad (magic|header|checksum)' /tmp/fio.out"
check "guest kernel logged no I/O error or broken ring" sh -c "! dmesg | grep -qE 'I/O error|not a head|broken|blk_update_request'"
EOF_GUEST

# The guest kernel prints these on the console; after them its I/O can only fail or hang.
guest_broke() { grep -m 1 -E 'is not a head|I/O error' "$W/serial.log"; }
fio_done() { grep -q '^HARNESS-MARK: fio-done$' "$W/serial.log"; }
# The inflight region our backend maps, and the heads marked in it. Layout of the vhost-user specification: per queue
# a 16-byte header (desc_num in bytes 10-11), then 16-byte entries whose first byte is the mark, 64-byte aligned.
inflight_region() { find "/proc/${GT_BE_PID[blk0]}/fd" -lname '/memfd:hvisor-vhost-inflight*' 2>/dev/null | head -n 1; }
marked_in_flight() {
  od -An -v -tu1 -w16 "$1" 2>/dev/null | awk '
    left == 0 { desc = $11 + 256 * $12; left = int((16 + 16 * desc + 63) / 64) * 4; entry = 0 }
    { left--; if (entry > 0 && entry <= desc && $1 != 0) n++; entry++ }
    END { print n + 0 }'
}

gt_guest_start x86
gt_wait_mark fio-running 180
T0=$(date +%s.%N)
hits=0
for ((round = 1; round <= KILLS; round++)); do
  gt_backend_wait_connected blk0 30 || break
  sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.3 + 1.7 * r / 32767 }')"
  if broke=$(guest_broke); then gt_die "after $hits kill(s), the guest kernel logged: $broke"; fi
  fio_done && break
  if [ "${BACKEND:-hvisor}" != qsd ] && region=$(inflight_region) && [ -n "$region" ]; then
    # Looked at while the backend is stopped, so that what is marked stays in flight until the kill (the kernel may
    # still complete the I/O, but only the backend can answer it).
    pid=${GT_BE_PID[blk0]}
    for ((poll = 0; poll < 500; poll++)); do
      kill -STOP "$pid" 2>/dev/null || break
      [ "$(marked_in_flight "$region")" -gt 0 ] && break
      kill -CONT "$pid" 2>/dev/null
    done
  fi
  gt_backend_kill blk0 KILL
  hits=$((hits + 1))
  gt_backend_restart blk0
done
gt_log "$hits kill(s) in $(gt_elapsed "$T0") s"
gt_eq "backend SIGKILLs while fio ran" "$hits" "$KILLS"
while kill -0 "$GT_QEMU_PID" 2>/dev/null && ! fio_done; do
  if broke=$(guest_broke); then gt_die "after $hits kill(s), the guest kernel logged: $broke"; fi
  sleep 0.5
done
gt_guest_wait
gt_log "fio issued: $(gt_guest_value ISSUED)"
gt_backend_kill blk0 TERM
if [ "${BACKEND:-hvisor}" != qsd ]; then
  # Starts of the backend (log segments) after which it resubmitted requests left in flight: requests seen in flight
  # may still complete before the kill lands.
  caught=$(awk '/^### / && !/exited with status/ { start++ } /resubmitting/ && !(start in seen) { seen[start] = 1; n++ }
    END { print n + 0 }' "$W/blk0.log")
  gt_log "$caught of $hits restart(s) resubmitted requests the killed backend left in flight"
  gt_check "at least half of the kills caught requests in flight" [ "$caught" -ge $(((hits + 1) / 2)) ]
fi
