# Helpers of the L2 guest's check scripts (busybox sh, stdout is /dev/kmsg, which the stand-in
# prints through its earlycon UART; "<2>" keeps the lines visible with `quiet`).
F=0
say() { echo "<2>L2: $*"; }
ok() { say "ok: $*"; }
fail() { say "FAIL: $*"; F=$((F + 1)); }
info() { say "info: $*"; }
value() { say "VALUE $1=$2"; }
arg() { sed -n "s/.*nested\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
now_cs() { awk '{printf "%d", $1 * 100}' /proc/uptime; }
