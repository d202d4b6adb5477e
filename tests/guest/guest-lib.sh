# Guest-side helpers, prepended to every case's /test.sh (busybox sh in the guest initramfs).
# The script's exit status is the number of failed checks (GT_FAILS); init prints it as "HARNESS-RESULT: rc=N".
GT_FAILS=0
ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; GT_FAILS=$((GT_FAILS + 1)); }
info() { echo "info: $*"; }
check() { _d=$1; shift; if "$@"; then ok "$_d"; else fail "$_d (command failed: $*)"; fi; }
expect_eq() { if [ "$2" = "$3" ]; then ok "$1 ($2)"; else fail "$1: got '$2', expected '$3'"; fi; }
mark() { echo "HARNESS-MARK: $1"; }
value() { echo "HARNESS-VALUE: $1=$2"; }
# wait_host TEXT: read console lines until one contains TEXT (the host sends it with gt_send)
wait_host() {
  while read -r _l; do case "$_l" in *"$1"*) return 0;; esac; done
  fail "console closed while waiting for '$1'"; return 1
}
# range_sha DEV OFF_MIB LEN_MIB
range_sha() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | sha256sum | cut -d' ' -f1; }
# is_zero DEV OFF_MIB LEN_MIB
is_zero() { [ "$(range_sha "$1" "$2" "$3")" = "$(dd if=/dev/zero bs=1M count="$3" 2>/dev/null | sha256sum | cut -d' ' -f1)" ]; }
