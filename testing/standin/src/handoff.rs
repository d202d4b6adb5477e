//! The hypervisor side of docs/hypervisor-socket.md: send the hello (bridge page, wake-up
//! eventfd and zone RAM windows as SCM_RIGHTS descriptors plus a length-prefixed JSON body)
//! and receive the daemon's reply carrying the FINISH eventfd.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde_json::{Value, json};

const PROTOCOL: &str = "hvisor-vhost-handoff";
const MAX_BODY: u32 = 1 << 20;

/// A zone RAM window as announced to the daemon.
pub struct Window<'a> {
    pub zone: u32,
    pub zone0_ipa: u64,
    pub size: u64,
    pub fd: &'a dyn AsRawFd,
}

/// Sends the hello: descriptor 0 = bridge, 1 = wake-up eventfd, then one per window.
pub fn send_hello(
    stream: &UnixStream,
    bridge: &dyn AsRawFd,
    wakeup: &dyn AsRawFd,
    windows: &[Window],
) -> io::Result<()> {
    let mut fds = vec![bridge.as_raw_fd(), wakeup.as_raw_fd()];
    let mut entries = Vec::new();
    for window in windows {
        entries.push(json!({
            "zone": window.zone,
            "zone0_ipa": window.zone0_ipa,
            "size": window.size,
            "fd": fds.len(),
            "offset": 0,
        }));
        fds.push(window.fd.as_raw_fd());
    }
    let body = json!({
        "protocol": PROTOCOL,
        "version": 1,
        "bridge_fd": 0,
        "wakeup_fd": 1,
        "windows": entries,
    })
    .to_string();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    send_with_fds(stream, &frame, &fds)
}

/// Reads the reply and returns the FINISH eventfd it carries.
pub fn receive_reply(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut received: Vec<OwnedFd> = Vec::new();
    let mut header = [0u8; 4];
    read_exact_collecting(stream, &mut header, &mut received)?;
    let len = u32::from_le_bytes(header);
    if len > MAX_BODY {
        return Err(invalid(format!("reply body of {len} bytes is too large")));
    }
    let mut body = vec![0u8; len as usize];
    read_exact_collecting(stream, &mut body, &mut received)?;
    let reply: Value = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("reply is not valid JSON: {e}")))?;
    if reply.get("protocol").and_then(Value::as_str) != Some(PROTOCOL)
        || reply.get("version").and_then(Value::as_u64) != Some(1)
    {
        return Err(invalid(format!("unexpected reply header: {reply}")));
    }
    let index = reply
        .get("finish_fd")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(format!("reply has no finish_fd: {reply}")))?;
    let count = received.len();
    received
        .into_iter()
        .nth(index as usize)
        .ok_or_else(|| invalid(format!("finish_fd {index} but {count} descriptor(s) came")))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message; the fields are filled below.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and
    // its data (payload bytes) fit; CMSG_FIRSTHDR/CMSG_DATA point inside it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&raw const message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(header).cast(), fds.len());
    }
    // SAFETY: `message` points at live buffers (iov, control) for the duration of the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const message, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptors went with the first byte; the rest of the frame, if the kernel took
    // only part of it, follows as plain data.
    let mut rest = &bytes[sent as usize..];
    while !rest.is_empty() {
        let n = io::Write::write(&mut &*stream, rest)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Fills `into` from the stream, keeping every descriptor that arrives on the way.
fn read_exact_collecting(
    stream: &UnixStream,
    into: &mut [u8],
    received: &mut Vec<OwnedFd>,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < into.len() {
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: into[filled..].as_mut_ptr().cast(),
            iov_len: into.len() - filled,
        };
        // SAFETY: an all-zero msghdr is a valid empty message; the fields are filled below.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `message` points at live buffers for the duration of the call.
        let got =
            unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut message, libc::MSG_CMSG_CLOEXEC) };
        if got < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        // SAFETY: walks the control messages the kernel wrote into `control`, using the
        // length it reported; each SCM_RIGHTS payload is an array of fresh descriptors that
        // now belong to us.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&raw const message);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_SOCKET
                    && (*header).cmsg_type == libc::SCM_RIGHTS
                {
                    let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(header).cast::<RawFd>();
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        received.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                header = libc::CMSG_NXTHDR(&raw const message, header);
            }
        }
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the socket during the hand-off",
            ));
        }
        filled += got as usize;
    }
    Ok(())
}

/// True while the daemon keeps its end open (it never sends anything after the reply, so
/// readable means EOF or an error).
pub fn peer_alive(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one live descriptor without blocking.
    let ready = unsafe { libc::poll(&raw mut poll, 1, 0) };
    if ready <= 0 {
        return true;
    }
    let mut probe = [0u8; 1];
    !matches!((&*stream).read(&mut probe), Ok(0) | Err(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{eventfd, memfd};

    /// Plays the daemon with the documented framing and checks what arrives.
    #[test]
    fn hello_carries_the_documented_fields_and_reply_yields_the_finish_fd() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let bridge = memfd("b", 4096).unwrap();
        let wakeup = eventfd().unwrap();
        let ram = memfd("r", 1 << 20).unwrap();
        let windows = [Window {
            zone: 1,
            zone0_ipa: 0x5000_0000,
            size: 1 << 20,
            fd: &ram,
        }];
        send_hello(&ours, &bridge, &wakeup, &windows).unwrap();

        let mut fds = Vec::new();
        let mut header = [0u8; 4];
        read_exact_collecting(&theirs, &mut header, &mut fds).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
        read_exact_collecting(&theirs, &mut body, &mut fds).unwrap();
        let hello: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(hello["protocol"], PROTOCOL);
        assert_eq!(hello["windows"][0]["fd"], 2);
        assert_eq!(hello["windows"][0]["zone0_ipa"], 0x5000_0000u64);
        assert_eq!(fds.len(), 3);
        let size = std::fs::File::from(fds.pop().unwrap())
            .metadata()
            .unwrap()
            .len();
        assert_eq!(size, 1 << 20);

        let finish = eventfd().unwrap();
        let reply = json!({"protocol": PROTOCOL, "version": 1, "finish_fd": 0}).to_string();
        let mut frame = (reply.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(reply.as_bytes());
        send_with_fds(&theirs, &frame, &[finish.as_raw_fd()]).unwrap();
        let got = receive_reply(&ours).unwrap();
        crate::bridge::signal_eventfd(&finish);
        assert!(crate::bridge::wait_eventfd(&got));
        assert!(peer_alive(&ours));
        drop(theirs);
        assert!(!peer_alive(&ours));
    }
}
