//! The `hvisor-vhost blk` binary driven over its real socket by the VM-less
//! frontend in `support::frontend`, which `frontend_smoke.rs` proves against
//! qemu-storage-daemon: a failure here points at our daemon, not the driver.

mod support;

use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::frontend::{DriverConfig, UsedBuffer, VhostUserDriver, default_protocol_features};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_guest_driver::blk;

const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");
const SECTOR_SIZE: u64 = 512;
/// Small, so filling and comparing whole images stays cheap.
const IMAGE_SIZE: u64 = 1 << 20;
/// Seed of the pattern fresh images are filled with.
const IMAGE_SEED: u8 = 0xc3;
/// Bound on every wait for the daemon: start-up, a completion, an exit.
const TIMEOUT: Duration = Duration::from_secs(5);
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// A temp directory with the daemon's socket, image and logs.
struct Fixture {
    dir: tempfile::TempDir,
    socket: PathBuf,
    image: PathBuf,
    /// Daemons started so far, to give each its own log.
    started: Cell<u32>,
}

impl Fixture {
    /// No image file; for in-memory disks.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Fixture {
            socket: dir.path().join("blk.sock"),
            image: dir.path().join("disk.img"),
            dir,
            started: Cell::new(0),
        }
    }

    /// With an image of `IMAGE_SIZE` bytes filled with the image pattern, so
    /// a read of a sector the daemon never wrote is recognisable.
    fn with_image() -> Self {
        let fixture = Self::new();
        fs::write(&fixture.image, image_pattern()).expect("create image");
        fixture
    }

    fn image_arg(&self) -> &str {
        self.image.to_str().expect("temp paths are UTF-8")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `hvisor-vhost blk` on the fixture's socket with `args` and
    /// waits until it listens.
    fn start(&self, args: &[&str]) -> Daemon {
        let started = self.started.get();
        self.started.set(started + 1);
        let mut daemon = Daemon::spawn(
            blk_command(&self.socket, args),
            &self.path(&format!("daemon-{started}.log")),
        );
        daemon.wait_for_path(&self.socket, TIMEOUT);
        daemon
    }

    fn image_contents(&self) -> Vec<u8> {
        fs::read(&self.image).expect("read image")
    }
}

fn blk_command(socket: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("blk")
        .arg("--socket-path")
        .arg(socket)
        .args(args)
        // Fixed, so a RUST_LOG in the caller's environment can't hide the
        // lines the tests look for.
        .env("RUST_LOG", "info");
    command
}

fn connect(socket: &Path, config: &DriverConfig) -> VhostUserDriver {
    VhostUserDriver::connect(socket, config).expect("connect to the daemon")
}

/// Pseudo-random bytes (xorshift64), a different stream for each seed, so
/// data in the wrong place, from another request or never written shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    // Any non-zero start works; the seed only has to change it.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

fn image_pattern() -> Vec<u8> {
    pattern(IMAGE_SIZE as usize, IMAGE_SEED)
}

fn byte_range(sector: u64, len: usize) -> std::ops::Range<usize> {
    let start = (sector * SECTOR_SIZE) as usize;
    start..start + len
}

/// One discard or write-zeroes range: (sector, sectors, flags).
type RangeSegment = (u64, u32, u32);

/// One `struct virtio_blk_discard_write_zeroes`.
fn range_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut segment = [0u8; 16];
    segment[..8].copy_from_slice(&sector.to_le_bytes());
    segment[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    segment[12..].copy_from_slice(&flags.to_le_bytes());
    segment
}

fn status(used: &UsedBuffer) -> u8 {
    used.writable.last().expect("status buffer")[0]
}

/// Submits one request on `queue` and waits for its completion.
fn request(
    driver: &mut VhostUserDriver,
    queue: usize,
    readable: &[&[u8]],
    writable: &[u32],
) -> UsedBuffer {
    let head = driver
        .submit(queue, readable, writable)
        .expect("submit request");
    let used = driver
        .wait_used(queue, TIMEOUT)
        .expect("request completion");
    assert_eq!(used.head, head);
    used
}

