# x86 q35 + vhost-user-blk-pci with a read-only backend: the guest sees ro=1, writes fail (also after
# `blockdev --setrw`, and a discard), the data is unchanged in the guest and in the host image.
gt_describe "x86 q35 vhost-user-blk-pci, backend --readonly: ro=1, writes rejected, image unchanged"
gt_mkimage "$W/disk.img" 64M 16
H16=$(gt_sha_range "$W/disk.img" 0 16)
HALL=$(sha256sum < "$W/disk.img" | cut -d' ' -f1)
gt_blk_backend blk0 --image "$W/disk.img" --readonly
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1
gt_guest_script SECTORS=$((64 << 11)) H16="$H16" <<'EOF_GUEST'
expect_eq "read-only flag" "$(cat /sys/block/vda/ro)" 1
expect_eq "capacity in 512-byte sectors" "$(cat /sys/block/vda/size)" "$SECTORS"
expect_eq "first 16 MiB readable and equal to the host image" "$(range_sha /dev/vda 0 16)" "$H16"
dd if=/dev/urandom of=/tmp/pat bs=1M count=1 2>/dev/null
if dd if=/tmp/pat of=/dev/vda bs=1M count=1 oflag=direct 2>/tmp/err; then fail "O_DIRECT write to a read-only disk succeeded"
else ok "O_DIRECT write rejected: $(head -n 1 /tmp/err)"; fi
/usr/bin/blockdev --setrw /dev/vda 2>/dev/null; info "after blockdev --setrw: ro=$(cat /sys/block/vda/ro)"
if dd if=/tmp/pat of=/dev/vda bs=1M count=1 oflag=direct 2>/tmp/err; then fail "O_DIRECT write after --setrw succeeded"
else ok "O_DIRECT write after --setrw rejected: $(head -n 1 /tmp/err)"; fi
if dd if=/tmp/pat of=/dev/vda bs=1M seek=2 count=1 conv=fsync 2>/tmp/err; then fail "buffered write + fsync succeeded"
else ok "buffered write + fsync rejected: $(head -n 1 /tmp/err)"; fi
if /usr/bin/blkdiscard -o 0 -l $((1 << 20)) /dev/vda 2>/tmp/err; then info "blkdiscard returned success (checking data below)"
else ok "blkdiscard rejected: $(tail -n 1 /tmp/err)"; fi
echo 3 > /proc/sys/vm/drop_caches
expect_eq "first 16 MiB unchanged after the write attempts" "$(range_sha /dev/vda 0 16)" "$H16"
dmesg | grep -iE 'vda|read-only|I/O error' | tail -n 5 | sed 's/^/info: dmesg: /'
EOF_GUEST
gt_guest_run x86
gt_backend_kill blk0 TERM
gt_eq "host image unchanged" "$(sha256sum < "$W/disk.img" | cut -d' ' -f1)" "$HALL"
