//! Small helpers the nested test needs inside L1, where only busybox is available: a client
//! for the daemon's console socket and a way to create a persistent TAP.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::Args;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Waits until `fd` is readable (for a listener: a connection is pending).
pub fn wait_readable(fd: &impl AsRawFd, timeout_secs: i32) -> io::Result<()> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: polls one live descriptor.
        let ready = unsafe { libc::poll(&raw mut poll, 1, timeout_secs.saturating_mul(1000)) };
        match ready {
            1.. => return Ok(()),
            0 => return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
}

/// Connects to the console socket (retrying until the daemon has created it), records every
/// byte the guest sends in `--out`, and sends `--send` once `--marker` has arrived, so the
/// guest's reader is known to be running. With `--ready FILE` it creates FILE when the marker
/// arrives, and with `--go FILE` it holds the payload back until FILE exists: that lets a
/// script start several guests' next step together. Ends when the daemon closes the socket.
pub fn console_peer(args: &Args) -> Result<()> {
    let path = args.require("socket")?;
    let marker = args.require("marker")?.as_bytes().to_vec();
    let payload = std::fs::read(args.require("send")?)?;
    let out_path = args.require("out")?;
    let ready = args.get("ready");
    let go = args.get("go").map(std::path::Path::new);
    let timeout = Duration::from_secs(args.number("timeout")?.unwrap_or(600));
    let started = Instant::now();

    let mut stream = loop {
        match UnixStream::connect(path) {
            Ok(stream) => break stream,
            Err(error) if started.elapsed() < Duration::from_secs(120) => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => return Err(format!("{path}: {error}").into()),
        }
    };
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut out = std::fs::File::create(out_path)?;
    let mut seen = Vec::new();
    let mut marker_seen = false;
    let mut sent = false;
    let mut chunk = [0u8; 4096];
    while started.elapsed() < timeout {
        if marker_seen && !sent && go.is_none_or(std::path::Path::exists) {
            stream.write_all(&payload)?;
            sent = true;
            eprintln!("[console-peer] {path}: sent {} bytes", payload.len());
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&chunk[..n])?;
                out.flush()?;
                seen.extend_from_slice(&chunk[..n]);
                if !marker_seen && seen.windows(marker.len()).any(|w| w == marker) {
                    marker_seen = true;
                    eprintln!("[console-peer] {path}: marker seen");
                    if let Some(ready) = ready {
                        std::fs::File::create(ready).map_err(|e| format!("{ready}: {e}"))?;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    eprintln!(
        "[console-peer] {path}: done: {} bytes received, payload {}",
        seen.len(),
        if sent {
            "sent"
        } else {
            "NOT sent (marker never arrived)"
        }
    );
    Ok(())
}

/// Creates TAP `name` (with the virtio-net header, as the daemon opens it) and makes it
/// persistent, since busybox `ip` cannot create TAPs.
pub fn make_tap(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("{name:?} is not a valid interface name").into());
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e} (is the tun module loaded?)"))?;
    // SAFETY: an all-zero ifreq is valid; the name and flags are filled in below.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and updates the ifreq, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(format!("TUNSETIFF {name}: {}", io::Error::last_os_error()).into());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1) } < 0 {
        return Err(format!("TUNSETPERSIST {name}: {}", io::Error::last_os_error()).into());
    }
    Ok(())
}
