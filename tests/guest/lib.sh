# shellcheck shell=bash
# Guest test harness library, sourced by scripts/guest-test.
#
# A case is a bash file in tests/guest/cases/NAME.sh. It runs in its own subshell with `set -euo pipefail`, inside
# its own empty work dir ($W, also the cwd), and everything it started (backends, QEMU) is torn down by a trap.
# A typical case:
#
#   gt_describe "x86 q35 vhost-user-blk-pci: pattern write/readback"
#   gt_mkimage "$W/disk.img" 64M
#   gt_blk_backend blk0 --image "$W/disk.img" --serial abc      # or gt_backend NAME SOCK CMD... for other devices
#   gt_vhost_user_dev blk0 vhost-user-blk-pci,num-queues=1       # chardev on blk0's socket + -device
#   gt_guest_script <<'EOF'                                      # runs as /test.sh in the guest (busybox sh)
#   expect_eq "size" "$(cat /sys/block/vda/size)" 131072
#   EOF
#   gt_guest_run x86                                             # boot, run, wait; records guest failures
#   gt_eq "host image" "$(sha256sum < disk.img | cut -c1-64)" "$(gt_guest_value DISKSHA)"
#
# Host-side helpers (all record failures in GT_FAILS; the case passes iff GT_FAILS=0 and it did not exit non-zero):
#   gt_describe TEXT             one-line description printed in the output
#   gt_skip REASON               skip the case (printed with the reason)
#   gt_fail MSG / gt_ok MSG      record a host-side failure / success
#   gt_die MSG                   record a failure and end the case now
#   gt_check DESC CMD...         run CMD, ok if it succeeds
#   gt_eq DESC ACTUAL EXPECTED   compare two strings
#   gt_mkimage PATH SIZE [RANDOM_MIB]   sparse image; first RANDOM_MIB MiB random
#   gt_sha_range FILE OFF_MIB LEN_MIB   sha256 of a byte range of a host file
#   gt_backend NAME SOCK CMD...  start a backend in the background (log: $W/NAME.log), wait for SOCK (<=10 s)
#   gt_backend_kill NAME [SIG]   signal (default TERM) a backend and reap it
#   gt_backend_restart NAME      start the same command line again (stale socket file removed first)
#   gt_backend_alive NAME        true if it is still running
#   gt_backend_wait_connected NAME [TIMEOUT]   wait (<= TIMEOUT s, default 10) until a frontend is connected to NAME's
#                                socket (ss -x: an accepted connection on the path), e.g. QEMU after a restart
#   gt_at_exit CMD...            run CMD at teardown, after QEMU and the backends are stopped (last registered runs
#                                first); for host state a case creates outside $W (network namespaces, helpers)
#   gt_blk_backend NAME [hvisor-vhost blk options]   blk backend: hvisor-vhost, or qemu-storage-daemon if BACKEND=qsd
#   gt_vhost_user_dev NAME DEVICE[,opts] [reconnect]  -chardev socket on NAME's socket + -device DEVICE,chardev=NAME
#   gt_qemu_args ARGS...         extra QEMU arguments
#   GT_SMP=1 GT_MEM=512          guest CPUs / MiB (set before gt_guest_run / gt_guest_start)
#   gt_guest_script [VAR=VAL..] < SCRIPT   the guest's /test.sh (guest helpers below and VARs are prepended)
#                                Host binaries copied into an initramfs (mkinitramfs.sh extra args) are in /usr/bin:
#                                call them by full path, busybox sh runs its own applet of the same name otherwise.
#   gt_guest_initrd fio          use the fio initramfs (x86 only) instead of the base one
#   gt_guest_run ARCH [TIMEOUT]  ARCH = x86 (q35, PCI) | arm64 (virt, virtio-mmio); boot, wait, check rc
#   gt_guest_start ARCH [TIMEOUT] / gt_wait_mark NAME [TIMEOUT] / gt_send TEXT / gt_guest_wait
#                                the same, split, for cases that interact with a running guest
#   gt_guest_value KEY           value the guest printed with `value KEY VAL`
#
# Guest-side helpers (busybox sh, prepended to /test.sh; the script's exit status is the number of failures):
#   ok MSG / fail MSG / info MSG;  check DESC CMD...;  expect_eq DESC ACTUAL EXPECTED
#   mark NAME        print "HARNESS-MARK: NAME" (the host waits for it with gt_wait_mark)
#   wait_host TEXT   block until the host sends a line containing TEXT (gt_send) on the console
#   value KEY VAL    report a value to the host (gt_guest_value KEY)
#   range_sha DEV OFF_MIB LEN_MIB   sha256 of a range of a block device / file
#   is_zero DEV OFF_MIB LEN_MIB     true if that range reads back as zeroes

