//! A relay between a vhost-user frontend and vhost-user-backend's request handler.
//!
//! Every message from the frontend, with its file descriptors, passes through here before
//! vhost-user-backend sees it, and replies flow back byte for byte. The relay
//!
//! - holds messages against what was offered and what the device can do, and refuses the
//!   ones vhost-user-backend 0.24 would take (protocol features never offered, ring sizes
//!   that are not a power of two or too large, memory tables of more than 8 regions, memory
//!   slots beyond the 509 GET_MAX_MEM_SLOTS reports, regions not backed by their file) or
//!   would wait on forever (a payload size above the protocol's limit). A refusal is logged;
//!   it is answered with a failure when the frontend asked for a reply (REPLY_ACK), and
//!   otherwise ends the connection, as the frontend could not learn of it and would go on
//!   believing the request took effect;
//! - watches the memory files that may shrink under their mapping (see `memory_backing`)
//!   and ends the connection of a frontend that shrank one;
//! - works around an ordering QEMU uses: its virtio-net sends SET_VRING_ENABLE when it
//!   attaches its peer, before the driver has negotiated features and so before
//!   SET_FEATURES; it sends it again when it starts the device. vhost-user-backend 0.24
//!   refuses SET_VRING_ENABLE until PROTOCOL_FEATURES was acked by SET_FEATURES and drops the
//!   connection. The relay answers such an early message itself (when an answer is asked
//!   for), keeps the latest state it asked for each ring, and replays those right after
//!   forwarding SET_FEATURES — QEMU does not repeat them;
//! - answers GET_INFLIGHT_FD and SET_INFLIGHT_FD itself once INFLIGHT_SHMFD is acked, for
//!   devices that track in-flight requests (see `inflight_relay`): vhost-user-backend 0.24
//!   refuses both.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::{debug, error};
use vhost::vhost_user::message::{
    FrontendReq, MAX_MSG_SIZE, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight_relay::InflightRelay;
use crate::memory_backing::{FaultWatch, RegionFile, drain_fault_event};
use crate::wait_readable;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const HEADER_SIZE: usize = 12;
/// More than any message carries (a memory table has at most 8 regions).
const MAX_FDS: usize = 32;
/// Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS in the vhost-user spec).
const MAX_TABLE_REGIONS: usize = 8;
/// What vhost-user-backend 0.24 answers GET_MAX_MEM_SLOTS.
const MAX_MEM_SLOTS: usize = 509;
/// One memory region in SET_MEM_TABLE and ADD_MEM_REG: guest address, size, frontend
/// address, offset in the file.
const REGION_SIZE: usize = 32;

/// What the relay holds a frontend's messages against.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Virtio features the backend offers.
    pub features: u64,
    /// Protocol features the frontend is offered: the backend's, and REPLY_ACK, which vhost
    /// implements for every backend.
    pub protocol_features: u64,
    /// The largest ring the backend serves.
    pub max_queue_size: u32,
}

/// Relays between `frontend` and `backend` until either side closes, a refusal ends the
/// connection, or the frontend shrinks a memory file `faults` watches; `inflight` when the
/// device tracks in-flight requests.
pub fn relay(
    frontend: UnixStream,
    backend: UnixStream,
    policy: Policy,
    faults: Arc<FaultWatch>,
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
    let mut session = Session::new(policy, &faults, inflight);
    let reader = FrontendReader {
        stream: &frontend,
        faults: &faults,
    };
    let result = session.forward_requests(&reader, &backend, &frontend_writer);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let replies = replies
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the reply relay panicked")));
    result.and(replies)
}

fn copy_replies(mut backend: UnixStream, frontend: &Mutex<UnixStream>) -> io::Result<()> {
    let mut buffer = vec![0u8; HEADER_SIZE + MAX_MSG_SIZE];
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

fn lock(stream: &Mutex<UnixStream>) -> std::sync::MutexGuard<'_, UnixStream> {
    stream
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The name of request `code` for log lines.
fn request_name(code: u32) -> String {
    FrontendReq::try_from(code).map_or_else(|_| format!("request {code}"), |req| format!("{req:?}"))
}

/// One message from the frontend: its header words, payload and descriptors.
struct Message {
    request: u32,
    flags: u32,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_SIZE..]
    }

    /// The little-endian word of `N` bytes at `at` in the payload, if the payload has it.
    fn payload_word<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.payload().get(at..at + N)?.try_into().ok()
    }

    fn payload_u32(&self, at: usize) -> Option<u32> {
        self.payload_word(at).map(u32::from_le_bytes)
    }

    fn payload_u64(&self, at: usize) -> Option<u64> {
        self.payload_word(at).map(u64::from_le_bytes)
    }
}