/// Writes `data` at `sector`; returns the status byte.
fn write(driver: &mut VhostUserDriver, queue: usize, sector: u64, data: &[u8]) -> u8 {
    let used = request(
        driver,
        queue,
        &[&blk::header(VIRTIO_BLK_T_OUT, sector), data],
        &[1],
    );
    assert_eq!(used.len, 1, "a write reports only the status byte");
    status(&used)
}

/// Reads `len` bytes at `sector`, which must succeed.
fn read(driver: &mut VhostUserDriver, queue: usize, sector: u64, len: u32) -> Vec<u8> {
    let mut used = request(
        driver,
        queue,
        &[&blk::header(VIRTIO_BLK_T_IN, sector)],
        &[len, 1],
    );
    assert_eq!(status(&used), OK, "read of sector {sector}");
    assert_eq!(used.len, len + 1, "a read reports its data and status");
    used.writable.swap_remove(0)
}

fn flush(driver: &mut VhostUserDriver, queue: usize) -> u8 {
    status(&request(
        driver,
        queue,
        &[&blk::header(VIRTIO_BLK_T_FLUSH, 0)],
        &[1],
    ))
}

fn capacity_sectors(driver: &mut VhostUserDriver) -> u64 {
    let config = driver.get_config(0, 8).expect("GET_CONFIG capacity");
    u64::from_le_bytes(config.try_into().expect("8 bytes"))
}

fn le16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn le32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

/// Waits for the daemon to exit and asserts it exited with status 0.
fn assert_exits_cleanly(daemon: &mut Daemon, what: &str) {
    let status = daemon
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("{what}: daemon still running after {TIMEOUT:?}"));
    assert!(status.success(), "{what}: daemon exited with {status}");
}

#[test]
fn image_config_space_io_and_host_file() {
    let fixture = Fixture::with_image();
    let _daemon = fixture.start(&["--image", fixture.image_arg()]);
    let mut driver = connect(&fixture.socket, &DriverConfig::default());

    // Offsets in `struct virtio_blk_config` (virtio 1.2, 5.2.4).
    let config = driver.get_config(0, 60).expect("GET_CONFIG 0..60");
    assert_eq!(config.len(), 60);
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        IMAGE_SIZE / SECTOR_SIZE,
        "capacity"
    );
    assert_eq!(le32(&config, 8), 1 << 20, "size_max");
    assert_eq!(
        le32(&config, 12),
        256 - 2,
        "seg_max: queue size minus header and status"
    );
    assert_eq!(le32(&config, 20), 512, "blk_size");
    assert_eq!(config[32], 1, "writeback");
    assert_eq!(le16(&config, 34), 1, "num_queues");
    assert_eq!(config[56], 1, "write_zeroes_may_unmap");
    // Frontends that read single fields must get exactly those bytes.
    for (offset, len) in [(8, 4), (12, 4), (20, 4), (32, 1), (34, 2), (56, 1)] {
        let field = driver.get_config(offset, len).expect("GET_CONFIG field");
        let expected = &config[offset as usize..(offset + len) as usize];
        assert_eq!(field, expected, "GET_CONFIG({offset}, {len})");
    }

    let sector = 8;
    let data = pattern(64 << 10, 0x5c);
    assert_eq!(write(&mut driver, 0, sector, &data), OK);
    assert!(
        read(&mut driver, 0, sector, data.len() as u32) == data,
        "read back differs from written"
    );
    assert!(
        read(&mut driver, 0, 0, 4096) == image_pattern()[..4096],
        "sectors never written must hold the image's own bytes"
    );
    assert_eq!(flush(&mut driver, 0), OK);
    driver.disconnect();

    let mut expected = image_pattern();
    expected[byte_range(sector, data.len())].copy_from_slice(&data);
    assert!(
        fixture.image_contents() == expected,
        "image file differs from what was written"
    );
}

