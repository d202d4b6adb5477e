//! Small helpers the nested test needs inside L1 and L2, where only busybox is available: a
//! client for the daemon's console socket, a way to create a persistent TAP, and the two ends
//! of a guest-to-host vsock stream (busybox has no vsock).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
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

/// In a guest: connects to vsock `--cid` (default 2, the host) port `--port`, retrying until
/// the connection is accepted or `--timeout` (default 60 s) passes, sends `--file` and waits
/// until the peer closes the connection, which says everything sent has been taken (a
/// half-close would not do: vhost-device-vsock does not pass it on to its Unix socket).
pub fn vsock_send(args: &Args) -> Result<()> {
    let cid: u32 = args.number("cid")?.unwrap_or(libc::VMADDR_CID_HOST);
    let port: u32 = args.number("port")?.ok_or("--port is required")?;
    let payload = std::fs::read(args.require("file")?)?;
    let timeout = Duration::from_secs(args.number("timeout")?.unwrap_or(60));
    let started = Instant::now();
    let mut stream = loop {
        match vsock_connect(cid, port) {
            Ok(stream) => break stream,
            Err(_) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(200)),
            Err(error) => return Err(format!("vsock {cid}:{port}: {error}").into()),
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&payload)?;
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        // A close on the host side may reach the guest as a reset.
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => {
            return Err(format!("vsock {cid}:{port}: waiting for the peer to close: {e}").into());
        }
    }
    eprintln!(
        "[vsock-send] {cid}:{port}: {} bytes sent in {:.2?}",
        payload.len(),
        started.elapsed()
    );
    Ok(())
}

/// A connected AF_VSOCK stream socket. Held as a `UnixStream`, whose read, write and shutdown
/// are the plain socket calls, valid on any connected stream socket.
fn vsock_connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    // SAFETY: creates a socket; no pointers involved.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; family, cid and port are set below.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = cid;
    address.svm_port = port;
    // SAFETY: `address` is a sockaddr_vm of the size given, alive for the call.
    let connected = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if connected < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// Listens on the Unix socket `--socket`, takes one connection within `--timeout` (default
/// 300 s) and writes what it sends into `--out` until `--bytes` have arrived (or the peer
/// closes); then closes the connection.
pub fn unix_sink(args: &Args) -> Result<()> {
    let path = args.require("socket")?;
    let out_path = args.require("out")?;
    let expected: u64 = args.number("bytes")?.ok_or("--bytes is required")?;
    let timeout = Duration::from_secs(args.number("timeout")?.unwrap_or(300));
    let listener = UnixListener::bind(path).map_err(|e| format!("{path}: {e}"))?;
    let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
    wait_readable(&listener, secs).map_err(|e| format!("{path}: no connection: {e}"))?;
    let (stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(timeout))?;
    let mut out = std::fs::File::create(out_path).map_err(|e| format!("{out_path}: {e}"))?;
    let received =
        io::copy(&mut (&stream).take(expected), &mut out).map_err(|e| format!("{path}: {e}"))?;
    eprintln!("[unix-sink] {path}: {received} of {expected} bytes received");
    Ok(())
}
