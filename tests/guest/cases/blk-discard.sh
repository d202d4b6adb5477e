# x86 q35 + vhost-user-blk-pci: DISCARD (blkdiscard) and WRITE_ZEROES (blkdiscard -z = BLKZEROOUT) read back as zeroes in
# the guest and in the host image; the data around the ranges is untouched. util-linux's blkdiscard is in the x86 base
# initramfs (busybox's lacks -z).
gt_describe "x86 q35 vhost-user-blk-pci: discard + write-zeroes ranges read back as zeroes (guest and host)"
gt_mkimage "$W/disk.img" 128M 64
H0=$(gt_sha_range "$W/disk.img" 0 16)
H24=$(gt_sha_range "$W/disk.img" 24 16)
H48=$(gt_sha_range "$W/disk.img" 48 16)
gt_blk_backend blk0 --image "$W/disk.img"
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1
gt_guest_script H0="$H0" H24="$H24" H48="$H48" <<'EOF_GUEST'
Q=/sys/block/vda/queue
info "discard_max_bytes=$(cat $Q/discard_max_bytes) discard_granularity=$(cat $Q/discard_granularity) write_zeroes_max_bytes=$(cat $Q/write_zeroes_max_bytes)"
check "device advertises discard (discard_max_bytes > 0)" [ "$(cat $Q/discard_max_bytes)" -gt 0 ]
check "device advertises write-zeroes (write_zeroes_max_bytes > 0)" [ "$(cat $Q/write_zeroes_max_bytes)" -gt 0 ]
check "blkdiscard 16..24 MiB" /usr/bin/blkdiscard -o $((16 << 20)) -l $((8 << 20)) /dev/vda
check "blkdiscard -z (write zeroes) 40..48 MiB" /usr/bin/blkdiscard -z -o $((40 << 20)) -l $((8 << 20)) /dev/vda
echo 3 > /proc/sys/vm/drop_caches
check "discarded range reads back as zeroes" is_zero /dev/vda 16 8
check "write-zeroes range reads back as zeroes" is_zero /dev/vda 40 8
expect_eq "0..16 MiB untouched" "$(range_sha /dev/vda 0 16)" "$H0"
expect_eq "24..40 MiB untouched" "$(range_sha /dev/vda 24 16)" "$H24"
expect_eq "48..64 MiB untouched" "$(range_sha /dev/vda 48 16)" "$H48"
EOF_GUEST
gt_guest_run x86
gt_backend_kill blk0 TERM
Z8=$(head -c 8M /dev/zero | sha256sum | cut -d' ' -f1)
gt_eq "host image: discarded range is zero" "$(gt_sha_range "$W/disk.img" 16 8)" "$Z8"
gt_eq "host image: write-zeroes range is zero" "$(gt_sha_range "$W/disk.img" 40 8)" "$Z8"
gt_eq "host image: 0..16 MiB untouched" "$(gt_sha_range "$W/disk.img" 0 16)" "$H0"
gt_eq "host image: 24..40 MiB untouched" "$(gt_sha_range "$W/disk.img" 24 16)" "$H24"
gt_eq "host image: 48..64 MiB untouched" "$(gt_sha_range "$W/disk.img" 48 16)" "$H48"