/// QEMU with `reconnect=1` and a rebooting guest both come back on the same
/// socket, with a fresh device set-up each time.
#[test]
fn reconnect_to_the_same_daemon_keeps_the_disk() {
    let fixture = Fixture::with_image();
    let mut daemon = fixture.start(&["--image", fixture.image_arg()]);
    let mut expected = image_pattern();
    const CHUNK: usize = 8 << 10;
    let chunk_sector = |round: u64| round * (CHUNK as u64 / SECTOR_SIZE);

    // A different ring set-up on each connection, so state the daemon keeps
    // from the previous frontend (EVENT_IDX, ring size, last avail index)
    // shows up as a hang or a wrong completion.
    let setups = [
        (false, false, 256),
        (true, true, 16),
        (false, true, 64),
        (true, false, 256),
    ];
    for (round, (event_idx, indirect, queue_size)) in (0u64..).zip(setups) {
        let config = DriverConfig {
            event_idx,
            indirect,
            queue_size,
            ..DriverConfig::default()
        };
        let mut driver = connect(&fixture.socket, &config);
        for earlier in 0..round {
            let range = byte_range(chunk_sector(earlier), CHUNK);
            assert!(
                read(&mut driver, 0, chunk_sector(earlier), CHUNK as u32) == expected[range],
                "connection {round}: data of connection {earlier} lost"
            );
        }
        let data = pattern(CHUNK, round as u8 * 16);
        assert_eq!(write(&mut driver, 0, chunk_sector(round), &data), OK);
        expected[byte_range(chunk_sector(round), CHUNK)].copy_from_slice(&data);
        driver.disconnect();
    }
    assert!(
        daemon.wait_exit(Duration::ZERO).is_none(),
        "one daemon process serves every connection"
    );
    assert!(fixture.image_contents() == expected);
}

/// Many small requests through a 16-entry ring in every combination of
/// EVENT_IDX and indirect descriptors: the indices wrap several times, kicks
/// and calls go through the suppression logic, and heads are recycled. A
/// daemon per combination, so this does not depend on reconnects working.
#[test]
fn ring_wrap_with_event_idx_and_indirect() {
    for (event_idx, indirect) in [(true, true), (false, false), (true, false), (false, true)] {
        let fixture = Fixture::with_image();
        let _daemon = fixture.start(&["--image", fixture.image_arg()]);
        let config = DriverConfig {
            queue_size: 16,
            event_idx,
            indirect,
            ..DriverConfig::default()
        };
        let mut driver = connect(&fixture.socket, &config);
        ring_wrap_round(&mut driver, &fixture.image)
            .unwrap_or_else(|e| panic!("event_idx={event_idx} indirect={indirect}: {e}"));
    }
}

fn ring_wrap_round(driver: &mut VhostUserDriver, image: &Path) -> Result<(), String> {
    const REQUESTS: u64 = 100;
    // Five 3-descriptor chains fill 15 of the 16 entries without indirect.
    const MAX_IN_FLIGHT: usize = 5;
    const LEN: usize = 4096;
    let sectors_per_request = LEN as u64 / SECTOR_SIZE;
    let data = |request: u64| pattern(LEN, request as u8);
    let mut notifies = 0;

    let mut next = 0;
    for _ in 0..REQUESTS {
        // Top the queue up and notify once, as a guest driver under load does.
        while next < REQUESTS && driver.in_flight(0).unwrap() < MAX_IN_FLIGHT {
            let header = blk::header(VIRTIO_BLK_T_OUT, next * sectors_per_request);
            driver
                .enqueue(0, &[&header, &data(next)], &[1])
                .map_err(|e| format!("enqueue write: {e}"))?;
            next += 1;
        }
        driver.notify(0).unwrap();
        notifies += 1;
        let used = driver
            .wait_used(0, TIMEOUT)
            .map_err(|e| format!("write: {e}"))?;
        if status(&used) != OK {
            return Err(format!("write status {}", status(&used)));
        }
    }
    if driver.in_flight(0).unwrap() != 0 {
        return Err("writes still in flight".into());
    }

    for request in 0..REQUESTS {
        let header = blk::header(VIRTIO_BLK_T_IN, request * sectors_per_request);
        driver
            .submit(0, &[&header], &[LEN as u32, 1])
            .map_err(|e| format!("submit read: {e}"))?;
        notifies += 1;
        let used = driver
            .wait_used(0, TIMEOUT)
            .map_err(|e| format!("read: {e}"))?;
        if status(&used) != OK || used.writable[0] != data(request) {
            return Err(format!("request {request} read back wrong"));
        }
    }

    // No check that calls > 0: the driver counts calls only when it sleeps,
    // and a daemon that always completes before the driver looks never makes
    // it sleep. A missing call is caught by `wait_used` as MissedInterrupt.
    let stats = driver.stats(0).unwrap();
    if stats.kicks + stats.suppressed_kicks != notifies || stats.kicks == 0 {
        return Err(format!("{notifies} notifies gave {stats:?}"));
    }
    let image = fs::read(image).unwrap();
    for request in 0..REQUESTS {
        if image[byte_range(request * sectors_per_request, LEN)] != data(request) {
            return Err(format!("image differs at request {request}"));
        }
    }
    Ok(())
}

