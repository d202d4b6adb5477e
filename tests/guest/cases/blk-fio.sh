# x86 q35 + vhost-user-blk-pci under fio (Debian's fio + its library closure in a large, cached, uncompressed initramfs).
#  1. mixed random read/write, 4k, QD16, libaio, O_DIRECT, 10 s time-based, crc32c verification with verify_backlog
#     (fio re-reads and checks every written block in batches while the job runs, not only at the end)
#  2. random writes over 64 MiB then a full crc32c verify pass; we check fio issued one verify read per write, which
#     proves the verify phase really ran.
gt_describe "x86 q35 vhost-user-blk-pci: fio randrw 4k QD16 libaio 10s + crc32c verify (backlog and full pass)"
gt_mkimage "$W/disk.img" 256M
gt_blk_backend blk0 --image "$W/disk.img"
gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1
gt_guest_initrd fio
gt_guest_script <<'EOF_GUEST'
COMMON="--filename=/dev/vda --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1"
# run_fio NAME ARGS...: prints fio's IOPS/error lines, returns fio's exit status; full output in /tmp/NAME.out
run_fio() {
  _n=$1; shift
  fio --name="$_n" $COMMON "$@" > /tmp/$_n.out 2>&1; _st=$?
  grep -E '^ +(read|write): IOPS' /tmp/$_n.out | sed "s/^ */info: fio $_n: /"
  grep -E 'verify: |bad (magic|header|checksum)|err= *[1-9]|[Ee]rror' /tmp/$_n.out | sed "s/^/info: fio $_n: /"
  return $_st
}
# fio_issued NAME: "reads writes" from fio's "issued rwts: total=R,W,T,X" line
fio_issued() { sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/\1 \2/p' /tmp/$1.out | head -n 1; }

check "fio randrw 10s with verify_backlog: exit 0, no verify errors" \
  run_fio randrw --rw=randrw --size=128M --runtime=10 --time_based --verify_backlog=1024
set -- $(fio_issued randrw); info "fio randrw: issued reads=$1 writes=$2"

check "fio randwrite 64 MiB + verify pass: exit 0, no verify errors" \
  run_fio write-verify --rw=randwrite --size=64M --offset=128M
set -- $(fio_issued write-verify)
expect_eq "fio write-verify: verify reads == writes" "${1:-none}" "${2:-none}"
EOF_GUEST
gt_guest_run x86