GT_BACKEND_TIMEOUT=${GT_BACKEND_TIMEOUT:-10}
GT_GUEST_TIMEOUT=${GT_GUEST_TIMEOUT:-120}   # per guest; a case may pass its own to gt_guest_run

gt_elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

gt_log() { printf '  %s\n' "$*"; }
gt_ok() { gt_log "host | ok: $*"; }
gt_fail() { gt_log "host | FAIL: $*"; GT_FAILS=$((GT_FAILS + 1)); }
gt_die() { gt_fail "$*"; exit 1; }
gt_describe() { gt_log "$*"; }
gt_skip() { echo "$*" > "$W/.skip-reason"; gt_log "SKIP: $*"; exit 77; }
gt_check() {
  local d=$1; shift
  if "$@"; then gt_ok "$d"; else gt_fail "$d (command failed: $*)"; fi
}
gt_eq() {
  if [ "$2" = "$3" ]; then gt_ok "$1 ($2)"; else gt_fail "$1: got '$2', expected '$3'"; fi
}

gt_mkimage() {
  local path=$1 size=$2 rnd=${3:-0}
  rm -f "$path"; truncate -s "$size" "$path"
  if [ "$rnd" -gt 0 ]; then
    head -c "$((rnd << 20))" /dev/urandom | dd of="$path" bs=1M conv=notrunc iflag=fullblock status=none
  fi
}
gt_sha_range() { dd if="$1" bs=1M skip="$2" count="$3" status=none | sha256sum | cut -d' ' -f1; }

###############################################################################
# backends
###############################################################################
declare -A GT_BE_PID=() GT_BE_WRAP=() GT_BE_SOCK=() GT_BE_CMD=() GT_BE_STATUS=()