/// Reads from the frontend, and ends the connection if a watched memory file faults while
/// it waits: a frontend that stalls mid-message is disconnected all the same.
struct FrontendReader<'a> {
    stream: &'a UnixStream,
    faults: &'a FaultWatch,
}

impl FrontendReader<'_> {
    /// Waits until the frontend sent something or closed.
    fn wait_readable(&self) -> io::Result<()> {
        loop {
            let [frontend, fault] =
                wait_readable([self.stream.as_raw_fd(), self.faults.fault_event()])?;
            if fault {
                drain_fault_event();
                // The event is shared by every connection's watch: another's fault is not
                // ours to act on.
                if let Some(fault) = self.faults.fault() {
                    error!(
                        "the frontend shrank a guest memory file ({}) under its mapping: \
                         an access at file offset {:#x} was past its end (that page now \
                         reads as zeroes); disconnecting the frontend",
                        fault.file, fault.offset
                    );
                    return Err(io::Error::other("guest memory file shrunk"));
                }
            }
            if frontend {
                return Ok(());
            }
        }
    }

    /// Fills `buffer`, waiting for each piece as above.
    fn read_exact(&self, mut buffer: &mut [u8]) -> io::Result<()> {
        while !buffer.is_empty() {
            self.wait_readable()?;
            match (&*self.stream).read(buffer) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => buffer = &mut buffer[read..],
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Reads one message; `None` when the frontend closed between messages.
    fn read_message(&self) -> io::Result<Option<Message>> {
        let mut header = [0u8; HEADER_SIZE];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iovec = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        }];
        self.wait_readable()?;
        // SAFETY: the iovec covers exactly `header`, alive and writable for the call.
        let (received, fd_count) = unsafe { self.stream.recv_with_fds(&mut iovec, &mut raw_fds) }
            .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
        let fds: Vec<OwnedFd> = raw_fds[..fd_count]
            .iter()
            // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if received == 0 {
            return Ok(None);
        }
        self.read_exact(&mut header[received..])?;
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_MSG_SIZE {
            // Waiting for a payload vhost would refuse anyway could take forever.
            error!(
                "vhost-user {} announces a payload of {size} bytes, more than the protocol's \
                 {MAX_MSG_SIZE}: disconnecting the frontend",
                request_name(request)
            );
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "payload size above the protocol's limit",
            ));
        }
        let mut bytes = header.to_vec();
        bytes.resize(HEADER_SIZE + size, 0);
        self.read_exact(&mut bytes[HEADER_SIZE..])?;
        Ok(Some(Message {
            request,
            flags,
            bytes,
            fds,
        }))
    }
}

/// What the relay knows of the connection's negotiation and memory.
struct Session<'a> {
    policy: Policy,
    faults: &'a FaultWatch,
    /// GET_FEATURES was answered: vhost enables REPLY_ACK only then.
    features_queried: bool,
    acked_protocol_features: u64,
    features_set: bool,
    /// Early SET_VRING_ENABLE messages by ring index, the latest one of each ring.
    early_enables: BTreeMap<u32, Vec<u8>>,
    /// Memory regions the backend holds (vhost-user-backend ends the connection when it
    /// fails to add or remove one, so while the connection lives this is exact).
    memory_slots: usize,
    inflight: Option<InflightRelay>,
}

impl<'a> Session<'a> {
    fn new(policy: Policy, faults: &'a FaultWatch, inflight: Option<InflightRelay>) -> Self {
        Session {
            policy,
            faults,
            features_queried: false,
            acked_protocol_features: 0,
            features_set: false,
            early_enables: BTreeMap::new(),
            memory_slots: 0,
            inflight,
        }
    }

