#!/bin/sh
# Builds hvisor-tool's virtio daemon for this machine from a copy of its sources, for ring-bench
# (see README.md beside this script for where the sources come from and what is not theirs).
#
#   benches/ring-bench/c-daemon/build.sh /path/to/hvisor-tool [OUTPUT]
#
# OUTPUT defaults to /path/to/hvisor-tool/build/hvisor-virtio. Needs gcc and cJSON's headers and
# library (Debian: libcjson-dev). Linked dynamically, unlike hvisor-tool's Makefile (-static), so
# that LD_PRELOAD (devhvisor-shim) applies.
set -eu
tool=${1:?usage: build.sh HVISOR_TOOL_DIR [OUTPUT]}
out=${2:-$tool/build/hvisor-virtio}
here=$(cd "$(dirname "$0")" && pwd)
cjson=$(pkg-config --cflags libcjson 2>/dev/null || echo -I/usr/include/cjson)
mkdir -p "$(dirname "$out")"
t=$tool/tools
# The flags of tools/Makefile for x86_64 (LOG as its README suggests), minus -static.
gcc -O2 -Wall -Wextra -DLOG_USE_COLOR -DHLOG=LOG_WARN -pthread \
    -I"$tool/include" -I"$t/include" -I"$t/virtio/include" $cjson \
    -o "$out" \
    "$here/launcher.c" \
    "$t/log.c" "$t/json_parse.c" "$t/safe_cjson.c" \
    "$t/virtio/virtio.c" "$t/virtio/event_monitor.c" \
    "$t/virtio/devices/blk/virtio_blk.c" \
    "$t/virtio/devices/console/virtio_console.c" \
    "$t/virtio/devices/net/virtio_net.c" \
    -lcjson -lpthread
echo "built $out"
