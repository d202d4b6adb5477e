//! A relay between a vhost-user frontend and vhost-user-backend's request handler.
//!
//! QEMU's virtio-net sends SET_VRING_ENABLE when it attaches its peer, before the driver has
//! negotiated features and so before SET_FEATURES; it sends it again when it starts the device.
//! vhost-user-backend 0.24 refuses SET_VRING_ENABLE until PROTOCOL_FEATURES was acked by
//! SET_FEATURES and drops the connection. The relay answers such an early message itself
//! (when an answer is asked for), keeps the latest state it asked for each ring, and replays
//! those right after forwarding SET_FEATURES — QEMU does not repeat them. It also answers the
//! inflight-tracking messages the crate refuses (see `inflight_relay`). Every other message,
//! with its file descriptors, passes through unchanged, and replies flow back byte for byte.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight_relay::InflightRelay;

const SET_FEATURES: u32 = 2;
const RESET_OWNER: u32 = 4;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const HEADER_SIZE: usize = 12;
/// Far above any vhost-user message (the largest, a memory table, is about 1 KiB).
const MAX_PAYLOAD: usize = 64 * 1024;
/// More than any message carries (a memory table has at most 8 regions).
const MAX_FDS: usize = 32;

/// Relays between `frontend` and `backend` until either side closes; `inflight` when the device
/// tracks in-flight requests.
pub fn relay(
    frontend: UnixStream,
    backend: UnixStream,
    inflight: Option<InflightRelay>,
) -> io::Result<()> {
    let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
    let backend_reader = backend.try_clone()?;
    let replies = {
        let frontend_writer = frontend_writer.clone();
        let frontend = frontend.try_clone()?;
        std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || {
                let result = copy_replies(backend_reader, &frontend_writer);
                // The backend is gone: make the request side stop too.
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                result
            })?
    };
    let result = forward_requests(&frontend, &backend, &frontend_writer, inflight);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let replies = replies
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the reply relay panicked")));
    result.and(replies)
}

fn copy_replies(mut backend: UnixStream, frontend: &Mutex<UnixStream>) -> io::Result<()> {
    let mut buffer = vec![0u8; MAX_PAYLOAD];
    loop {
        let read = match backend.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        lock(frontend).write_all(&buffer[..read])?;
    }
}

/// A reply to `request` carrying `payload`.
fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(HEADER_SIZE + payload.len());
    reply.extend_from_slice(&request.to_le_bytes());
    reply.extend_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
    reply.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    reply.extend_from_slice(payload);
    reply
}

/// Sends `bytes` to `stream`, with `fds` attached to the first part.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = stream
        .send_with_fds(&[bytes], fds)
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    (&*stream).write_all(&bytes[sent..])
}

fn lock(stream: &Mutex<UnixStream>) -> std::sync::MutexGuard<'_, UnixStream> {
    stream
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One message from the frontend: its header words, payload and descriptors.
struct Message {
    request: u32,
    flags: u32,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Reads one message; `None` when the frontend closed between messages.
fn read_message(frontend: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_SIZE];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iovec = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec covers exactly `header`, alive and writable for the call.
    let (received, fd_count) = unsafe { frontend.recv_with_fds(&mut iovec, &mut raw_fds) }
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..fd_count]
        .iter()
        // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if received == 0 {
        return Ok(None);
    }
    (&*frontend).read_exact(&mut header[received..])?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user request {request} announces a payload of {size} bytes"),
        ));
    }
    let mut bytes = header.to_vec();
    bytes.resize(HEADER_SIZE + size, 0);
    (&*frontend).read_exact(&mut bytes[HEADER_SIZE..])?;
    Ok(Some(Message {
        request,
        flags,
        bytes,
        fds,
    }))
}