#[test]
fn offers_the_documented_features() {
    let read_write = Fixture::new();
    let read_only = Fixture::new();
    let _read_write_daemon = read_write.start(&["--size", "1M"]);
    let _read_only_daemon = read_only.start(&["--size", "1M", "--readonly"]);

    let expected_features = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |bits, bit| bits | 1 << bit,
    );
    let expected_protocol = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;

    for (fixture, ro) in [(&read_write, 0), (&read_only, 1 << VIRTIO_BLK_F_RO)] {
        let driver = connect(&fixture.socket, &DriverConfig::default());
        // Exact, so a feature offered but not documented fails too.
        assert_eq!(
            driver.offered_features(),
            expected_features | ro,
            "offered {:#x}",
            driver.offered_features()
        );
        assert_eq!(driver.offered_protocol_features(), expected_protocol);
    }
}

#[test]
fn readonly_refuses_writes_and_leaves_the_image_alone() {
    let fixture = Fixture::with_image();
    let _daemon = fixture.start(&["--image", fixture.image_arg(), "--readonly"]);
    let config = DriverConfig {
        device_features: 1 << VIRTIO_BLK_F_RO
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES,
        ..DriverConfig::default()
    };
    let mut driver = connect(&fixture.socket, &config);
    assert_ne!(driver.acked_features() & 1 << VIRTIO_BLK_F_RO, 0);

    assert_eq!(write(&mut driver, 0, 0, &[0u8; 4096]), IOERR);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let used = request(
            &mut driver,
            0,
            &[&blk::header(request_type, 0), &range_segment(0, 8, 0)],
            &[1],
        );
        assert_eq!(status(&used), IOERR, "request type {request_type}");
    }
    // Reads and flushes still work on a read-only disk.
    assert!(read(&mut driver, 0, 0, 4096) == image_pattern()[..4096]);
    assert_eq!(flush(&mut driver, 0), OK);
    driver.disconnect();
    assert!(fixture.image_contents() == image_pattern());
}

#[test]
fn get_id_discard_and_write_zeroes() {
    const SERIAL: &str = "hvisor-disk-0042";
    let fixture = Fixture::with_image();
    let _daemon = fixture.start(&["--image", fixture.image_arg(), "--serial", SERIAL]);
    let config = DriverConfig {
        device_features: 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES,
        ..DriverConfig::default()
    };
    let mut driver = connect(&fixture.socket, &config);

    let used = request(
        &mut driver,
        0,
        &[&blk::header(VIRTIO_BLK_T_GET_ID, 0)],
        &[20, 1],
    );
    assert_eq!(status(&used), OK);
    let mut id = SERIAL.as_bytes().to_vec();
    id.resize(20, 0);
    assert_eq!(used.writable[0], id, "the serial, NUL padded to 20 bytes");

    // Both operations with one and with several segments, write-zeroes with
    // and without UNMAP.
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let requests: [(u32, &[RangeSegment]); 4] = [
        (VIRTIO_BLK_T_DISCARD, &[(16, 8, 0)]),
        (VIRTIO_BLK_T_DISCARD, &[(30, 1, 0), (33, 2, 0)]),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(40, 16, unmap)]),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(61, 3, 0), (70, 1, unmap)]),
    ];
    let mut expected = image_pattern();
    for (request_type, segments) in requests {
        let ranges: Vec<u8> = segments
            .iter()
            .flat_map(|&(sector, sectors, flags)| range_segment(sector, sectors, flags))
            .collect();
        let used = request(
            &mut driver,
            0,
            &[&blk::header(request_type, 0), &ranges],
            &[1],
        );
        assert_eq!(status(&used), OK, "type {request_type} {segments:?}");
        for &(sector, sectors, _) in segments {
            expected[byte_range(sector, sectors as usize * SECTOR_SIZE as usize)].fill(0);
        }
    }
    // Covers every range above and the untouched sectors around them.
    let len = 128 * SECTOR_SIZE as usize;
    assert!(
        read(&mut driver, 0, 0, len as u32) == expected[..len],
        "zeroed ranges read back wrong through the queue"
    );
    driver.disconnect();
    assert!(
        fixture.image_contents() == expected,
        "zeroed ranges wrong in the image file"
    );
}

