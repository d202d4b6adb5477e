//! A hypervisor side that hands the daemon binary a crafted hello (docs/hypervisor-socket.md)
//! and reports what came back: a reply or none, the exit status, and the daemon's log.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use hvisor_transport::handoff::{self, PROTOCOL, VERSION};
use serde_json::{Value, json};

use super::daemon::{Daemon, assert_one_error};

/// Bound of every wait for the daemon.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The zone and RAM window of [`config`].
pub const ZONE: u32 = 1;
pub const ZONE0_IPA: u64 = 0x5000_0000;
pub const RAM_SIZE: u64 = 0x20_0000;

/// A `virtio_cfg.json` with one rng device in [`ZONE`], whose RAM is [`RAM_SIZE`] bytes at
/// [`ZONE0_IPA`].
pub fn config(dir: &Path) -> PathBuf {
    let path = dir.join("virtio_cfg.json");
    let config = json!({"zones": [{
        "id": ZONE,
        "memory_region": [{
            "zone0_ipa": format!("{ZONE0_IPA:#x}"),
            "zonex_ipa": "0x40000000",
            "size": format!("{RAM_SIZE:#x}"),
        }],
        "devices": [{"type": "rng", "addr": "0xa003c00", "len": "0x200", "irq": 78,
                     "status": "enable"}],
    }]});
    std::fs::write(&path, config.to_string()).expect("writing the configuration");
    path
}

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> File {
    // SAFETY: the name is NUL terminated; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"handoff-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("sizing the memfd");
    file
}

/// A hello with the given descriptor positions and windows.
pub fn hello(bridge_fd: usize, wakeup_fd: usize, windows: Value) -> Value {
    json!({
        "protocol": PROTOCOL, "version": VERSION,
        "bridge_fd": bridge_fd, "wakeup_fd": wakeup_fd, "windows": windows,
    })
}

/// The window [`config`] needs, in descriptor `fd` at `offset`, declared `size` bytes long.
pub fn window(fd: usize, offset: u64, size: u64) -> Value {
    json!({"zone": ZONE, "zone0_ipa": ZONE0_IPA, "size": size, "fd": fd, "offset": offset})
}

/// What the daemon did with a hello.
pub struct Outcome {
    /// The socket the daemon attached to; its messages must name it.
    pub socket: PathBuf,
    pub replied: bool,
    pub status: ExitStatus,
    pub log: String,
}

impl Outcome {
    /// The daemon refused before replying, exited with status 1 (not a signal), and said why
    /// in one error line, its last, that names the socket and contains every one of `parts`.
    pub fn assert_refused(&self, parts: &[&str]) {
        assert!(
            !self.replied,
            "the daemon replied before refusing; status {}, log:\n{}",
            self.status, self.log
        );
        let socket = self.socket.display().to_string();
        assert_one_error(
            self.status,
            &self.log,
            &[&[socket.as_str()], parts].concat(),
        );
    }
}

/// Starts the daemon on [`config`], hands it `body` with `fds` attached, and hangs up after its
/// reply (which stops a daemon that accepted).
pub fn hand_over(body: &Value, fds: &[RawFd]) -> Outcome {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("hv.sock");
    let listener = UnixListener::bind(&socket).expect("binding the hypervisor socket");
    listener.set_nonblocking(true).expect("non-blocking accept");
    let mut command = Command::new(env!("CARGO_BIN_EXE_hvisor-vhost"));
    command
        .args(["hvisor", "--config"])
        .arg(config(dir.path()))
        .arg("--hypervisor-socket")
        .arg(&socket)
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn(command, &dir.path().join("daemon.log"));
    let deadline = Instant::now() + TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    daemon.wait_exit(Duration::ZERO).is_none(),
                    "the daemon exited before connecting:\n{}",
                    daemon.log()
                );
                assert!(Instant::now() < deadline, "the daemon did not connect");
                thread::sleep(Duration::from_millis(5));
            }
            Err(error) => panic!("accept: {error}"),
        }
    };
    stream.set_nonblocking(false).expect("blocking stream");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    handoff::send(&stream, body, fds).expect("sending the hello");
    let replied = match handoff::receive::<Value>(&stream) {
        Ok(_) => true,
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => false,
        Err(error) => panic!("waiting for the reply: {error}\n{}", daemon.log()),
    };
    drop(stream);
    let status = daemon
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("the daemon did not exit:\n{}", daemon.log()));
    Outcome {
        socket,
        replied,
        status,
        log: daemon.log(),
    }
}