    /// The device's inflight relay, if `message` is one it answers: INFLIGHT_SHMFD is acked.
    fn inflight_for(&self, message: &Message) -> Option<&InflightRelay> {
        let negotiated =
            self.acked_protocol_features & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0;
        let inflight = self.inflight.as_ref()?;
        (negotiated && InflightRelay::answers(message.request)).then_some(inflight)
    }

    /// Answers an inflight message for the device, with the descriptor that goes with it.
    fn answer_inflight(
        &self,
        inflight: &InflightRelay,
        mut message: Message,
        frontend_writer: &Mutex<UnixStream>,
    ) -> io::Result<()> {
        let needs_reply = self.reply_ack_expected(&message);
        let fds = std::mem::take(&mut message.fds);
        let Some(answer) = inflight.answer(message.request, needs_reply, message.payload(), fds)
        else {
            return Ok(());
        };
        let fds: Vec<RawFd> = answer.fd.iter().map(AsRawFd::as_raw_fd).collect();
        send_with_fds(
            &lock(frontend_writer),
            &reply(message.request, &answer.payload),
            &fds,
        )
    }

    /// Whether vhost answers `message` with an ack, as it would if it took the message:
    /// REPLY_ACK negotiated (SET_PROTOCOL_FEATURES counts with its own value) and asked for.
    fn reply_ack_expected(&self, message: &Message) -> bool {
        let acked = match message.request {
            SET_PROTOCOL_FEATURES => message.payload_u64(0).unwrap_or(0),
            _ => self.acked_protocol_features,
        };
        self.features_queried
            && self.policy.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
            && acked & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
            && message.flags & NEED_REPLY != 0
    }

