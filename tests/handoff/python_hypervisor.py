#!/usr/bin/env python3
"""A hypervisor side written only from docs/hypervisor-socket.md and the bridge layout.

usage: python_hypervisor.py SOCKET ZONE DEVICE_ADDR ZONE0_IPA SIZE
Hands a bridge page, a wake-up eventfd and one RAM window to the daemon, then performs
synchronous reads of MagicValue, Version and DeviceID of the device at DEVICE_ADDR through the
request ring, and prints them. Python has no memory fences, so it writes the wake-up eventfd
after every request instead of checking need_wakeup (always correct, just not optimal).
"""
import array, json, mmap, os, select, socket, struct, sys, time

sock_path, zone, addr, zone0_ipa, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0), int(sys.argv[4], 0), int(sys.argv[5], 0)
REQ_LIST, CFG_FLAGS, CFG_VALUES, REQ_SIZE = 16, 1552, 1808, 40

bridge_fd = os.memfd_create("bridge")
os.ftruncate(bridge_fd, 4096)
ram_fd = os.memfd_create("zone-ram")
os.ftruncate(ram_fd, size)
wakeup = os.eventfd(0, os.EFD_NONBLOCK)
page = mmap.mmap(bridge_fd, 4096)

try:
    os.unlink(sock_path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sock_path)
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
body = json.dumps({"protocol": "hvisor-vhost-handoff", "version": 1, "bridge_fd": 0, "wakeup_fd": 1,
                   "windows": [{"zone": zone, "zone0_ipa": zone0_ipa, "size": size, "fd": 2}]}).encode()
conn.sendmsg([struct.pack("<I", len(body)) + body],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [bridge_fd, wakeup, ram_fd]))])
data, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
while len(data) < 4 or len(data) < 4 + struct.unpack("<I", data[:4])[0]:
    data += conn.recv(1 << 20)
reply = json.loads(data[4:])
assert reply["protocol"] == "hvisor-vhost-handoff" and reply["version"] == 1, reply
finish = array.array("i", ancdata[0][2])[reply["finish_fd"]]

def read_register(offset, cpu=0):
    rear = struct.unpack_from("<I", page, 4)[0]
    old_flag = struct.unpack_from("<Q", page, CFG_FLAGS + 8 * cpu)[0]
    struct.pack_into("<QQQQIBBH", page, REQ_LIST + REQ_SIZE * rear, cpu, addr + offset, 4, 0, zone, 0, 0, 0)
    struct.pack_into("<I", page, 4, (rear + 1) % 32)
    os.eventfd_write(wakeup, 1)
    deadline = time.time() + 5
    while struct.unpack_from("<Q", page, CFG_FLAGS + 8 * cpu)[0] == old_flag:
        if time.time() > deadline:
            sys.exit("no answer from the daemon")
        time.sleep(0.0001)
    return struct.unpack_from("<Q", page, CFG_VALUES + 8 * cpu)[0]

print("magic %#x version %d device %d" % (read_register(0), read_register(4), read_register(8)), flush=True)
conn.close()