#[test]
fn two_queues_serve_interleaved_io() {
    let fixture = Fixture::new();
    let _daemon = fixture.start(&["--size", "1M", "--num-queues", "2"]);
    let config = DriverConfig {
        num_queues: 2,
        device_features: 1 << VIRTIO_BLK_F_MQ,
        ..DriverConfig::default()
    };
    let mut driver = connect(&fixture.socket, &config);
    assert_eq!(driver.get_config(34, 2).unwrap(), 2u16.to_le_bytes());

    const CHUNKS: u64 = 8;
    const LEN: usize = 16 << 10;
    let sector = |chunk: u64| chunk * (LEN as u64 / SECTOR_SIZE);
    let data = |chunk: u64| pattern(LEN, chunk as u8 * 8 + 1);
    // Both queues hold requests at once; chunk n goes through queue n % 2.
    for chunk in 0..CHUNKS {
        let queue = (chunk % 2) as usize;
        let header = blk::header(VIRTIO_BLK_T_OUT, sector(chunk));
        driver
            .enqueue(queue, &[&header, &data(chunk)], &[1])
            .unwrap();
    }
    for queue in 0..2 {
        driver.notify(queue).unwrap();
    }
    for chunk in 0..CHUNKS {
        let used = driver.wait_used((chunk % 2) as usize, TIMEOUT).unwrap();
        assert_eq!(status(&used), OK, "write of chunk {chunk}");
    }
    // Read each chunk through the other queue: one disk behind both.
    for chunk in 0..CHUNKS {
        let queue = ((chunk + 1) % 2) as usize;
        assert!(
            read(&mut driver, queue, sector(chunk), LEN as u32) == data(chunk),
            "chunk {chunk} through queue {queue}"
        );
    }
}

#[test]
fn in_memory_disk_sizes() {
    let default_size = Fixture::new();
    let one_mebibyte = Fixture::new();
    let _default_daemon = default_size.start(&[]);
    let _small_daemon = one_mebibyte.start(&["--size", "1M"]);

    let mut driver = connect(&default_size.socket, &DriverConfig::default());
    assert_eq!(capacity_sectors(&mut driver), (256 << 20) / SECTOR_SIZE);

    let mut driver = connect(&one_mebibyte.socket, &DriverConfig::default());
    assert_eq!(capacity_sectors(&mut driver), 2048);
    // A fresh in-memory disk reads as zeroes and keeps what is written,
    // up to its last sector and not beyond.
    assert!(read(&mut driver, 0, 0, 4096) == [0u8; 4096]);
    let data = pattern(512, 7);
    assert_eq!(write(&mut driver, 0, 2047, &data), OK);
    assert_eq!(read(&mut driver, 0, 2047, 512), data);
    assert_eq!(write(&mut driver, 0, 2048, &data), IOERR);
}