# gt_backend NAME SOCK CMD...
gt_backend() {
  local name=$1 sock=$2; shift 2
  GT_BE_SOCK[$name]=$sock
  GT_BE_CMD[$name]=$(printf '%q ' "$@")
  _gt_backend_spawn "$name"
}
_gt_backend_spawn() {
  local name=$1 sock=${GT_BE_SOCK[$1]} i pid=''
  rm -f "$sock" "$W/$name.pid"
  printf '### %s: %s\n' "$(date +%T.%N | cut -c1-12)" "${GT_BE_CMD[$name]}" >> "$W/$name.log"
  # A wrapper shell runs the backend as its child and records the backend's pid; we signal only the backend, and the
  # wrapper exits normally when it ends (so our shell prints no "Killed" job notices). setsid: own process group, so a
  # Ctrl-C of the harness does not reach it before teardown does.
  RUST_LOG=${RUST_LOG:-info} RUST_BACKTRACE=1 GT_PIDFILE=$W/$name.pid setsid bash -c \
    "${GT_BE_CMD[$name]} & echo \$! > \"\$GT_PIDFILE\"; wait \$!" >> "$W/$name.log" 2>&1 < /dev/null &
  GT_BE_WRAP[$name]=$!
  for ((i = 0; i < 100; i++)); do [ -s "$W/$name.pid" ] && break; sleep 0.02; done
  pid=$(cat "$W/$name.pid" 2>/dev/null || true)
  [ -n "$pid" ] || gt_die "backend $name: could not start the wrapper"
  GT_BE_PID[$name]=$pid
  for ((i = 0; i < GT_BACKEND_TIMEOUT * 20; i++)); do
    # bind() creates the file just before listen(): wait until the socket listens.
    if [ -n "$(ss -xlH src "$sock" 2>/dev/null)" ]; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      { wait "${GT_BE_WRAP[$name]}"; } 2>/dev/null && i=0 || i=$?
      GT_BE_PID[$name]=
      gt_die "backend $name exited (status $i) before creating $sock; log:$(echo; tail -n 40 "$W/$name.log" | sed 's/^/    /')"
    fi
    sleep 0.05
  done
  gt_die "backend $name did not create $sock within ${GT_BACKEND_TIMEOUT}s; log:$(echo; tail -n 40 "$W/$name.log" | sed 's/^/    /')"
}
gt_backend_alive() { local p=${GT_BE_PID[$1]:-}; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
# gt_backend_kill NAME [SIGNAL]: signal and reap; its exit status (128+sig when killed) goes to GT_BE_STATUS[NAME]
gt_backend_kill() {
  local name=$1 sig=${2:-TERM} pid=${GT_BE_PID[$1]:-} st=0 i
  [ -n "$pid" ] || return 0
  kill -s "$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "### backend ignored SIG$sig for 5 s: sending KILL" >> "$W/$name.log"
    gt_log "backend $name ignored SIG$sig for 5 s: sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  { wait "${GT_BE_WRAP[$name]}"; } 2>/dev/null || st=$?   # the wrapper exits with the backend's status
  GT_BE_PID[$name]=
  GT_BE_STATUS[$name]=$st
  printf '### %s: exited with status %s after SIG%s\n' "$(date +%T.%N | cut -c1-12)" "$st" "$sig" >> "$W/$name.log"
}
gt_backend_restart() { _gt_backend_spawn "$1"; }
gt_backend_wait_connected() {
  local name=$1 to=${2:-10} i
  for ((i = 0; i < to * 20; i++)); do
    [ -n "$(ss -xH state connected src "${GT_BE_SOCK[$name]}" 2>/dev/null)" ] && return 0
    sleep 0.05
  done
  gt_fail "no frontend connected to backend $name within ${to}s"; return 1
}

GT_AT_EXIT=()
gt_at_exit() { GT_AT_EXIT+=("$(printf '%q ' "$@")"); }

# gt_blk_backend NAME [--image F] [--readonly] [--direct] [--serial S] [--num-queues N] [--queue-size N] [--size SZ]
# Starts hvisor-vhost blk (default) or the reference qemu-storage-daemon (BACKEND=qsd) on $W/NAME.sock.
# Sets GT_BLK_SERIAL to the serial the guest should see ("" when the backend cannot report one).
gt_blk_backend() {
  local name=$1; shift
  local sock=$W/$name.sock
  if [ "${BACKEND:-hvisor}" != qsd ]; then
    GT_BLK_SERIAL=
    local a=("$@") i
    for ((i = 0; i < ${#a[@]}; i++)); do [ "${a[i]}" = --serial ] && GT_BLK_SERIAL=${a[i + 1]}; done
    gt_backend "$name" "$sock" "${HVISOR_VHOST_BIN:?}" blk --socket-path "$sock" "$@"
    return
  fi
  local image='' ro=0 nq=1 size=256M cache=''
  while [ $# -gt 0 ]; do
    case $1 in
      --image) image=$2; shift 2;;
      --readonly) ro=1; shift;;
      --direct) cache=,cache.direct=on; shift;;
      --serial) shift 2;;       # qsd has no serial option; it reports a fixed one (below)
      --num-queues) nq=$2; shift 2;;
      --queue-size) shift 2;;   # qsd: queue size is the frontend's choice
      --size) size=$2; shift 2;;
      *) gt_die "gt_blk_backend: unknown option $1";;
    esac
  done
  if [ -z "$image" ]; then image=$W/$name-mem.img; truncate -s "$size" "$image"; fi
  GT_BLK_SERIAL=vhost_user_blk   # hard-coded in QEMU's block/export/vhost-user-blk-server.c
  local rw=on bro=''
  [ "$ro" = 1 ] && { rw=off; bro=,read-only=on; }
  gt_backend "$name" "$sock" qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$image,aio=threads,discard=unmap$cache$bro" \
    --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock,writable=$rw,num-queues=$nq"
}

