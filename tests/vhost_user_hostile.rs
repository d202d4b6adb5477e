//! Frontends that break the vhost-user protocol on purpose: each bad message is refused
//! with a log line naming it, answered with a failure when the frontend asked for an
//! answer (or its connection is closed when it did not), and the daemon serves the next
//! frontend as if nothing happened.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::frontend::{Buffer, DriverConfig, VhostUserDriver};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_guest_driver::{blk, write_descriptor};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");
const TIMEOUT: Duration = Duration::from_secs(5);
const PAGE: u64 = 4096;

struct Fixture {
    socket: PathBuf,
    daemon: Daemon,
    // Removed after the daemon is gone and its log was shown.
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// An in-memory blk daemon with rings of up to 256 entries.
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("hostile.sock");
        let mut command = Command::new(BINARY);
        command
            .args(["blk", "--size", "1M", "--socket-path"])
            .arg(&socket)
            .env("RUST_LOG", "info");
        let mut daemon = Daemon::spawn(command, &dir.path().join("daemon.log"));
        daemon.wait_for_path(&socket, TIMEOUT);
        Fixture {
            _dir: dir,
            socket,
            daemon,
        }
    }

    /// Waits for `line` in the daemon's log.
    fn expect_log(&self, line: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.daemon.log().contains(line) {
            assert!(Instant::now() < deadline, "{line:?} was not logged");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon is alive and serves a well-behaved frontend: full set-up, a write read back.
    fn assert_still_serving(&mut self) {
        assert!(
            self.daemon.wait_exit(Duration::ZERO).is_none(),
            "the daemon exited"
        );
        let mut driver =
            VhostUserDriver::connect(&self.socket, &DriverConfig::default()).expect("set-up");
        let data = [0x6b; 512];
        driver
            .submit(0, &[&blk::header(VIRTIO_BLK_T_OUT, 0), &data], &[1])
            .expect("submit write");
        let used = driver.wait_used(0, TIMEOUT).expect("write completion");
        assert_eq!(used.writable[0], [VIRTIO_BLK_S_OK as u8]);
        driver
            .submit(0, &[&blk::header(VIRTIO_BLK_T_IN, 0)], &[512, 1])
            .expect("submit read");
        let used = driver.wait_used(0, TIMEOUT).expect("read completion");
        assert_eq!(used.writable[0], data);
    }
}

/// The protocol features the tests ack (with REPLY_ACK if asked for).
fn protocol_features(reply_ack: bool) -> VhostUserProtocolFeatures {
    let mut features = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if reply_ack {
        features |= VhostUserProtocolFeatures::REPLY_ACK;
    }
    features
}

/// Connects and negotiates up to SET_PROTOCOL_FEATURES exclusive.
fn connect(socket: &Path) -> Frontend {
    let stream = UnixStream::connect(socket).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut frontend = Frontend::from_stream(stream, 1);
    frontend.set_owner().expect("SET_OWNER");
    frontend.get_features().expect("GET_FEATURES");
    frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    frontend
}

/// Connects and negotiates like QEMU; with `reply_ack`, every later request asks for an ack.
fn negotiate(socket: &Path, reply_ack: bool) -> Frontend {
    let mut frontend = connect(socket);
    frontend
        .set_protocol_features(protocol_features(reply_ack))
        .expect("SET_PROTOCOL_FEATURES");
    if reply_ack {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    frontend
        .set_features((1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .expect("SET_FEATURES");
    frontend
}

/// After a refusal the daemon closed the connection: the next request gets no answer.
fn assert_disconnected(frontend: &mut Frontend, what: &str) {
    assert!(
        frontend.get_features().is_err(),
        "{what}: the connection is still open"
    );
}

fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the new descriptor is owned by the file.
    let fd = unsafe { libc::memfd_create(c"hostile-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create just returned this descriptor.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).expect("size the memfd");
    file
}

/// A region of `size` bytes at file offset `offset`, placed at guest (and frontend) address
/// `guest`.
fn region(file: &File, guest: u64, size: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: guest,
        memory_size: size,
        userspace_addr: guest,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

#[test]
fn ring_sizes_that_are_not_a_power_of_two_zero_or_too_large_are_refused() {
    let mut fixture = Fixture::start();
    let frontend = negotiate(&fixture.socket, true);
    for size in [3, 0, 100, 512] {
        assert!(
            frontend.set_vring_num(0, size).is_err(),
            "SET_VRING_NUM {size} was acked"
        );
        fixture.expect_log(&format!(
            "SET_VRING_NUM refused: ring 0: size {size} is not a power of two from 1 to 256"
        ));
    }
    // Refused, not disconnected: the frontend can go on with a good size.
    frontend.set_vring_num(0, 16).expect("SET_VRING_NUM 16");
    drop(frontend);

    // Without REPLY_ACK the frontend cannot learn of the refusal: the daemon disconnects it.
    let mut frontend = negotiate(&fixture.socket, false);
    frontend.set_vring_num(0, 3).expect("nothing to wait for");
    assert_disconnected(&mut frontend, "SET_VRING_NUM 3 without REPLY_ACK");
    fixture.expect_log("the frontend asked for no reply, so disconnecting it");
    fixture.assert_still_serving();
}

#[test]
fn protocol_features_never_offered_are_refused() {
    let mut fixture = Fixture::start();
    let mut frontend = connect(&fixture.socket);
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    for bogus in [
        VhostUserProtocolFeatures::PAGEFAULT,
        VhostUserProtocolFeatures::from_bits_retain(1 << 40),
    ] {
        assert!(
            frontend
                .set_protocol_features(protocol_features(true) | bogus)
                .is_err(),
            "{bogus:?} was acked"
        );
        fixture.expect_log(&format!(
            "SET_PROTOCOL_FEATURES refused: acks protocol features {:#x}, which were never offered",
            bogus.bits()
        ));
    }
    frontend
        .set_protocol_features(protocol_features(true))
        .expect("the offered features");
    frontend.get_queue_num().expect("MQ is in effect");
    drop(frontend);

    let mut frontend = connect(&fixture.socket);
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::PAGEFAULT)
        .expect("nothing to wait for");
    assert_disconnected(
        &mut frontend,
        "unoffered protocol features without REPLY_ACK",
    );
    fixture.assert_still_serving();
}

#[test]
fn a_memory_table_of_more_than_eight_regions_is_refused() {
    let mut fixture = Fixture::start();
    let frontend = negotiate(&fixture.socket, true);
    let file = memfd(9 * PAGE);
    let regions: Vec<_> = (0..9)
        .map(|page| region(&file, 0x1_0000_0000 + page * 0x10_0000, PAGE, page * PAGE))
        .collect();
    assert!(
        frontend.set_mem_table(&regions).is_err(),
        "9 regions were acked"
    );
    fixture.expect_log("SET_MEM_TABLE refused: 9 regions, more than the 8 of a memory table");
    frontend.set_mem_table(&regions[..8]).expect("8 regions");
    drop(frontend);
    fixture.assert_still_serving();
}

#[test]
fn memory_slots_beyond_the_reported_count_are_refused() {
    let mut fixture = Fixture::start();
    let mut frontend = negotiate(&fixture.socket, true);
    let slots = frontend.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    assert_eq!(slots, 509);
    let file = memfd((slots + 1) * PAGE);
    let slot_region =
        |slot: u64| region(&file, 0x1_0000_0000 + slot * 0x10_0000, PAGE, slot * PAGE);
    for slot in 0..slots {
        frontend
            .add_mem_region(&slot_region(slot))
            .unwrap_or_else(|error| panic!("ADD_MEM_REG {slot}: {error}"));
    }
    assert!(
        frontend.add_mem_region(&slot_region(slots)).is_err(),
        "memory slot {} was acked",
        slots + 1
    );
    fixture.expect_log(
        "ADD_MEM_REG refused: all 509 memory slots GET_MAX_MEM_SLOTS reports are in use",
    );
    // A slot given back can be taken again.
    frontend
        .remove_mem_region(&slot_region(0))
        .expect("REM_MEM_REG");
    frontend
        .add_mem_region(&slot_region(slots))
        .expect("ADD_MEM_REG after REM_MEM_REG");
    drop(frontend);
    fixture.assert_still_serving();
}

#[test]
fn a_payload_size_above_the_protocol_limit_closes_the_connection_at_once() {
    let mut fixture = Fixture::start();
    let mut stream = UnixStream::connect(&fixture.socket).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    // SET_MEM_TABLE, version 1, a payload of 0x1001 bytes that never comes.
    let mut header = Vec::new();
    for word in [5u32, 1, 0x1001] {
        header.extend_from_slice(&word.to_le_bytes());
    }
    stream.write_all(&header).expect("send the header");
    let started = Instant::now();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("an answer to an oversized message"),
        Err(error) => assert!(
            !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the connection is still open after {:?}",
            started.elapsed()
        ),
    }
    fixture.expect_log(
        "vhost-user SET_MEM_TABLE announces a payload of 4097 bytes, more than the protocol's 4096",
    );
    fixture.assert_still_serving();
}

#[test]
fn regions_not_backed_by_their_file_are_refused() {
    let mut fixture = Fixture::start();
    let mut frontend = negotiate(&fixture.socket, true);
    let file = memfd(16 * PAGE);
    let cases = [
        // Larger than its file.
        (
            region(&file, 0x2_0000_0000, 32 * PAGE, 0),
            "0x20000 bytes at file offset 0x0",
        ),
        // Starting past the end of its file.
        (
            region(&file, 0x2_0000_0000, PAGE, 32 * PAGE),
            "0x1000 bytes at file offset 0x20000",
        ),
        // Running over the end.
        (
            region(&file, 0x2_0000_0000, 2 * PAGE, 15 * PAGE),
            "0x2000 bytes at file offset 0xf000",
        ),
    ];
    for (bad, description) in &cases {
        // Regions in guest address order, as vhost-user-backend wants them.
        let good = region(&file, 0x1_0000_0000, PAGE, 0);
        assert!(
            frontend.set_mem_table(&[good, *bad]).is_err(),
            "SET_MEM_TABLE with {description} was acked"
        );
        fixture.expect_log(&format!(
            "SET_MEM_TABLE refused: region 1: {description} reach past the end of its file (0x10000 bytes)"
        ));
        assert!(
            frontend.add_mem_region(bad).is_err(),
            "ADD_MEM_REG with {description} was acked"
        );
        fixture.expect_log(&format!(
            "ADD_MEM_REG refused: region 0: {description} reach past the end of its file"
        ));
    }
    frontend
        .set_mem_table(&[region(&file, 0x1_0000_0000, 16 * PAGE, 0)])
        .expect("a region its file backs");
    drop(frontend);
    fixture.assert_still_serving();
}

/// A frontend shrinks its memory file after the table was accepted, then makes the device
/// read a request header from the part that is gone: the daemon survives the fault, logs it,
/// disconnects that frontend and serves the next one.
#[test]
fn a_memory_file_shrunk_under_the_device_is_survived() {
    let mut fixture = Fixture::start();
    let config = DriverConfig {
        mem_size: 1 << 20,
        ..DriverConfig::default()
    };
    let mut driver = VhostUserDriver::connect(&fixture.socket, &config).expect("set-up");
    let memory_file = driver
        .memory()
        .iter()
        .next()
        .and_then(|region| region.file_offset())
        .expect("guest RAM is file-backed")
        .file()
        .try_clone()
        .expect("clone the memory file");
    // The header lives in the upper half, which the test never touches after this.
    let header_address = GuestAddress(config.mem_base + (768 << 10));
    driver
        .write_memory(header_address, &blk::header(VIRTIO_BLK_T_IN, 0))
        .expect("write the header");
    memory_file.set_len(512 << 10).expect("shrink guest RAM");
    let data = driver.alloc(512).expect("data buffer");
    let status = driver.alloc(1).expect("status buffer");
    driver
        .enqueue_raw(
            0,
            &[
                Buffer {
                    addr: header_address,
                    len: 16,
                    device_writable: false,
                },
                Buffer {
                    addr: data,
                    len: 512,
                    device_writable: true,
                },
                Buffer {
                    addr: status,
                    len: 1,
                    device_writable: true,
                },
            ],
        )
        .expect("enqueue");
    driver.kick(0).expect("kick");
    fixture.expect_log("the frontend shrank a guest memory file");
    fixture.expect_log("disconnecting the frontend");
    assert!(
        driver.get_config(0, 8).is_err(),
        "the frontend that shrank its memory is still connected"
    );
    drop(driver);
    fixture.assert_still_serving();
}

/// Log lines of `log` that contain `needle`, counted per second of their timestamp.
fn lines_per_second(log: &str, needle: &str) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for line in log.lines().filter(|line| line.contains(needle)) {
        // env_logger's "[2026-12-04T18:09:08Z LEVEL target] message".
        let second = line.get(1..21).unwrap_or(line).to_owned();
        *counts.entry(second).or_insert(0) += 1;
    }
    counts
}

/// A frontend makes a rust-vmm crate log at will: its avail ring ends where guest memory
/// does, so the index can be read but the entry virtio-queue's iterator then reads cannot
/// (it logs an error). The device stops the queue each time; the frontend starts it again
/// (SET_VRING_CALL, which vhost-user-backend takes as a start) and kicks, without pause. The
/// daemon's log still gets at most the logger's per-site budget each second.
#[test]
fn a_flood_of_crate_errors_is_held_to_a_bounded_rate() {
    let fixture = Fixture::start();
    let config = DriverConfig::default();
    let mut driver = VhostUserDriver::connect(&fixture.socket, &config).expect("set-up");
    // Queue 0's descriptor table and used ring as support::frontend lays them out (page
    // aligned, one after the other with the avail ring between), and an avail ring whose
    // flags and index are guest memory's last 4 bytes.
    let desc_table = GuestAddress(config.mem_base);
    let used_ring = GuestAddress(config.mem_base + 2 * PAGE);
    let avail_ring = GuestAddress(config.mem_base + config.mem_size - 4);
    driver
        .write_memory(avail_ring.unchecked_add(2), &1u16.to_le_bytes())
        .expect("publish one entry");
    let host = |addr: GuestAddress| {
        driver
            .memory()
            .get_host_address(addr)
            .expect("an address in guest RAM") as u64
    };
    let rings = VringConfigData {
        queue_max_size: config.queue_size,
        queue_size: config.queue_size,
        flags: 0,
        desc_table_addr: host(desc_table),
        used_ring_addr: host(used_ring),
        avail_ring_addr: host(avail_ring),
        log_addr: None,
    };
    driver
        .frontend_mut()
        .set_vring_addr(0, &rings)
        .expect("SET_VRING_ADDR");
    let call = EventFd::new(EFD_NONBLOCK).expect("call eventfd");
    let flood_end = Instant::now() + Duration::from_secs(3);
    let mut starts = 0u64;
    while Instant::now() < flood_end {
        driver
            .frontend_mut()
            .set_vring_call(0, &call)
            .expect("SET_VRING_CALL");
        driver.kick(0).expect("kick");
        starts += 1;
    }
    drop(driver);
    // The last second's summary is written once that second is over.
    std::thread::sleep(Duration::from_millis(1500));
    let log = fixture.daemon.log();
    let errors = lines_per_second(&log, "Failed to read from memory");
    println!("{starts} starts and kicks; crate error lines per second: {errors:?}");
    assert!(
        !errors.is_empty(),
        "the unreadable avail entry was not noticed"
    );
    let limit = hvisor_vhost::logging::LINES_PER_SECOND as usize;
    for (second, count) in &errors {
        assert!(
            *count <= limit,
            "{count} lines of the same error in second {second}, more than {limit}"
        );
    }
    assert!(
        log.contains("similar lines suppressed"),
        "the flood never went over the budget: {starts} starts"
    );
}

/// Whether `pid` maps or holds a descriptor of a file whose name contains `name`.
fn holds_file(pid: libc::pid_t, name: &str) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("daemon maps");
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("daemon fds");
    maps.contains(name)
        || descriptors.flatten().any(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().contains(name))
        })
}

