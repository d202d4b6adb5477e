//! The `hvisor-vhost console` binary driven over its real vhost-user socket by the VM-less
//! frontend in `support::frontend`, with the test playing both the guest (receiveq 0,
//! transmitq 1) and the host-side user (a client of `--unix-socket`, or the `--pty` slave).
//! What is checked is the device's promise: no byte lost, duplicated or reordered in either
//! direction, guest output held back (not dropped) while nobody listens.

mod support;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use hvisor_vhost_console::backend::{BACKLOG_LIMIT, QUEUE_SIZE};
use support::daemon::Daemon;
use support::frontend::{DriverConfig, DriverError, VhostUserDriver};

const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");
/// Bound on every wait for the daemon or the client.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long the test watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);
const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;
/// Receive buffers the driver keeps posted while it collects input.
const RX_POSTED: usize = 4;
const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;

/// A console daemon, the driver connected to it, and the temp directory of its sockets and log.
struct Console {
    daemon: Daemon,
    driver: VhostUserDriver,
    _dir: tempfile::TempDir,
}

impl Console {
    /// Starts `hvisor-vhost console` with `args` (the host side) in `dir` and connects the
    /// driver.
    fn start(dir: tempfile::TempDir, args: &[&str]) -> Console {
        let socket = dir.path().join("vhost.sock");
        let mut command = Command::new(BINARY);
        command
            .arg("console")
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "info");
        let mut daemon = Daemon::spawn(command, &dir.path().join("daemon.log"));
        daemon.wait_for_path(&socket, TIMEOUT);
        let config = DriverConfig {
            num_queues: 2,
            queue_size: QUEUE_SIZE,
            ..DriverConfig::default()
        };
        let driver = VhostUserDriver::connect(&socket, &config).expect("connect to the daemon");
        Console {
            daemon,
            driver,
            _dir: dir,
        }
    }

    /// With the console served on a Unix socket; returns the socket's path too.
    fn on_socket() -> (Console, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("console.sock");
        let arg = path.to_str().expect("temp paths are UTF-8").to_owned();
        (Console::start(dir, &["--unix-socket", &arg]), path)
    }

    /// Sends `chunks` as one transmitq chain and waits until the device completed it.
    fn transmit(&mut self, chunks: &[&[u8]]) {
        self.driver
            .submit(TRANSMITQ, chunks, &[])
            .expect("submit a transmit chain");
        let used = self
            .driver
            .wait_used(TRANSMITQ, TIMEOUT)
            .expect("transmit chain completed");
        assert_eq!(used.len, 0, "a transmit chain has nothing device-writable");
    }

    /// Keeps receive buffers of `buffer_len` posted and collects input until `len` bytes
    /// arrived; fails on a timeout or on more input than `len`.
    fn receive(&mut self, len: usize, buffer_len: u32) -> Vec<u8> {
        let mut received = Vec::with_capacity(len);
        while received.len() < len {
            while self.driver.in_flight(RECEIVEQ).expect("receiveq") < RX_POSTED {
                self.driver
                    .submit(RECEIVEQ, &[], &[buffer_len])
                    .expect("post a receive buffer");
            }
            let used = self
                .driver
                .wait_used(RECEIVEQ, TIMEOUT)
                .unwrap_or_else(|e| {
                    panic!("{} of {len} bytes received, then: {e}", received.len())
                });
            assert!(used.len <= buffer_len, "used length beyond the buffer");
            received.extend_from_slice(&used.writable[0][..used.len as usize]);
        }
        assert_eq!(received.len(), len, "more input arrived than was sent");
        received
    }

    /// Asserts that no posted receive buffer is used within [`QUIET`].
    fn assert_no_input(&mut self) {
        if self.driver.in_flight(RECEIVEQ).expect("receiveq") == 0 {
            self.driver
                .submit(RECEIVEQ, &[], &[4096])
                .expect("post a receive buffer");
        }
        match self.driver.wait_used(RECEIVEQ, QUIET) {
            Err(DriverError::Timeout { .. }) => {}
            Ok(used) => panic!(
                "unexpected input: {:?}",
                String::from_utf8_lossy(&used.writable[0][..used.len as usize])
            ),
            Err(e) => panic!("receiveq: {e}"),
        }
    }
}

/// A client of the console socket whose reads fail after [`TIMEOUT`] instead of hanging.
fn client(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).expect("connect to the console socket");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    stream
}