#[test]
fn bad_start_up_input_is_named_and_fatal() {
    let fixture = Fixture::new();
    let missing_dir = fixture.path("missing");
    let image_dir = fixture.path("image-dir");
    let empty = fixture.path("empty.img");
    let odd_size = fixture.path("odd.img");
    let not_found = fixture.path("not-found.img");
    fs::create_dir(&image_dir).unwrap();
    fs::write(&empty, b"").unwrap();
    fs::write(&odd_size, [0u8; 1000]).unwrap();
    let path_arg = |path: &Path| path.to_str().expect("temp paths are UTF-8").to_owned();
    let serial = "s".repeat(21);

    // (socket, extra arguments, text a stderr line must contain)
    let cases: Vec<(PathBuf, Vec<String>, String)> = vec![
        (missing_dir.join("blk.sock"), vec![], path_arg(&missing_dir)),
        (
            fixture.path("1.sock"),
            vec!["--image".into(), path_arg(&not_found)],
            path_arg(&not_found),
        ),
        (
            fixture.path("2.sock"),
            vec!["--image".into(), path_arg(&image_dir)],
            path_arg(&image_dir),
        ),
        (
            fixture.path("3.sock"),
            vec!["--image".into(), path_arg(&empty)],
            path_arg(&empty),
        ),
        (
            fixture.path("4.sock"),
            vec!["--image".into(), path_arg(&odd_size)],
            format!("{} is 1000 bytes", path_arg(&odd_size)),
        ),
        (
            fixture.path("5.sock"),
            vec!["--serial".into(), serial.clone()],
            format!("serial {serial:?}"),
        ),
        (
            fixture.path("6.sock"),
            vec!["--num-queues".into(), "0".into()],
            "num-queues 0".into(),
        ),
        (
            fixture.path("7.sock"),
            vec!["--queue-size".into(), "100".into()],
            "queue-size 100".into(),
        ),
    ];

    // All at once: each should fail at start-up, so the test takes as long
    // as the slowest, not the sum.
    let mut daemons: Vec<Daemon> = cases
        .iter()
        .enumerate()
        .map(|(i, (socket, args, _))| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Daemon::spawn(
                blk_command(socket, &args),
                &fixture.path(&format!("case-{i}.log")),
            )
        })
        .collect();
    for ((socket, args, named), daemon) in cases.iter().zip(&mut daemons) {
        let status = daemon
            .wait_exit(TIMEOUT)
            .unwrap_or_else(|| panic!("{args:?}: still running after {TIMEOUT:?}"));
        assert_eq!(status.code(), Some(1), "{args:?}: exit status");
        let log = daemon.log();
        assert!(
            log.lines().any(|line| line.contains(named.as_str())),
            "{args:?}: no line names {named:?} in:\n{log}"
        );
        assert!(!socket.exists(), "{args:?}: socket file left behind");
    }
}

#[test]
fn sigterm_stops_cleanly_idle_and_with_a_frontend() {
    let idle = Fixture::new();
    let mut daemon = idle.start(&["--size", "1M"]);
    daemon.signal(libc::SIGTERM);
    assert_exits_cleanly(&mut daemon, "SIGTERM while idle");
    assert!(!idle.socket.exists(), "socket file left behind");

    // With a frontend connected, the connection is closed and the data the
    // frontend wrote reaches the image.
    let connected = Fixture::with_image();
    let mut daemon = connected.start(&["--image", connected.image_arg()]);
    let mut driver = connect(&connected.socket, &DriverConfig::default());
    let data = pattern(8192, 0x11);
    assert_eq!(write(&mut driver, 0, 4, &data), OK);
    daemon.signal(libc::SIGTERM);
    assert_exits_cleanly(&mut daemon, "SIGTERM with a frontend connected");
    assert!(!connected.socket.exists(), "socket file left behind");
    let mut expected = image_pattern();
    expected[byte_range(4, data.len())].copy_from_slice(&data);
    assert!(connected.image_contents() == expected);
}

#[test]
fn sigint_stops_cleanly_when_idle() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start(&["--size", "1M"]);
    daemon.signal(libc::SIGINT);
    assert_exits_cleanly(&mut daemon, "SIGINT while idle");
    assert!(!fixture.socket.exists(), "socket file left behind");
}

#[test]
fn flushed_data_survives_a_daemon_restart() {
    let fixture = Fixture::with_image();
    let mut daemon = fixture.start(&["--image", fixture.image_arg()]);
    let mut driver = connect(&fixture.socket, &DriverConfig::default());
    let data = pattern(32 << 10, 0x77);
    assert_eq!(write(&mut driver, 0, 100, &data), OK);
    assert_eq!(flush(&mut driver, 0), OK);

    daemon.signal(libc::SIGKILL);
    let status = daemon.wait_exit(TIMEOUT).expect("SIGKILL ends the daemon");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    drop(driver);

    // The killed daemon's socket file is still there; the new one must
    // replace it, and the driver retries until it does.
    let _daemon = fixture.start(&["--image", fixture.image_arg()]);
    let mut driver = connect(&fixture.socket, &DriverConfig::default());
    assert!(
        read(&mut driver, 0, 100, data.len() as u32) == data,
        "flushed data lost across a restart"
    );
    assert!(read(&mut driver, 0, 0, 4096) == image_pattern()[..4096]);
}

