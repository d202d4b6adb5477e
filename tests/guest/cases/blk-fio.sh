# x86 q35 + two vhost-user-blk-pci disks under fio (Debian's fio + its library closure in a large, cached, uncompressed
# initramfs): vda's image goes through the host page cache, vdb's is opened O_DIRECT (--direct), so both data paths of
# the backend see real guest I/O.
#  1. mixed random read/write, 4k, QD16, libaio, O_DIRECT, 10 s time-based, crc32c verification with verify_backlog
#     (fio re-reads and checks every written block in batches while the job runs, not only at the end)
#  2. random writes over 64 MiB then a full crc32c verify pass; we check fio issued one verify read per write, which
#     proves the verify phase really ran.
#  3. on vdb (O_DIRECT on the host): 1 and 2 again, shorter.
gt_describe "x86 q35 vhost-user-blk-pci: fio randrw 4k QD16 libaio + crc32c verify, page-cached and O_DIRECT images"
gt_mkimage "$W/disk.img" 256M
gt_blk_backend blk0 --image "$W/disk.img"
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1
gt_mkimage "$W/direct.img" 128M
gt_blk_backend blk1 --image "$W/direct.img" --direct
gt_vhost_user_dev blk1 vhost-user-blk-pci,num-queues=1
gt_guest_initrd fio
gt_guest_script <<'EOF_GUEST'
COMMON="--ioengine=libaio --direct=1 --bs=4k --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1"
# run_fio NAME DISK ARGS...: prints fio's IOPS/error lines, returns fio's exit status; full output in /tmp/NAME.out
run_fio() {
  _n=$1; _dev=$2; shift 2
  fio --name="$_n" --filename="/dev/$_dev" $COMMON "$@" > /tmp/$_n.out 2>&1; _st=$?
  grep -E '^ +(read|write): IOPS' /tmp/$_n.out | sed "s/^ */info: fio $_n: /"
  grep -E 'verify: |bad (magic|header|checksum)|err= *[1-9]|[Ee]rror' /tmp/$_n.out | sed "s/^/info: fio $_n: /"
  return $_st
}
# fio_issued NAME: "reads writes" from fio's "issued rwts: total=R,W,T,X" line
fio_issued() { sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/\1 \2/p' /tmp/$1.out | head -n 1; }

expect_eq "vdb has the O_DIRECT image's size" "$(cat /sys/block/vdb/size)" 262144

# fio_checks PREFIX DISK SECONDS: the randrw/verify_backlog job and the write + full verify pass on DISK
fio_checks() {
  _p=$1 _disk=$2 _secs=$3
  check "$_p fio randrw ${_secs}s with verify_backlog: exit 0, no verify errors" \
    run_fio $_p-randrw $_disk --rw=randrw --size=64M --runtime=$_secs --time_based --verify_backlog=1024
  set -- $(fio_issued $_p-randrw); info "$_p fio randrw: issued reads=$1 writes=$2"
  check "$_p fio randwrite 32 MiB + verify pass: exit 0, no verify errors" \
    run_fio $_p-write-verify $_disk --rw=randwrite --size=32M --offset=64M
  set -- $(fio_issued $_p-write-verify)
  expect_eq "$_p fio write-verify: verify reads == writes" "${1:-none}" "${2:-none}"
}
fio_checks cached vda 10
fio_checks direct vdb 5
EOF_GUEST
gt_guest_run x86