###############################################################################
# QEMU / guest
###############################################################################
GT_QEMU_EXTRA=()
GT_SMP=${GT_SMP:-1}
GT_MEM=${GT_MEM:-512}
GT_INITRD_KIND=base

gt_qemu_args() { GT_QEMU_EXTRA+=("$@"); }
# gt_vhost_user_dev NAME DEVICE[,opts] [reconnect]
gt_vhost_user_dev() {
  local name=$1 dev=$2 rec=''
  [ "${3:-}" = reconnect ] && rec=,reconnect-ms=1000   # QEMU >= 9.2 spelling (`reconnect=1` is deprecated)
  GT_QEMU_EXTRA+=(-chardev "socket,id=$name,path=${GT_BE_SOCK[$name]:-$W/$name.sock}$rec" -device "$dev,chardev=$name")
}
gt_guest_initrd() { GT_INITRD_KIND=$1; }

# gt_guest_script [VAR=VALUE ...] < SCRIPT   (the VARs are set, shell-quoted, before the script runs)
gt_guest_script() {
  local kv
  {
    cat "$GT_ROOT/tests/guest/guest-lib.sh"
    echo "# ---- values from the host ----"
    for kv in "$@"; do printf '%s=%q\n' "${kv%%=*}" "${kv#*=}"; done
    echo "# ---- case script ----"
    cat
    echo
    echo "exit \$GT_FAILS"
  } > "$W/test.sh"
}

_gt_build_initrd() {
  local arch=$1 base d
  case "$arch:$GT_INITRD_KIND" in
    x86:base) base=$GT_INITRD_X86;;
    arm64:base) base=$GT_INITRD_ARM;;
    x86:fio) build_fio_image >/dev/null || gt_die "building the fio initramfs failed"; base=$GT_INITRD_FIO_X86;;
    *) gt_die "no initramfs '$GT_INITRD_KIND' for $arch";;
  esac
  [ -f "$W/test.sh" ] || gt_die "case did not call gt_guest_script"
  d=$(mktemp -d "$W/cpio.XXXX")
  cp "$W/test.sh" "$d/test.sh"
  (cd "$d" && echo test.sh | cpio -o -H newc --quiet) > "$W/test.cpio"
  rm -rf "$d"
  # The kernel only looks for an uncompressed cpio after a compressed one at a 4-byte aligned offset: pad with zeroes.
  local sz pad
  sz=$(stat -c %s "$base"); pad=$(( (4 - sz % 4) % 4 ))
  { cat "$base"; head -c "$pad" /dev/zero; cat "$W/test.cpio"; } > "$W/initrd"
}

_gt_qemu_cmd() {
  local arch=$1
  local common=(-accel tcg -smp "$GT_SMP" -m "$GT_MEM" -nodefaults -no-user-config -display none -no-reboot
    -object "memory-backend-memfd,id=mem,size=${GT_MEM}M,share=on"
    -chardev "pipe,id=con,path=$W/serial" -serial chardev:con -initrd "$W/initrd")
  case $arch in
    x86) GT_QEMU_CMD=(qemu-system-x86_64 -machine q35,memory-backend=mem -cpu max "${common[@]}"
           -kernel "$GT_KERNEL_X86" -append "console=ttyS0 panic=-1 quiet");;
    arm64) GT_QEMU_CMD=(qemu-system-aarch64 -machine virt,memory-backend=mem -cpu cortex-a57 "${common[@]}"
           -global virtio-mmio.force-legacy=false -kernel "$GT_KERNEL_ARM" -append "console=ttyAMA0 panic=-1 quiet");;
    *) gt_die "unknown arch $arch (x86 | arm64)";;
  esac
  GT_QEMU_CMD+=("${GT_QEMU_EXTRA[@]}")
}