fn read_exactly(stream: &mut impl Read, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    stream
        .read_exact(&mut data)
        .unwrap_or_else(|e| panic!("reading {len} bytes from the console's host side: {e}"));
    data
}

/// Bytes that differ with `seed` and position, so a lost, repeated or reordered piece shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(131)
                .wrapping_add(u32::from(seed) << 3) as u8
                ^ (i >> 8) as u8
        })
        .collect()
}

#[test]
fn guest_output_reaches_the_client_and_client_input_fills_receive_buffers() {
    let (mut console, path) = Console::on_socket();
    assert_eq!(
        console.driver.offered_features() & VIRTIO_CONSOLE_F_SIZE,
        0,
        "a socket has no terminal size to report"
    );
    let mut client = client(&path);

    // One chain of several buffers, then a chain larger than the device's read chunk.
    let parts = [pattern(10, 1), pattern(3000, 2), pattern(1, 3)];
    console.transmit(&[&parts[0], &parts[1], &parts[2]]);
    assert_eq!(read_exactly(&mut client, 3011), parts.concat());
    let big = pattern(20_000, 4);
    console.transmit(&[&big]);
    assert!(
        read_exactly(&mut client, big.len()) == big,
        "20000-byte chain"
    );

    // Input spread over buffers smaller than what the client wrote.
    let input = pattern(10_000, 5);
    client.write_all(&input).expect("client writes");
    assert!(console.receive(input.len(), 512) == input, "input differs");
    console.assert_no_input();
    console.daemon.signal(libc::SIGTERM);
    let status = console.daemon.wait_exit(TIMEOUT).expect("daemon exits");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn input_written_before_buffers_are_posted_is_delivered_once() {
    let (mut console, path) = Console::on_socket();
    let mut client = client(&path);
    let input = pattern(10_000, 6);
    client.write_all(&input).expect("client writes");
    // Long enough for the daemon to accept the client and see its input pending.
    thread::sleep(QUIET);
    assert_eq!(console.driver.in_flight(RECEIVEQ).unwrap(), 0);
    assert!(console.receive(input.len(), 4096) == input, "input differs");
    console.assert_no_input();
    // Input keeps flowing after that.
    client.write_all(b"and more").expect("client writes");
    assert_eq!(console.receive(8, 4096), b"and more");
}

#[test]
fn a_chain_larger_than_the_backlog_waits_for_a_client_and_arrives_whole() {
    let (mut console, path) = Console::on_socket();
    let output = pattern(BACKLOG_LIMIT + 1000, 9);
    console
        .driver
        .submit(TRANSMITQ, &[&output], &[])
        .expect("submit a transmit chain");
    match console.driver.wait_used(TRANSMITQ, QUIET) {
        Err(DriverError::Timeout { .. }) => {}
        other => panic!("a chain beyond the {BACKLOG_LIMIT}-byte backlog completed: {other:?}"),
    }
    let mut client = client(&path);
    assert!(
        read_exactly(&mut client, output.len()) == output,
        "output differs"
    );
    let used = console
        .driver
        .wait_used(TRANSMITQ, TIMEOUT)
        .expect("the chain completes once the client read it");
    assert_eq!(used.len, 0);
}

#[test]
fn output_without_a_client_is_held_up_to_the_backlog_then_back_pressures() {
    let (mut console, path) = Console::on_socket();
    const CHAIN: usize = 4096;
    let held_chains = BACKLOG_LIMIT / CHAIN;
    let chains = held_chains + 4;
    let output = pattern(chains * CHAIN, 7);
    for chunk in output.chunks(CHAIN) {
        console
            .driver
            .submit(TRANSMITQ, &[chunk], &[])
            .expect("submit a transmit chain");
    }
    for n in 0..held_chains {
        console
            .driver
            .wait_used(TRANSMITQ, TIMEOUT)
            .unwrap_or_else(|e| panic!("chain {n} of the backlog's {held_chains}: {e}"));
    }
    match console.driver.wait_used(TRANSMITQ, QUIET) {
        Err(DriverError::Timeout { .. }) => {}
        other => panic!("a chain beyond the {BACKLOG_LIMIT}-byte backlog completed: {other:?}"),
    }
    assert_eq!(
        console.driver.in_flight(TRANSMITQ).unwrap(),
        chains - held_chains
    );

    // A client that reads takes everything, in order, and the held chains complete.
    let mut client = client(&path);
    assert!(
        read_exactly(&mut client, output.len()) == output,
        "output differs"
    );
    for _ in held_chains..chains {
        console
            .driver
            .wait_used(TRANSMITQ, TIMEOUT)
            .expect("held chain completes once the client read");
    }
    assert_eq!(console.driver.in_flight(TRANSMITQ).unwrap(), 0);
    client.set_read_timeout(Some(QUIET)).expect("read timeout");
    let mut extra = [0u8; 1];
    assert!(
        client.read(&mut extra).is_err(),
        "a byte arrived after all the output"
    );
}

#[test]
fn a_client_can_leave_and_another_take_its_place() {
    let (mut console, path) = Console::on_socket();
    let mut first = client(&path);
    first.write_all(b"from the first").expect("client writes");
    assert_eq!(console.receive(14, 64), b"from the first");
    console.transmit(&[b"to the first"]);
    assert_eq!(read_exactly(&mut first, 12), b"to the first");
    drop(first);

    // With a receive buffer posted the daemon watches the client, so it sees the hang-up; the
    // output that follows waits for the next client, whichever way the daemon learns of it.
    console
        .driver
        .submit(RECEIVEQ, &[], &[64])
        .expect("post a receive buffer");
    thread::sleep(QUIET);
    console.transmit(&[b"while nobody listens"]);

    let mut second = client(&path);
    assert_eq!(read_exactly(&mut second, 20), b"while nobody listens");
    second.write_all(b"from the second").expect("client writes");
    assert_eq!(console.receive(15, 64), b"from the second");
    console.transmit(&[b"to the second"]);
    assert_eq!(read_exactly(&mut second, 13), b"to the second");
}

/// Waits for the `console: PATH` line the daemon prints on stdout for a PTY.
fn pty_path(console: &Console) -> PathBuf {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(path) = console
            .daemon
            .log()
            .lines()
            .find_map(|line| line.strip_prefix("console: "))
        {
            return PathBuf::from(path.trim());
        }
        assert!(
            Instant::now() < deadline,
            "no `console: PATH` line within {TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads exactly `len` bytes from the non-blocking `file`, waiting at most [`TIMEOUT`].
fn read_pty(file: &mut File, len: usize) -> Vec<u8> {
    let deadline = Instant::now() + TIMEOUT;
    let mut data = Vec::with_capacity(len);
    let mut buf = [0u8; 4096];
    while data.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} of {len} bytes from the PTY",
            data.len()
        );
        let mut poll = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll` is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&raw mut poll, 1, left.as_millis() as libc::c_int) };
        match file.read(&mut buf[..(len - data.len()).min(4096)]) {
            Ok(read) => data.extend_from_slice(&buf[..read]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the PTY: {e}"),
        }
    }
    data
}

#[test]
fn pty_console_moves_bytes_both_ways() {
    let mut console = Console::start(tempfile::tempdir().expect("temp dir"), &["--pty"]);
    let path = pty_path(&console);
    assert!(path.starts_with("/dev/pts"), "{}", path.display());
    assert_ne!(
        console.driver.offered_features() & VIRTIO_CONSOLE_F_SIZE,
        0,
        "a PTY has a size to report"
    );
    let config = console.driver.get_config(0, 12).expect("GET_CONFIG");
    let le16 = |at: usize| u16::from_le_bytes([config[at], config[at + 1]]);
    assert!(
        le16(0) > 0 && le16(2) > 0,
        "cols {} rows {}",
        le16(0),
        le16(2)
    );
    assert_eq!(config[4..8], 1u32.to_le_bytes(), "max_nr_ports");

    let mut pty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // Guest output is the slave's input, which the raw terminal passes unchanged.
    let output: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    console.transmit(&[&output]);
    assert!(
        read_pty(&mut pty, output.len()) == output,
        "guest output differs"
    );
    // The slave's output is processed (ONLCR turns a newline into CR LF): no newline here.
    let input = pattern(2000, 8)
        .into_iter()
        .map(|b| if b == b'\n' { b'.' } else { b })
        .collect::<Vec<u8>>();
    pty.write_all(&input).expect("writing the PTY");
    assert!(console.receive(input.len(), 256) == input, "input differs");
}
