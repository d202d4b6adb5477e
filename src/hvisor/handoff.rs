//! The hand-off protocol between a hypervisor played by another process and the daemon
//! (specified in docs/hypervisor-socket.md): each side sends one framed JSON message with file
//! descriptors attached.
//!
//! Frame: a 4-byte little-endian length, then that many bytes of UTF-8 JSON. The descriptors
//! travel as SCM_RIGHTS ancillary data with the frame's first bytes; JSON fields name them by
//! their position in that list.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const PROTOCOL: &str = "hvisor-vhost-handoff";
pub const VERSION: u32 = 1;
/// Largest JSON body accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The kernel's limit of descriptors in one message (SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// One zone RAM window: guest RAM of `zone` that root Linux sees at `zone0_ipa`, shared as
/// `size` bytes of descriptor `fd` starting at byte `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamWindow {
    pub zone: u32,
    pub zone0_ipa: u64,
    pub size: u64,
    pub fd: usize,
    #[serde(default)]
    pub offset: u64,
}

/// Hypervisor to daemon: the bridge page, the wake-up eventfd, and the RAM windows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypervisorHello {
    pub protocol: String,
    pub version: u32,
    pub bridge_fd: usize,
    pub wakeup_fd: usize,
    pub windows: Vec<RamWindow>,
}

impl HypervisorHello {
    pub fn new(bridge_fd: usize, wakeup_fd: usize, windows: Vec<RamWindow>) -> Self {
        HypervisorHello {
            protocol: PROTOCOL.into(),
            version: VERSION,
            bridge_fd,
            wakeup_fd,
            windows,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        check_header(&self.protocol, self.version)
    }
}

/// Daemon to hypervisor: the eventfd the daemon signals instead of the FINISH_REQ hypercall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonReply {
    pub protocol: String,
    pub version: u32,
    pub finish_fd: usize,
}

impl DaemonReply {
    pub fn new(finish_fd: usize) -> Self {
        DaemonReply {
            protocol: PROTOCOL.into(),
            version: VERSION,
            finish_fd,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        check_header(&self.protocol, self.version)
    }
}

fn check_header(protocol: &str, version: u32) -> Result<(), String> {
    if protocol != PROTOCOL {
        return Err(format!("protocol is {protocol:?}, expected {PROTOCOL:?}"));
    }
    if version != VERSION {
        return Err(format!(
            "protocol version {version} is not the supported {VERSION}"
        ));
    }
    Ok(())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Sends `message` with `fds` attached (sending a closed descriptor fails with EBADF).
pub fn send<T: Serialize>(stream: &UnixStream, message: &T, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(|error| invalid(error.to_string()))?;
    if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(invalid(format!(
            "message of {} bytes with {} descriptors is too large",
            body.len(),
            fds.len()
        )));
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let sent = stream
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    (&*stream).write_all(&frame[sent..])
}

/// Receives one message and the descriptors that came with it (each `Some` until taken).
pub fn receive<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<(T, Vec<Option<File>>)> {
    let mut buffer = vec![0u8; 4 + MAX_MESSAGE];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iovec = [libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    }];
    // SAFETY: the iovec covers exactly `buffer`, which is alive and writable for the call.
    let (mut received, fd_count) = unsafe { stream.recv_with_fds(&mut iovec, &mut raw) }
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    let files: Vec<Option<File>> = raw[..fd_count]
        .iter()
        // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
        .map(|&fd| Some(unsafe { File::from_raw_fd(fd) }))
        .collect();
    if received == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed before its message",
        ));
    }
    while received < 4 {
        received += read_some(stream, &mut buffer[received..4])?;
    }
    let length = u32::from_le_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
    if length > MAX_MESSAGE {
        return Err(invalid(format!(
            "message length {length} exceeds {MAX_MESSAGE}"
        )));
    }
    while received < 4 + length {
        received += read_some(stream, &mut buffer[received..4 + length])?;
    }
    let message = serde_json::from_slice(&buffer[4..4 + length])
        .map_err(|error| invalid(error.to_string()))?;
    Ok((message, files))
}

fn read_some(stream: &UnixStream, into: &mut [u8]) -> io::Result<usize> {
    match (&*stream).read(into)? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed mid-message",
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn messages_and_descriptors_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        (&file).write_all(b"shared").unwrap();
        let hello = HypervisorHello::new(
            0,
            0,
            vec![RamWindow {
                zone: 1,
                zone0_ipa: 0x5000_0000,
                size: 0x1000,
                fd: 0,
                offset: 0,
            }],
        );
        send(&a, &hello, &[file.as_raw_fd()]).unwrap();
        let (received, mut files): (HypervisorHello, _) = receive(&b).unwrap();
        assert_eq!(received, hello);
        assert!(received.check().is_ok());
        let mut shared = files[0].take().unwrap();
        let mut text = String::new();
        use std::io::Seek;
        shared.rewind().unwrap();
        shared.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared");
    }

    #[test]
    fn bad_messages_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&8u32.to_le_bytes()).unwrap();
        (&a).write_all(b"not json").unwrap();
        assert!(receive::<DaemonReply>(&b).is_err());
        drop(a);
        assert_eq!(
            receive::<DaemonReply>(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let wrong = DaemonReply {
            protocol: "other".into(),
            version: VERSION,
            finish_fd: 0,
        };
        assert!(wrong.check().unwrap_err().contains("other"));
        let future = DaemonReply {
            version: 2,
            ..DaemonReply::new(0)
        };
        assert!(future.check().unwrap_err().contains("version 2"));
    }
}