GT_QEMU_PID='' GT_DRAIN_PID='' GT_GUEST_T0=''
# gt_guest_start ARCH [TIMEOUT]: boot the guest in the background
gt_guest_start() {
  local arch=$1 to=${2:-$GT_GUEST_TIMEOUT}
  [ -z "$GT_QEMU_PID" ] || gt_die "a guest is already running"
  _gt_build_initrd "$arch"
  _gt_qemu_cmd "$arch"
  rm -f "$W/serial.in" "$W/serial.out"; mkfifo "$W/serial.in" "$W/serial.out"
  : > "$W/serial.log"
  printf '%q ' timeout "$to" "${GT_QEMU_CMD[@]}" > "$W/qemu.cmd"; echo >> "$W/qemu.cmd"
  # console output: QEMU writes serial.out, we strip CRs into serial.log; input: gt_send writes serial.in
  sed -u 's/\r$//' < "$W/serial.out" > "$W/serial.log" &   # unbuffered: gt_wait_mark polls the log
  GT_DRAIN_PID=$!
  exec {GT_CON_FD}<> "$W/serial.in"   # O_RDWR: never blocks, and keeps the fifo open
  GT_GUEST_T0=$(date +%s.%N)
  timeout "$to" "${GT_QEMU_CMD[@]}" > "$W/qemu.log" 2>&1 < /dev/null &
  GT_QEMU_PID=$!
}
# QEMU stderr lines after which the guest's I/O can only hang: end the guest at once instead of waiting for the timeout.
# A case that provokes such errors on purpose can set GT_QEMU_FATAL='' (or its own regex).
GT_QEMU_FATAL=${GT_QEMU_FATAL-'vhost start failed|Error starting vhost'}
_gt_qemu_fatal() {
  [ -n "$GT_QEMU_FATAL" ] && [ -s "$W/qemu.log" ] && grep -qE "$GT_QEMU_FATAL" "$W/qemu.log" || return 1
  gt_fail "QEMU reported a fatal vhost error ($(grep -E "$GT_QEMU_FATAL" "$W/qemu.log" | head -n 1)); stopping the guest"
  kill "$GT_QEMU_PID" 2>/dev/null || true
  return 0
}
gt_send() { printf '%s\n' "$*" >&"$GT_CON_FD"; }
# gt_wait_mark NAME [TIMEOUT]: wait until the guest printed "HARNESS-MARK: NAME"
gt_wait_mark() {
  local m=$1 to=${2:-120} i
  for ((i = 0; i < to * 10; i++)); do
    grep -q "^HARNESS-MARK: $m\$" "$W/serial.log" && return 0
    kill -0 "$GT_QEMU_PID" 2>/dev/null || { gt_fail "guest ended before mark '$m'"; return 1; }
    _gt_qemu_fatal && return 1
    sleep 0.1
  done
  gt_fail "guest did not reach mark '$m' within ${to}s"; return 1
}
# gt_guest_wait: wait for QEMU to exit, then check the guest's result line
gt_guest_wait() {
  local st=0 rc
  [ -n "$GT_QEMU_PID" ] || gt_die "no guest running"
  while kill -0 "$GT_QEMU_PID" 2>/dev/null; do
    _gt_qemu_fatal && break
    sleep 0.2
  done
  { wait "$GT_QEMU_PID"; } 2>/dev/null || st=$?
  GT_QEMU_PID=''
  wait "$GT_DRAIN_PID" 2>/dev/null || true; GT_DRAIN_PID=''
  exec {GT_CON_FD}>&-
  rc=$(sed -n 's/^HARNESS-RESULT: rc=\([0-9]*\).*/\1/p' "$W/serial.log" | tail -n 1)
  grep -E '^(ok|FAIL|info):' "$W/serial.log" | sed 's/^/  guest| /' || true
  gt_log "guest: QEMU exit $st, $(gt_elapsed "$GT_GUEST_T0")s, $(grep -o 'HARNESS-RESULT:.*' "$W/serial.log" | tail -n 1 || true)"
  if [ "$st" = 124 ]; then gt_fail "QEMU timed out (killed by timeout)"; return 1; fi
  if [ -z "$rc" ]; then gt_fail "no HARNESS-RESULT line in the serial log (QEMU exit $st; qemu.log: $(tail -n 3 "$W/qemu.log" | tr '\n' ' '))"; return 1; fi
  [ "$st" = 0 ] || gt_fail "QEMU exited with status $st: $(tail -n 3 "$W/qemu.log" | tr '\n' ' ')"
  [ "$rc" = 0 ] || gt_fail "guest test script reported $rc failure(s) (rc=$rc)"
  return 0
}
gt_guest_run() { gt_guest_start "$@"; gt_guest_wait; }
gt_guest_value() { sed -n "s/^HARNESS-VALUE: $1=//p" "$W/serial.log" | tail -n 1; }