/// Heads marked in flight in queue `queue`'s part of an inflight region of `queue_size`-entry
/// queues (vhost-user specification: 16-byte header, 16-byte entries whose first byte is the
/// mark, queue regions 64-byte aligned).
fn marked_in_flight(region: &fs::File, queue: usize, queue_size: u16) -> usize {
    let stride = (16 + 16 * usize::from(queue_size)).next_multiple_of(64);
    let mut bytes = vec![0u8; stride];
    region
        .read_exact_at(&mut bytes, (queue * stride) as u64)
        .expect("read the inflight region");
    (0..usize::from(queue_size))
        .filter(|&head| bytes[16 + 16 * head] != 0)
        .count()
}

/// The requests of one batch of [`sigkill_mid_flight_completes_every_request_exactly_once`].
struct KillBatch {
    /// Per queue: head -> chunk. Even chunks are writes, odd ones reads of sectors no write of
    /// the batch touches.
    requests: Vec<HashMap<u16, u64>>,
    /// Every chunk of the batch.
    chunks: Vec<u64>,
    /// Each queue's used index before the batch.
    used_before: Vec<u16>,
}

impl KillBatch {
    const QUEUES: usize = 2;
    const PER_QUEUE: u64 = 48;
    const LEN: usize = 64 << 10;
    const IMAGE_LEN: usize = 16 << 20;

    fn sector(chunk: u64) -> u64 {
        chunk * (Self::LEN as u64 / SECTOR_SIZE) % (Self::IMAGE_LEN as u64 / SECTOR_SIZE)
    }

    fn data(chunk: u64) -> Vec<u8> {
        pattern(Self::LEN, chunk as u8 ^ 0x5a)
    }

    /// Batch `number`'s requests on both queues, kicked.
    fn submit(driver: &mut VhostUserDriver, number: u64) -> Self {
        let used_before = (0..Self::QUEUES)
            .map(|queue| driver.device_used_idx(queue).unwrap())
            .collect();
        let mut requests = vec![HashMap::new(); Self::QUEUES];
        let mut chunks = Vec::new();
        for index in 0..Self::PER_QUEUE {
            for (queue, heads) in requests.iter_mut().enumerate() {
                let chunk = (number * Self::QUEUES as u64 + queue as u64) * Self::PER_QUEUE + index;
                let head = if chunk % 2 == 0 {
                    let header = blk::header(VIRTIO_BLK_T_OUT, Self::sector(chunk));
                    driver.enqueue(queue, &[&header, &Self::data(chunk)], &[1])
                } else {
                    let header = blk::header(VIRTIO_BLK_T_IN, Self::sector(chunk));
                    driver.enqueue(queue, &[&header], &[Self::LEN as u32, 1])
                };
                heads.insert(head.expect("enqueue"), chunk);
                chunks.push(chunk);
            }
        }
        for queue in 0..Self::QUEUES {
            driver.notify(queue).unwrap();
        }
        KillBatch {
            requests,
            chunks,
            used_before,
        }
    }

    /// Requests of the batch the device has answered, per queue.
    fn answered(&self, driver: &VhostUserDriver) -> Vec<u16> {
        (0..Self::QUEUES)
            .map(|queue| {
                let used = driver.device_used_idx(queue).unwrap();
                used.wrapping_sub(self.used_before[queue])
            })
            .collect()
    }

