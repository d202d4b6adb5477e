# aarch64 `virt` (TCG, cortex-a57) + vhost-user-blk on virtio-mmio (modern, force-legacy=false): pattern
# write/readback in the guest and in the host image.
gt_describe "aarch64 virt vhost-user-blk on virtio-mmio: size/serial, 8 MiB pattern write -> readback -> host image"
command -v qemu-system-aarch64 >/dev/null || gt_skip "qemu-system-aarch64 not installed"
SERIAL=hvisor-arm-0001
gt_mkimage "$W/disk.img" 64M 16
H16=$(gt_sha_range "$W/disk.img" 0 16)
# QEMU's virtio-mmio transport makes the Linux driver use 1024-entry rings; the backend's
# default maximum (256, enough for vhost-user-blk-pci) would refuse them.
gt_blk_backend blk0 --image "$W/disk.img" --serial "$SERIAL" --queue-size 1024
gt_vhost_user_dev blk0 vhost-user-blk
gt_guest_script SECTORS=$((64 << 11)) SERIAL="$GT_BLK_SERIAL" H16="$H16" <<'EOF_GUEST'
info "vda is $(readlink -f /sys/block/vda/device)"
check "vda sits on virtio-mmio" sh -c 'readlink -f /sys/block/vda/device | grep -q virtio_mmio'
expect_eq "capacity in 512-byte sectors" "$(cat /sys/block/vda/size)" "$SECTORS"
expect_eq "read-only flag" "$(cat /sys/block/vda/ro)" 0
if [ -n "$SERIAL" ]; then expect_eq "serial" "$(cat /sys/block/vda/serial)" "$SERIAL"; fi
expect_eq "first 16 MiB equal the host image" "$(range_sha /dev/vda 0 16)" "$H16"
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
PAT=$(sha256sum < /tmp/pat | cut -d' ' -f1); value PAT "$PAT"
check "dd 8 MiB pattern at 32 MiB with conv=fsync" dd if=/tmp/pat of=/dev/vda bs=1M seek=32 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "pattern reads back after drop_caches" "$(range_sha /dev/vda 32 8)" "$PAT"
EOF_GUEST
gt_guest_run arm64
gt_backend_kill blk0 TERM
gt_eq "host image holds the guest's pattern at 32 MiB" "$(gt_sha_range "$W/disk.img" 32 8)" "$(gt_guest_value PAT)"