###############################################################################
# case runner (called by scripts/guest-test)
###############################################################################
_gt_teardown() {
  local st=$? name p
  set +e
  if [ -n "$GT_QEMU_PID" ]; then
    # GT_QEMU_PID is `timeout`, which forwards TERM to QEMU; it runs in its own process group (KILL that if needed)
    kill "$GT_QEMU_PID" 2>/dev/null
    for ((p = 0; p < 50; p++)); do kill -0 "$GT_QEMU_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$GT_QEMU_PID" 2>/dev/null
    { wait "$GT_QEMU_PID"; } 2>/dev/null
    GT_QEMU_PID=''
  fi
  [ -n "$GT_DRAIN_PID" ] && { kill "$GT_DRAIN_PID" 2>/dev/null; wait "$GT_DRAIN_PID" 2>/dev/null; }
  for name in "${!GT_BE_PID[@]}"; do
    p=${GT_BE_PID[$name]}
    [ -n "$p" ] && gt_backend_kill "$name" TERM >/dev/null 2>&1
  done
  # clean-up steps may find their process gone already; that is not a failure of the case
  for ((p = ${#GT_AT_EXIT[@]} - 1; p >= 0; p--)); do eval "${GT_AT_EXIT[p]}" 2>/dev/null || true; done
  if [ -n "${GUEST_TEST_VERBOSE:-}" ] && [ -s "$W/serial.log" ]; then
    echo "  ---- serial log: $W/serial.log"; sed 's/^/  | /' "$W/serial.log"
  fi
  if [ "$st" != 0 ] && [ "$st" != 77 ]; then
    if [ -s "$W/serial.log" ] && [ -z "${GUEST_TEST_VERBOSE:-}" ]; then
      echo "  ---- serial log (last 40 lines): $W/serial.log"; tail -n 40 "$W/serial.log" | sed 's/^/  | /'
    fi
    if [ -s "$W/qemu.log" ]; then
      echo "  ---- qemu stderr (last 10 lines)"; tail -n 10 "$W/qemu.log" | sed 's/^/  | /'
    fi
    for name in "${!GT_BE_SOCK[@]}"; do
      echo "  ---- backend $name log (last 40 lines): $W/$name.log"; tail -n 40 "$W/$name.log" | sed 's/^/  | /'
    done
  fi
  exit "$st"
}

# gt_run_case FILE -> 0 pass, 77 skip, other fail
gt_run_case() {
  local f=$1 name st=0 errexit=0
  name=$(basename "$f" .sh)
  echo "--- $name"
  rm -rf "${GT_WORK:?}/$name"; mkdir -p "$GT_WORK/$name"
  # The subshell must not run in an `if`/`||` context: bash would then ignore `set -e` inside it.
  [[ $- == *e* ]] && errexit=1
  set +e
  (
    set -euo pipefail
    W=$GT_WORK/$name; GT_CASE=$name; GT_FAILS=0
    cd "$W"
    trap _gt_teardown EXIT
    set -E
    trap '_gt_st=$?; case $BASH_COMMAND in return*) ;; *) gt_log "host | FAIL: command exited with status $_gt_st at ${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND";; esac' ERR
    trap 'exit 130' INT TERM
    # shellcheck disable=SC1090
    source "$f"
    [ -z "$GT_QEMU_PID" ] || gt_guest_wait
    [ "$GT_FAILS" = 0 ] || exit 1
    exit 0
  )
  st=$?
  [ "$errexit" = 1 ] && set -e
  if [ "$st" = 0 ] && [ -z "${GUEST_TEST_KEEP:-}" ]; then rm -rf "${GT_WORK:?}/$name"; fi
  return "$st"
}
