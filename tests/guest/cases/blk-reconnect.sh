# Backend crash + restart under a live guest: the guest writes a pattern and goes idle; the host SIGKILLs the backend
# and starts it again on the same socket path; QEMU (chardev reconnect-ms) reconnects, and the guest's next I/O works and
# sees the earlier data.
gt_describe "x86 q35 vhost-user-blk-pci: SIGKILL backend while the guest idles, restart, guest I/O resumes"
gt_mkimage "$W/disk.img" 64M
gt_blk_backend blk0 --image "$W/disk.img"
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1 reconnect
gt_guest_script <<'EOF_GUEST'
dd if=/dev/urandom of=/tmp/a bs=1M count=8 2>/dev/null; A=$(sha256sum < /tmp/a | cut -d' ' -f1); value A "$A"
check "write pattern A at 8 MiB (conv=fsync)" dd if=/tmp/a of=/dev/vda bs=1M seek=8 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "pattern A reads back before the restart" "$(range_sha /dev/vda 8 8)" "$A"
mark idle
wait_host backend-restarted
info "host restarted the backend; resuming I/O"
echo 3 > /proc/sys/vm/drop_caches
expect_eq "pattern A reads back after the restart" "$(range_sha /dev/vda 8 8)" "$A"
dd if=/dev/urandom of=/tmp/b bs=1M count=8 2>/dev/null; B=$(sha256sum < /tmp/b | cut -d' ' -f1); value B "$B"
check "write pattern B at 24 MiB after the restart (conv=fsync)" dd if=/tmp/b of=/dev/vda bs=1M seek=24 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "pattern B reads back" "$(range_sha /dev/vda 24 8)" "$B"
EOF_GUEST
gt_guest_start x86
gt_wait_mark idle 180
gt_backend_kill blk0 KILL
gt_ok "backend SIGKILLed (status ${GT_BE_STATUS[blk0]})"
sleep 1                      # let QEMU see the hang-up before the new backend appears
gt_backend_restart blk0
gt_ok "backend restarted on the same socket path"
gt_send backend-restarted
gt_guest_wait
gt_backend_kill blk0 TERM
gt_eq "host image holds pattern A" "$(gt_sha_range "$W/disk.img" 8 8)" "$(gt_guest_value A)"
gt_eq "host image holds pattern B" "$(gt_sha_range "$W/disk.img" 24 8)" "$(gt_guest_value B)"