    /// Takes every answer still owed, checking that each request comes back once, OK, and that
    /// reads return `image`; then applies the batch's writes to `image`.
    fn complete(mut self, driver: &mut VhostUserDriver, image: &mut [u8]) {
        for (queue, heads) in self.requests.iter_mut().enumerate() {
            while !heads.is_empty() {
                let used = driver
                    .wait_used(queue, TIMEOUT)
                    .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
                let chunk = heads.remove(&used.head).expect("a head in flight");
                assert_eq!(status(&used), OK, "chunk {chunk}");
                if chunk % 2 == 1 {
                    let range = byte_range(Self::sector(chunk), Self::LEN);
                    assert!(
                        used.writable[0] == image[range],
                        "chunk {chunk}: read returned the wrong data"
                    );
                }
            }
            assert!(
                driver.poll_used(queue).unwrap().is_none(),
                "queue {queue}: a request came back twice"
            );
        }
        for &chunk in self.chunks.iter().filter(|&&chunk| chunk % 2 == 0) {
            image[byte_range(Self::sector(chunk), Self::LEN)].copy_from_slice(&Self::data(chunk));
        }
    }
}

/// SIGKILL while requests are in flight on both queues of an O_DIRECT image (io_uring: they
/// complete out of order), at three moments: while the daemon is still taking the requests,
/// once all are in flight, once completions have started. The restarted daemon, given the
/// inflight region the frontend kept, resubmits them without being kicked, and every request
/// completes exactly once, with the right data in guest memory and in the image.
#[test]
fn sigkill_mid_flight_completes_every_request_exactly_once() {
    let fixture = Fixture::new();
    let mut expected = pattern(KillBatch::IMAGE_LEN, IMAGE_SEED);
    fs::write(&fixture.image, &expected).expect("create image");
    let args = [
        "--image",
        fixture.image_arg(),
        "--direct",
        "--num-queues",
        "2",
    ];
    let config = DriverConfig {
        num_queues: KillBatch::QUEUES,
        mem_size: 64 << 20,
        device_features: 1 << VIRTIO_BLK_F_MQ,
        protocol_features: default_protocol_features() | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        ..DriverConfig::default()
    };
    let mut daemon = fixture.start(&args);
    let mut driver = connect(&fixture.socket, &config);
    let region = driver
        .inflight_file()
        .expect("INFLIGHT_SHMFD negotiated")
        .try_clone()
        .unwrap();
    let marked = |queue| marked_in_flight(&region, queue, config.queue_size);
    let mut number = 0;
    for moment in 0..3 {
        // Completions come in bursts: a batch that finishes before the moment is seen, or
        // before the kill lands, is taken as it is, and the next one tried.
        loop {
            assert!(
                number < 40,
                "moment {moment} never caught in {number} batches"
            );
            let batch = KillBatch::submit(&mut driver, number);
            number += 1;
            let deadline = Instant::now() + TIMEOUT;
            let reached = loop {
                let marked: Vec<usize> = (0..KillBatch::QUEUES).map(marked).collect();
                let answered = batch.answered(&driver);
                let reached = match moment {
                    0 => marked.iter().any(|&n| n > 0),
                    1 => marked.iter().all(|&n| n == KillBatch::PER_QUEUE as usize),
                    _ => (0..KillBatch::QUEUES).any(|q| answered[q] > 0 && marked[q] > 0),
                };
                let over = answered
                    .iter()
                    .all(|&n| u64::from(n) == KillBatch::PER_QUEUE);
                if reached || over {
                    break reached;
                }
                assert!(Instant::now() < deadline, "batch {number} never completed");
            };
            if !reached {
                batch.complete(&mut driver, &mut expected);
                continue;
            }
            daemon.signal(libc::SIGKILL);
            daemon.wait_exit(TIMEOUT).expect("SIGKILL ends the daemon");
            let in_flight: Vec<usize> = (0..KillBatch::QUEUES).map(marked).collect();
            eprintln!(
                "moment {moment}: killed with {in_flight:?} requests in flight and {:?} \
                 answered per queue",
                batch.answered(&driver)
            );
            daemon = fixture.start(&args);
            driver
                .reconnect(&fixture.socket, &config)
                .expect("reconnect");
            batch.complete(&mut driver, &mut expected);
            if in_flight.iter().sum::<usize>() > 0 {
                break;
            }
        }
    }
    assert_eq!(flush(&mut driver, 0), OK);
    assert!(
        fixture.image_contents() == expected,
        "image differs from what was written"
    );
}
