//! qemu-storage-daemon exporting a fresh raw image as vhost-user-blk: a vhost-user backend we
//! did not write (QEMU's libvhost-user underneath). Tests skip, saying why, on machines without
//! it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::daemon::Daemon;

pub const QSD: &str = "qemu-storage-daemon";

/// A qemu-storage-daemon serving one image on one socket; killed on drop.
pub struct StorageDaemon {
    pub socket: PathBuf,
    pub image: PathBuf,
    daemon: Daemon,
    /// Daemons started so far, which names each one's log.
    started: u32,
    dir: tempfile::TempDir,
}

impl StorageDaemon {
    /// Starts the daemon over a zeroed image of `image_size` bytes and waits until its socket
    /// listens, or returns `None` (after saying why) when it is not installed, so machines
    /// without QEMU skip rather than fail.
    pub fn start(image_size: u64) -> Option<Self> {
        Self::start_on(image_size, "vhost-user-blk.sock")
    }

    /// [`Self::start`] on a socket named `socket_name`, which the log checks of tests running
    /// in parallel tell apart.
    pub fn start_on(image_size: u64, socket_name: &str) -> Option<Self> {
        if Command::new(QSD)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            // Written to the real stderr, not through the test harness's capture, so the skip
            // is visible in a normal `cargo test` run.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {QSD} is not installed (Debian package qemu-utils)"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        let socket = dir.path().join(socket_name);
        File::create(&image)
            .and_then(|f| f.set_len(image_size))
            .expect("create image");
        let daemon = serve(&image, &socket, &dir.path().join("qsd.log"));
        Some(StorageDaemon {
            socket,
            image,
            daemon,
            started: 1,
            dir,
        })
    }

    /// Kills the daemon (SIGKILL, so it leaves whatever it was doing) and starts another on the
    /// same socket and image, returning once it listens.
    pub fn restart(&mut self) {
        self.daemon.signal(libc::SIGKILL);
        self.daemon
            .wait_exit(Duration::from_secs(10))
            .expect("SIGKILL ends qemu-storage-daemon");
        self.started += 1;
        let log = self.dir.path().join(format!("qsd{}.log", self.started));
        self.daemon = serve(&self.image, &self.socket, &log);
    }
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `socket` (which it replaces if a
/// previous daemon left it), logging to `log`; returns once the socket listens.
fn serve(image: &Path, socket: &Path, log: &Path) -> Daemon {
    let mut command = Command::new(QSD);
    command
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},aio=threads",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ));
    let mut daemon = Daemon::spawn(command, log);
    daemon.wait_for_path(socket, Duration::from_secs(10));
    daemon
}