    /// `Err(reason)` for a message vhost-user-backend must not see. Memory files that may
    /// shrink are watched from here on.
    fn check(&self, message: &Message) -> Result<(), String> {
        match message.request {
            SET_PROTOCOL_FEATURES => {
                let acked = message.payload_u64(0).unwrap_or(0);
                let unoffered = acked & !self.policy.protocol_features;
                if unoffered != 0 {
                    return Err(format!(
                        "acks protocol features {unoffered:#x}, which were never offered \
                         (offered: {:#x})",
                        self.policy.protocol_features
                    ));
                }
            }
            SET_VRING_NUM => {
                let (index, size) = (message.payload_u32(0), message.payload_u32(4));
                if let (Some(index), Some(size)) = (index, size) {
                    // Split rings only (packed rings are not offered): a power of two.
                    if !size.is_power_of_two() || size > self.policy.max_queue_size {
                        return Err(format!(
                            "ring {index}: size {size} is not a power of two from 1 to {}",
                            self.policy.max_queue_size
                        ));
                    }
                }
            }
            SET_MEM_TABLE => {
                let regions = message.payload_u32(0).unwrap_or(0) as usize;
                if regions > MAX_TABLE_REGIONS {
                    return Err(format!(
                        "{regions} regions, more than the {MAX_TABLE_REGIONS} of a memory table"
                    ));
                }
                for (index, fd) in message.fds.iter().enumerate().take(regions) {
                    self.check_region(index, 8 + index * REGION_SIZE, message, fd)?;
                }
            }
            ADD_MEM_REG => {
                if self.memory_slots >= MAX_MEM_SLOTS {
                    return Err(format!(
                        "all {MAX_MEM_SLOTS} memory slots GET_MAX_MEM_SLOTS reports are in use"
                    ));
                }
                if let Some(fd) = message.fds.first() {
                    self.check_region(0, 8, message, fd)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Refuses region `index`, described at payload offset `at`, unless its file backs all of
    /// it; watches the file if it may shrink later.
    fn check_region(
        &self,
        index: usize,
        at: usize,
        message: &Message,
        fd: &OwnedFd,
    ) -> Result<(), String> {
        let (Some(size), Some(offset)) =
            (message.payload_u64(at + 8), message.payload_u64(at + 24))
        else {
            // Too short a payload: vhost refuses the message itself.
            return Ok(());
        };
        let file = RegionFile::inspect(fd.as_fd())
            .map_err(|error| format!("region {index}: cannot inspect its file: {error}"))?;
        file.check_covers(offset, size)
            .map_err(|uncovered| format!("region {index}: {uncovered}"))?;
        if file.may_shrink() {
            self.faults
                .watch(&file)
                .map_err(|error| format!("region {index}: {error}"))?;
        }
        Ok(())
    }

    /// Updates what the relay knows once `message` goes to the backend.
    fn forwarded(&mut self, message: &Message) {
        match message.request {
            GET_FEATURES => self.features_queried = true,
            SET_FEATURES => self.features_set = true,
            SET_PROTOCOL_FEATURES => {
                self.acked_protocol_features = message.payload_u64(0).unwrap_or(0);
            }
            RESET_OWNER | RESET_DEVICE => {
                self.features_set = false;
                self.early_enables.clear();
            }
            SET_MEM_TABLE => self.memory_slots = message.payload_u32(0).unwrap_or(0) as usize,
            ADD_MEM_REG => self.memory_slots += 1,
            REM_MEM_REG => self.memory_slots = self.memory_slots.saturating_sub(1),
            _ => {}
        }
    }

    /// Logs a refusal and answers it, or ends the connection if no answer is expected.
    fn refuse(
        &self,
        message: &Message,
        reason: &str,
        frontend_writer: &Mutex<UnixStream>,
    ) -> io::Result<()> {
        let name = request_name(message.request);
        if !self.reply_ack_expected(message) {
            error!(
                "vhost-user {name} refused: {reason}; the frontend asked for no reply, so \
                 disconnecting it"
            );
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request refused",
            ));
        }
        error!("vhost-user {name} refused: {reason}");
        lock(frontend_writer).write_all(&ack(message.request, 1))
    }

    /// Answers an early SET_VRING_ENABLE and keeps it for after SET_FEATURES.
    fn hold_early_enable(
        &mut self,
        mut message: Message,
        frontend_writer: &Mutex<UnixStream>,
    ) -> io::Result<()> {
        debug!("SET_VRING_ENABLE before SET_FEATURES: answered here, replayed later");
        let needs_reply = message.flags & NEED_REPLY != 0;
        // The replay must not ask the backend for a reply nobody reads.
        message.bytes[4..8].copy_from_slice(&(message.flags & !NEED_REPLY).to_le_bytes());
        let index = message.payload_u32(0).unwrap_or(0);
        self.early_enables.insert(index, message.bytes);
        if needs_reply {
            lock(frontend_writer).write_all(&ack(SET_VRING_ENABLE, 0))?;
        }
        Ok(())
    }

    fn forward_requests(
        &mut self,
        frontend: &FrontendReader<'_>,
        backend: &UnixStream,
        frontend_writer: &Mutex<UnixStream>,
    ) -> io::Result<()> {
        while let Some(message) = frontend.read_message()? {
            if message.request == SET_VRING_ENABLE && !self.features_set {
                self.hold_early_enable(message, frontend_writer)?;
                continue;
            }
            if let Some(inflight) = self.inflight_for(&message) {
                self.answer_inflight(inflight, message, frontend_writer)?;
                continue;
            }
            if let Err(reason) = self.check(&message) {
                self.refuse(&message, &reason, frontend_writer)?;
                continue;
            }
            let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
            send_with_fds(backend, &message.bytes, &raw)?;
            self.forwarded(&message);
            if message.request == SET_FEATURES {
                for (_, enable) in std::mem::take(&mut self.early_enables) {
                    (&*backend).write_all(&enable)?;
                }
            }
        }
        Ok(())
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

/// A REPLY_ACK answer to `request`: 0 for success, anything else for failure.
fn ack(request: u32, status: u64) -> Vec<u8> {
    reply(request, &status.to_le_bytes())
}

/// Sends `bytes` to `stream`, with `fds` attached to the first part.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = stream
        .send_with_fds(&[bytes], fds)
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    (&*stream).write_all(&bytes[sent..])
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
        let policy = Policy {
            features: VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            protocol_features: VhostUserProtocolFeatures::REPLY_ACK.bits(),
            max_queue_size: 256,
        };
        let faults = Arc::new(FaultWatch::new());
        let relay =
            std::thread::spawn(move || relay(relay_frontend, relay_backend, policy, faults, None));

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
