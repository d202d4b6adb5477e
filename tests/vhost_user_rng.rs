//! The `hvisor-vhost rng` binary driven over its real vhost-user socket by the VM-less
//! frontend in `support::frontend`: what a source file holds is what the guest's buffers get,
//! byte for byte and in order, and `--rate-limit` holds the device to its rate.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hvisor_vhost_rng::backend::{MAX_REQUEST_BYTES, QUEUE_SIZE};
use support::daemon::Daemon;
use support::frontend::{DriverConfig, POISON_BYTE, VhostUserDriver};

const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");
/// Bound on every wait for the daemon.
const TIMEOUT: Duration = Duration::from_secs(5);
const REQUESTQ: usize = 0;

/// Starts `hvisor-vhost rng` with `args` in `dir` and connects a driver with `mem_size` bytes
/// of guest RAM.
fn start(dir: &Path, args: &[&str], mem_size: u64) -> (Daemon, VhostUserDriver) {
    let (daemon, socket) = Daemon::serve(BINARY, "rng", dir, args, TIMEOUT);
    let config = DriverConfig {
        queue_size: QUEUE_SIZE,
        mem_size,
        ..DriverConfig::default()
    };
    let driver = VhostUserDriver::connect(&socket, &config).expect("connect to the daemon");
    (daemon, driver)
}

/// One request of device-writable `buffers`; returns the bytes the device reported and
/// checks that it wrote nothing beyond them.
fn request(driver: &mut VhostUserDriver, buffers: &[u32]) -> Vec<u8> {
    driver
        .submit(REQUESTQ, &[], buffers)
        .expect("submit a request");
    let used = driver
        .wait_used(REQUESTQ, TIMEOUT)
        .expect("request completed");
    let all = used.writable.concat();
    let (filled, rest) = all.split_at(used.len as usize);
    assert!(
        rest.iter().all(|&b| b == POISON_BYTE),
        "the device wrote beyond the {} bytes it reported",
        used.len
    );
    filled.to_vec()
}

/// Bytes that differ with position (not a multiple of 256 apart), so a skipped or repeated
/// piece of the file shows.
fn file_pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
        .collect()
}

#[test]
fn a_source_file_fills_buffers_with_its_bytes_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("entropy.bin");
    let content = file_pattern(150_000);
    std::fs::write(&source, &content).expect("write the source file");
    let (mut daemon, mut driver) = start(
        dir.path(),
        &["--source", source.to_str().expect("UTF-8 temp path")],
        16 << 20,
    );
    let max = MAX_REQUEST_BYTES as u32;
    let mut offset = 0;
    // (buffers of the request, bytes it must get): a single buffer, a chain of three, a buffer
    // beyond the per-request maximum, then the file's end: a short request, and nothing.
    let requests: [(&[u32], usize); 6] = [
        (&[4096], 4096),
        (&[1000, 3000, 96], 4096),
        (&[max + 4096], max as usize),
        (&[max], max as usize),
        (&[max], 150_000 - 8192 - 2 * max as usize),
        (&[4096], 0),
    ];
    for (buffers, expected) in requests {
        let filled = request(&mut driver, buffers);
        assert_eq!(filled.len(), expected, "request of {buffers:?} at {offset}");
        assert!(
            filled[..] == content[offset..offset + expected],
            "request of {buffers:?}: not the file's bytes at {offset}"
        );
        offset += expected;
    }
    assert_eq!(offset, content.len());
    drop(driver);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(TIMEOUT).expect("daemon exits");
    assert!(status.success(), "exit status {status}");
}