/// A frontend that left must not keep its guest RAM allocated through the daemon: its memory
/// file is neither mapped nor open once the connection is over.
#[test]
fn a_frontend_that_left_leaves_no_hold_on_its_memory() {
    let mut fixture = Fixture::start();
    let config = DriverConfig {
        mem_size: 1 << 20,
        ..DriverConfig::default()
    };
    let driver = VhostUserDriver::connect(&fixture.socket, &config).expect("set-up");
    let pid = fixture.daemon.pid();
    // The driver's memfd name (support::frontend).
    let name = "vhost-user-test-guest-ram";
    assert!(
        holds_file(pid, name),
        "the daemon maps the frontend's memory"
    );
    driver.disconnect();
    let deadline = Instant::now() + TIMEOUT;
    while holds_file(pid, name) {
        assert!(
            Instant::now() < deadline,
            "the daemon still holds the memory of a frontend that left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fixture.assert_still_serving();
}

/// A driver can lay its available ring over its used ring, so that every request the device
/// completes publishes the next one: a queue worker that never runs out of work. While the
/// frontend stays it only burns its own device's time; once it leaves without stopping the
/// ring, the worker must still end its batch, or joining it wedges the daemon for every later
/// frontend.
#[test]
fn a_ring_that_feeds_itself_does_not_outlive_its_frontend() {
    let mut fixture = Fixture::start();
    let mut driver =
        VhostUserDriver::connect(&fixture.socket, &DriverConfig::default()).expect("set-up");
    let rings = driver.ring_layout(0).expect("queue 0");
    let header = driver.alloc(16).expect("header buffer");
    let data = driver.alloc(512).expect("data buffer");
    let status = driver.alloc(1).expect("status buffer");
    driver
        .write_memory(header, &blk::header(VIRTIO_BLK_T_OUT, 0))
        .expect("write the header");
    // Head 0 is a 512-byte write, head 1 the data and status of it (answered IOERR): every used
    // element, read as avail entries, names head 0 or 1 (id and length 1, upper halves 0).
    let memory = driver.memory();
    let chain = [
        (
            Buffer {
                addr: header,
                len: 16,
                device_writable: false,
            },
            Some(1),
        ),
        (
            Buffer {
                addr: data,
                len: 512,
                device_writable: false,
            },
            Some(2),
        ),
        (
            Buffer {
                addr: status,
                len: 1,
                device_writable: true,
            },
            None,
        ),
    ];
    for (index, (buffer, next)) in (0..).zip(&chain) {
        write_descriptor(memory, rings.descriptor(index), buffer, *next).expect("descriptor");
    }
    // The used index the device starts from is read from memory at SET_VRING_ADDR: one ahead of
    // the available ring's base, so the aliased avail index always has one entry pending.
    driver
        .write_memory(rings.used_idx(), &1u16.to_le_bytes())
        .expect("write the used index");
    let aliased = virtio_guest_driver::QueueLayout {
        avail: rings.used,
        ..rings
    };
    driver
        .move_ring(0, aliased, 0)
        .expect("move the avail ring");
    driver.kick(0).expect("kick");
    let used_idx = |driver: &VhostUserDriver| {
        let bytes = driver.read_memory(rings.used_idx(), 2).expect("used index");
        u16::from_le_bytes([bytes[0], bytes[1]])
    };
    let first = used_idx(&driver);
    std::thread::sleep(Duration::from_millis(200));
    assert_ne!(used_idx(&driver), first, "the ring does not feed itself");
    drop(driver);
    let (served, serving) = std::sync::mpsc::channel();
    let socket = fixture.socket.clone();
    std::thread::spawn(move || {
        let config = DriverConfig::default();
        let served_one = VhostUserDriver::connect(&socket, &config).and_then(|mut driver| {
            driver.submit(0, &[&blk::header(VIRTIO_BLK_T_IN, 0)], &[512, 1])?;
            driver.wait_used(0, TIMEOUT)
        });
        let _ = served.send(served_one.is_ok());
    });
    assert_eq!(
        serving.recv_timeout(3 * TIMEOUT),
        Ok(true),
        "the next frontend was not served: the departed frontend's worker is still running"
    );
    fixture.assert_still_serving();
}
