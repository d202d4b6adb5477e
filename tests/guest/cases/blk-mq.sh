# x86 q35 + vhost-user-blk-pci with 2 queues and 2 vCPUs, in-memory backend disk (no --image): the guest gets one
# blk-mq hardware queue per vCPU and I/O pinned to each CPU goes through its own queue (blk-mq debugfs counters).
gt_describe "x86 q35 vhost-user-blk-pci, 2 queues, -smp 2, in-memory disk: per-CPU I/O on both queues"
GT_SMP=2
gt_blk_backend blk0 --num-queues 2 --size 64M
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=2
gt_guest_script SECTORS=$((64 << 11)) <<'EOF_GUEST'
expect_eq "capacity of the in-memory disk (sectors)" "$(cat /sys/block/vda/size)" "$SECTORS"
expect_eq "online CPUs" "$(cat /sys/devices/system/cpu/online)" "0-1"
expect_eq "blk-mq hardware queues" "$(ls /sys/block/vda/mq | wc -l)" 2
for q in /sys/block/vda/mq/*; do info "hctx $(basename $q): cpus $(cat $q/cpu_list)"; done
mount -t debugfs none /sys/kernel/debug 2>/dev/null
D=/sys/kernel/debug/block/vda
runs() { cat $D/hctx$1/run 2>/dev/null || echo 0; }   # times the hardware queue was run (requests dispatched)
r0=$(runs 0); r1=$(runs 1)
for c in 0 1; do dd if=/dev/urandom of=/tmp/p$c bs=1M count=8 2>/dev/null; done
# one writer per CPU, concurrently
taskset -c 0 dd if=/tmp/p0 of=/dev/vda bs=64k seek=$((8 * 16)) oflag=direct 2>/tmp/e0 & P0=$!
taskset -c 1 dd if=/tmp/p1 of=/dev/vda bs=64k seek=$((24 * 16)) oflag=direct 2>/tmp/e1 & P1=$!
check "O_DIRECT write pinned to cpu0" wait $P0
check "O_DIRECT write pinned to cpu1" wait $P1
check "fsync" sync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "cpu1 reads back cpu0's data" "$(taskset -c 1 dd if=/dev/vda bs=1M skip=8 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" "$(sha256sum < /tmp/p0 | cut -d' ' -f1)"
expect_eq "cpu0 reads back cpu1's data" "$(taskset -c 0 dd if=/dev/vda bs=1M skip=24 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" "$(sha256sum < /tmp/p1 | cut -d' ' -f1)"
if [ -d $D/hctx1 ]; then
  n0=$(( $(runs 0) - r0 )); n1=$(( $(runs 1) - r1 ))
  info "hardware queue runs during the test: hctx0=$n0 hctx1=$n1"
  check "hardware queue 0 carried requests" [ "$n0" -gt 0 ]
  check "hardware queue 1 carried requests" [ "$n1" -gt 0 ]
else
  info "blk-mq debugfs not available; per-queue counters not checked"
fi
EOF_GUEST
gt_guest_run x86