/// Issue 12 item 13 over a real connection: a frontend moves the avail index a ring and 8
/// entries ahead and kicks, then leaves. The worker used to spin on it for good, so the
/// next frontend was never served and SIGTERM was ignored. Now the queue is stopped and
/// reported, the next frontend is served, and SIGTERM ends the daemon at once.
#[test]
fn a_broken_ring_stops_its_queue_and_the_daemon_serves_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut daemon, socket) = Daemon::serve(BINARY, "rng", dir.path(), &[], TIMEOUT);
    let config = DriverConfig {
        queue_size: QUEUE_SIZE,
        event_idx: true,
        ..DriverConfig::default()
    };
    let mut driver = VhostUserDriver::connect(&socket, &config).expect("connect");
    assert_eq!(request(&mut driver, &[64]).len(), 64);
    driver
        .break_avail_idx(REQUESTQ, QUEUE_SIZE + 8)
        .expect("break the ring");
    driver.kick(REQUESTQ).expect("kick");
    // Leaving before the device saw the kick would prove nothing; the log is checked at the
    // end (a daemon stuck on the ring fails the checks below first).
    let policy = "stays stopped until the frontend starts it again";
    let deadline = Instant::now() + TIMEOUT;
    while !daemon.log().contains(policy) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    driver.disconnect();

    // Bounded, as a daemon still stuck on the old connection never answers.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let served = VhostUserDriver::connect(&socket, &config)
            .map(|mut next| request(&mut next, &[64]).len());
        let _ = sender.send(served.map_err(|error| error.to_string()));
    });
    let served = receiver
        .recv_timeout(TIMEOUT)
        .expect("the next frontend is served");
    assert_eq!(served, Ok(64));

    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(2))
        .expect("SIGTERM ends the daemon");
    assert!(status.success(), "exit status {status}");
    let log = daemon.log();
    let fault = format!(
        "avail index {} is {} entries ahead",
        1 + QUEUE_SIZE + 8,
        QUEUE_SIZE + 8
    );
    assert_eq!(log.matches(&fault).count(), 1, "{log}");
    assert_eq!(log.matches(policy).count(), 1, "{log}");
}

#[test]
fn the_default_source_fills_every_buffer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_daemon, mut driver) = start(dir.path(), &[], 64 << 20);
    const IN_FLIGHT: usize = 16;
    const REQUESTS: usize = 256;
    let len = MAX_REQUEST_BYTES as u32;
    let started = Instant::now();
    for _ in 0..IN_FLIGHT {
        driver.submit(REQUESTQ, &[], &[len]).expect("submit");
    }
    let mut previous: Option<Vec<u8>> = None;
    for completed in 0..REQUESTS {
        let used = driver.wait_used(REQUESTQ, TIMEOUT).expect("completed");
        assert_eq!(used.len, len, "request {completed} filled short");
        assert!(
            previous.as_ref() != Some(&used.writable[0]),
            "two requests got the same bytes"
        );
        previous = Some(used.writable[0].clone());
        if completed + IN_FLIGHT < REQUESTS {
            driver.submit(REQUESTQ, &[], &[len]).expect("submit");
        }
    }
    let bytes = REQUESTS as f64 * f64::from(len);
    println!(
        "/dev/urandom through vhost-user: {:.1} MB/s ({REQUESTS} requests of {len} bytes)",
        bytes / started.elapsed().as_secs_f64() / 1e6
    );
}

#[test]
fn a_rate_limit_holds_the_device_to_its_rate() {
    const RATE: u64 = 20_000;
    const BURST: u64 = 2_000;
    /// One second's worth beyond the burst: at least 1 s at the limit.
    const WANTED: u64 = BURST + RATE;
    const BUFFER: u32 = 1024;
    let dir = tempfile::tempdir().expect("temp dir");
    let (_daemon, mut driver) = start(
        dir.path(),
        &[
            "--rate-limit",
            &RATE.to_string(),
            "--burst",
            &BURST.to_string(),
        ],
        16 << 20,
    );
    let started = Instant::now();
    for _ in 0..4 {
        driver.submit(REQUESTQ, &[], &[BUFFER]).expect("submit");
    }
    let mut received = 0u64;
    while received < WANTED {
        let used = driver
            .wait_used(REQUESTQ, TIMEOUT)
            .unwrap_or_else(|e| panic!("{received} of {WANTED} bytes, then: {e}"));
        assert!(u64::from(used.len) <= BURST, "{} bytes at once", used.len);
        received += u64::from(used.len);
        driver.submit(REQUESTQ, &[], &[BUFFER]).expect("submit");
    }
    let elapsed = started.elapsed();
    let rate = received as f64 / elapsed.as_secs_f64();
    println!(
        "rate limit {RATE} B/s, burst {BURST}: {received} bytes in {elapsed:.2?} = {rate:.0} B/s"
    );
    // The bucket lets through at most BURST + RATE * t bytes by time t.
    let least = Duration::from_secs_f64((received - BURST) as f64 / RATE as f64);
    assert!(
        elapsed >= least.mul_f64(0.95),
        "{received} bytes in {elapsed:?}: faster than {RATE} B/s after a {BURST}-byte burst"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "{received} bytes took {elapsed:?} at {RATE} B/s"
    );
}
