//! qemu-storage-daemon exporting a fresh raw image as vhost-user-blk: a vhost-user backend we
//! did not write (QEMU's libvhost-user underneath). Tests skip, saying why, on machines without
//! it.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::daemon::Daemon;

pub const QSD: &str = "qemu-storage-daemon";

/// A qemu-storage-daemon serving one image on one socket; killed on drop.
pub struct StorageDaemon {
    pub socket: PathBuf,
    pub image: PathBuf,
    _daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl StorageDaemon {
    /// Starts the daemon over a zeroed image of `image_size` bytes and waits until its socket
    /// listens, or returns `None` (after saying why) when it is not installed, so machines
    /// without QEMU skip rather than fail.
    pub fn start(image_size: u64) -> Option<Self> {
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
        let socket = dir.path().join("vhost-user-blk.sock");
        File::create(&image)
            .and_then(|f| f.set_len(image_size))
            .expect("create image");
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
        let mut daemon = Daemon::spawn(command, &dir.path().join("qsd.log"));
        daemon.wait_for_path(&socket, Duration::from_secs(10));
        Some(StorageDaemon {
            socket,
            image,
            _daemon: daemon,
            _dir: dir,
        })
    }
}
