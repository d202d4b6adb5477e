# x86 q35 + vhost-user-blk-pci: geometry, flags and serial as the backend configured them; a random pattern written by
# the guest reads back after dropping caches and lands in the host image at the same offset.
gt_describe "x86 q35 vhost-user-blk-pci: size/ro/serial, 8 MiB pattern write -> readback -> host image"
SERIAL=hvisor-blk-0001
gt_mkimage "$W/disk.img" 128M 16
H16=$(gt_sha_range "$W/disk.img" 0 16)
gt_blk_backend blk0 --image "$W/disk.img" --serial "$SERIAL"
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1
gt_guest_script SECTORS=$((128 << 11)) SERIAL="$GT_BLK_SERIAL" H16="$H16" <<'EOF_GUEST'
expect_eq "capacity in 512-byte sectors" "$(cat /sys/block/vda/size)" "$SECTORS"
expect_eq "read-only flag" "$(cat /sys/block/vda/ro)" 0
if [ -n "$SERIAL" ]; then expect_eq "serial" "$(cat /sys/block/vda/serial)" "$SERIAL"; fi
info "write cache: $(cat /sys/block/vda/queue/write_cache), logical block: $(cat /sys/block/vda/queue/logical_block_size)"
expect_eq "first 16 MiB equal the host image" "$(range_sha /dev/vda 0 16)" "$H16"
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
PAT=$(sha256sum < /tmp/pat | cut -d' ' -f1)
value PAT "$PAT"
check "dd 8 MiB pattern at 32 MiB with conv=fsync" dd if=/tmp/pat of=/dev/vda bs=1M seek=32 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "pattern reads back after drop_caches" "$(range_sha /dev/vda 32 8)" "$PAT"
EOF_GUEST
gt_guest_run x86
gt_backend_kill blk0 TERM
gt_eq "host image holds the guest's pattern at 32 MiB" "$(gt_sha_range "$W/disk.img" 32 8)" "$(gt_guest_value PAT)"
gt_eq "host image: first 16 MiB unchanged" "$(gt_sha_range "$W/disk.img" 0 16)" "$H16"