fn forward_requests(
    frontend: &UnixStream,
    backend: &UnixStream,
    frontend_writer: &Mutex<UnixStream>,
    mut inflight: Option<InflightRelay>,
) -> io::Result<()> {
    let mut features_set = false;
    // Early SET_VRING_ENABLE messages by ring index, the latest one of each ring.
    let mut early_enables: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    while let Some(mut message) = read_message(frontend)? {
        if let Some(inflight) = inflight.as_mut() {
            let payload = &message.bytes[HEADER_SIZE..];
            if inflight.intercepts(message.request) {
                let needs_reply = message.flags & NEED_REPLY != 0;
                let fds = std::mem::take(&mut message.fds);
                if let Some(answer) = inflight.answer(message.request, needs_reply, payload, fds) {
                    let fds: Vec<RawFd> = answer.fd.iter().map(|fd| fd.as_raw_fd()).collect();
                    let bytes = reply(message.request, &answer.payload);
                    send_with_fds(&lock(frontend_writer), &bytes, &fds)?;
                }
                continue;
            }
            inflight.observe(message.request, payload);
        }
        match message.request {
            SET_FEATURES => features_set = true,
            RESET_OWNER | RESET_DEVICE => {
                features_set = false;
                early_enables.clear();
            }
            SET_VRING_ENABLE if !features_set => {
                debug!("SET_VRING_ENABLE before SET_FEATURES: answered here, replayed later");
                let needs_reply = message.flags & NEED_REPLY != 0;
                // The replay must not ask the backend for a reply nobody reads.
                message.bytes[4..8].copy_from_slice(&(message.flags & !NEED_REPLY).to_le_bytes());
                let index = message
                    .bytes
                    .get(HEADER_SIZE..HEADER_SIZE + 4)
                    .map_or(0, |word| {
                        u32::from_le_bytes(word.try_into().expect("4 bytes"))
                    });
                early_enables.insert(index, message.bytes);
                if needs_reply {
                    lock(frontend_writer)
                        .write_all(&reply(SET_VRING_ENABLE, &0u64.to_le_bytes()))?;
                }
                continue;
            }
            _ => {}
        }
        let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_with_fds(backend, &message.bytes, &raw)?;
        if message.request == SET_FEATURES {
            for (_, enable) in std::mem::take(&mut early_enables) {
                (&*backend).write_all(&enable)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = request.to_le_bytes().to_vec();
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn early_vring_enable_is_answered_and_the_rest_passes_through_with_fds() {
        let (mut frontend, relay_frontend) = UnixStream::pair().unwrap();
        let (relay_backend, mut backend) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || relay(relay_frontend, relay_backend, None));

        // An early SET_VRING_ENABLE asking for a reply: answered with success, not forwarded.
        let enable = [0u8; 8];
        frontend
            .write_all(&message(SET_VRING_ENABLE, VERSION_1 | NEED_REPLY, &enable))
            .unwrap();
        let mut reply = [0u8; HEADER_SIZE + 8];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], SET_VRING_ENABLE.to_le_bytes());
        assert_eq!(reply[4..8], (VERSION_1 | REPLY).to_le_bytes());
        assert_eq!(reply[12..], 0u64.to_le_bytes());

        // SET_FEATURES passes and the early enable is replayed after it, without NEED_REPLY;
        // then a later SET_VRING_ENABLE passes as is, with a descriptor.
        let features = message(SET_FEATURES, VERSION_1, &1u64.to_le_bytes());
        frontend.write_all(&features).unwrap();
        let file = tempfile::tempfile().unwrap();
        let late_enable = message(SET_VRING_ENABLE, VERSION_1, &enable);
        frontend
            .send_with_fds(
                &[&late_enable[..]],
                &[std::os::fd::AsRawFd::as_raw_fd(&file)],
            )
            .unwrap();
        let mut received = vec![0u8; features.len()];
        backend.read_exact(&mut received).unwrap();
        assert_eq!(
            received, features,
            "the early SET_VRING_ENABLE must wait for SET_FEATURES"
        );
        let replayed = message(SET_VRING_ENABLE, VERSION_1, &enable);
        let mut received = vec![0u8; replayed.len()];
        backend.read_exact(&mut received).unwrap();
        assert_eq!(received, replayed);
        let mut received = vec![0u8; late_enable.len()];
        let mut raw_fds = [-1 as RawFd; 4];
        let mut iovec = [libc::iovec {
            iov_base: received.as_mut_ptr().cast(),
            iov_len: received.len(),
        }];
        // SAFETY: the iovec covers exactly `received`.
        let (_, fd_count) = unsafe { backend.recv_with_fds(&mut iovec, &mut raw_fds) }.unwrap();
        assert_eq!(received, late_enable);
        assert_eq!(fd_count, 1, "the descriptor was not relayed");
        // SAFETY: received through SCM_RIGHTS, ours alone.
        drop(unsafe { OwnedFd::from_raw_fd(raw_fds[0]) });

        // Replies come back unchanged.
        backend.write_all(b"reply bytes").unwrap();
        let mut back = [0u8; 11];
        frontend.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"reply bytes");

        drop(frontend);
        relay.join().unwrap().unwrap();
    }
}
