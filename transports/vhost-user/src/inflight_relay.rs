//! The relay's part of vhost-user inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! vhost-user-backend 0.24 refuses GET_INFLIGHT_FD and SET_INFLIGHT_FD, so once the frontend has
//! acked the protocol feature (which only devices that track in-flight requests offer) the relay
//! has both answered here: GET_INFLIGHT_FD gets a fresh sealed memfd sized for the queues the
//! frontend names, SET_INFLIGHT_FD maps the region the frontend kept (the one a previous backend
//! process filled, after a crash) and hands it to the device. The device resubmits what the
//! region holds in flight on the queue's first event, which needs no kick from a driver that
//! may be waiting for those very requests: vhost-user-backend 0.24 runs each queue's handler
//! once when the queue is enabled.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use hvisor_vhost_core::inflight::{InflightRegion, create_region_file};
use log::{info, warn};
use vhost::vhost_user::message::FrontendReq;

const GET_INFLIGHT_FD: u32 = FrontendReq::GET_INFLIGHT_FD as u32;
const SET_INFLIGHT_FD: u32 = FrontendReq::SET_INFLIGHT_FD as u32;
/// `VhostUserInflight`: u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size, padded
/// to 8 bytes as QEMU and the vhost crate send it.
const INFLIGHT_PAYLOAD_SIZE: usize = 24;

/// What the relay sends back for an intercepted message: a reply payload and the descriptor
/// that goes with it.
pub struct InflightReply {
    pub payload: Vec<u8>,
    pub fd: Option<File>,
}

type SetRegion = Box<dyn Fn(Option<Arc<InflightRegion>>) -> io::Result<()> + Send>;

/// Inflight tracking on one frontend connection.
pub struct InflightRelay {
    num_queues: u16,
    max_queue_size: u16,
    set_region: SetRegion,
}

/// `VhostUserInflight`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inflight {
    mmap_size: u64,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
}

impl Inflight {
    fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() != INFLIGHT_PAYLOAD_SIZE {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
        let u16_at = |at: usize| u16::from_le_bytes(payload[at..at + 2].try_into().expect("2"));
        Some(Inflight {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16_at(16),
            queue_size: u16_at(18),
        })
    }

    fn to_bytes(self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(INFLIGHT_PAYLOAD_SIZE);
        bytes.extend_from_slice(&self.mmap_size.to_le_bytes());
        bytes.extend_from_slice(&self.mmap_offset.to_le_bytes());
        bytes.extend_from_slice(&self.num_queues.to_le_bytes());
        bytes.extend_from_slice(&self.queue_size.to_le_bytes());
        bytes.resize(INFLIGHT_PAYLOAD_SIZE, 0);
        bytes
    }
}

impl InflightRelay {
    /// For a device of `num_queues` queues of up to `max_queue_size` entries, which takes its
    /// regions through `set_region`.
    pub fn new(
        num_queues: u16,
        max_queue_size: u16,
        set_region: impl Fn(Option<Arc<InflightRegion>>) -> io::Result<()> + Send + 'static,
    ) -> Self {
        InflightRelay {
            num_queues,
            max_queue_size,
            set_region: Box::new(set_region),
        }
    }

    /// Whether `request` is answered here (once INFLIGHT_SHMFD is acked).
    pub fn answers(request: u32) -> bool {
        matches!(request, GET_INFLIGHT_FD | SET_INFLIGHT_FD)
    }

    /// Answers an intercepted message; `None` when no reply is due (SET_INFLIGHT_FD without
    /// NEED_REPLY).
    pub fn answer(
        &self,
        request: u32,
        needs_reply: bool,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Option<InflightReply> {
        if request == GET_INFLIGHT_FD {
            return Some(self.get_inflight_fd(payload));
        }
        let result = self.set_inflight_fd(payload, fds);
        if let Err(error) = &result {
            warn!("SET_INFLIGHT_FD refused: {error}; in-flight requests are not tracked");
        }
        needs_reply.then(|| InflightReply {
            payload: u64::from(result.is_err()).to_le_bytes().to_vec(),
            fd: None,
        })
    }

    /// A zeroed region for the queues the frontend names; a reply with `mmap_size` 0 (which QEMU
    /// takes as "no inflight tracking") when it cannot be made.
    fn get_inflight_fd(&self, payload: &[u8]) -> InflightReply {
        let created = Inflight::parse(payload)
            .ok_or_else(|| payload_size_error(payload))
            .and_then(|asked| {
                self.check_geometry(asked)?;
                let (file, size) = create_region_file(asked.num_queues, asked.queue_size)
                    .map_err(|error| error.to_string())?;
                Ok((asked, file, size))
            });
        match created {
            Ok((asked, file, mmap_size)) => InflightReply {
                payload: Inflight {
                    mmap_size,
                    mmap_offset: 0,
                    ..asked
                }
                .to_bytes(),
                fd: Some(file),
            },
            Err(error) => {
                warn!("GET_INFLIGHT_FD: {error}; answering without a region");
                InflightReply {
                    payload: Inflight {
                        mmap_size: 0,
                        mmap_offset: 0,
                        num_queues: 0,
                        queue_size: 0,
                    }
                    .to_bytes(),
                    fd: None,
                }
            }
        }
    }

    fn set_inflight_fd(&self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<(), String> {
        let region = Inflight::parse(payload).ok_or_else(|| payload_size_error(payload))?;
        self.check_geometry(region)?;
        let [fd] = <[OwnedFd; 1]>::try_from(fds)
            .map_err(|fds| format!("the message carries {} descriptors, 1 expected", fds.len()))?;
        let mapped = InflightRegion::map(
            File::from(fd),
            region.mmap_offset,
            region.mmap_size,
            region.num_queues,
            region.queue_size,
        )
        .map_err(|error| error.to_string())?;
        (self.set_region)(Some(Arc::new(mapped))).map_err(|error| error.to_string())?;
        info!(
            "inflight region set: {} queue(s) of {} entries",
            region.num_queues, region.queue_size
        );
        Ok(())
    }

    fn check_geometry(&self, inflight: Inflight) -> Result<(), String> {
        if inflight.num_queues == 0 || inflight.num_queues > self.num_queues {
            return Err(format!(
                "num_queues {} is not in 1..={} (the device's queues)",
                inflight.num_queues, self.num_queues
            ));
        }
        if inflight.queue_size == 0 || inflight.queue_size > self.max_queue_size {
            return Err(format!(
                "queue_size {} is not in 1..={} (the device's largest queue)",
                inflight.queue_size, self.max_queue_size
            ));
        }
        Ok(())
    }
}

fn payload_size_error(payload: &[u8]) -> String {
    format!(
        "payload of {} bytes, {INFLIGHT_PAYLOAD_SIZE} expected (VhostUserInflight)",
        payload.len()
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    use hvisor_vhost_core::inflight::region_size;
    use vhost::vhost_user::message::{VhostUserInflight, VhostUserU64};
    use vm_memory::ByteValued;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::*;
    use crate::frontend_relay::{Policy, relay};
    use crate::memory_backing::FaultWatch;
    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

    const VERSION_1: u32 = 0x1;
    const NEED_REPLY: u32 = 0x8;

    /// A frontend message: request code, flags and size words, then the body.
    fn request(code: FrontendReq, flags: u32, body: &[u8]) -> Vec<u8> {
        let words = [code as u32, flags, body.len() as u32];
        let header = words.iter().flat_map(|word| word.to_le_bytes());
        header.chain(body.iter().copied()).collect()
    }

    fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        assert_eq!(stream.send_with_fds(&[bytes], fds).unwrap(), bytes.len());
    }

    /// One reply: its request code, payload and descriptors.
    fn receive(stream: &UnixStream) -> (u32, Vec<u8>, Vec<File>) {
        let mut bytes = vec![0u8; 12 + INFLIGHT_PAYLOAD_SIZE];
        let mut fds = [-1 as RawFd; 4];
        let mut iovec = [libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        }];
        // SAFETY: the iovec covers exactly `bytes`, alive and writable for the call.
        let (received, fd_count) = unsafe { stream.recv_with_fds(&mut iovec, &mut fds) }.unwrap();
        let size = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(received, 12 + size, "one whole reply");
        let files = fds[..fd_count]
            .iter()
            // SAFETY: received through SCM_RIGHTS, ours alone.
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        let code = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        (code, bytes[12..12 + size].to_vec(), files)
    }

    /// GET/SET_INFLIGHT_FD are the relay's once INFLIGHT_SHMFD is acked (and only then): a sealed
    /// region of the right size goes out, comes back, reaches the device; regions and geometries
    /// that do not fit are refused with a clear answer, and nothing of this reaches the crate.
    #[test]
    fn the_relay_answers_the_inflight_messages_once_negotiated() {
        let (frontend, relay_frontend) = UnixStream::pair().unwrap();
        // A reply that never comes fails the test instead of hanging it.
        frontend
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (relay_backend, mut backend) = UnixStream::pair().unwrap();
        let regions: Arc<Mutex<Vec<(u16, u16)>>> = Arc::default();
        let device = regions.clone();
        let inflight = InflightRelay::new(2, 256, move |region| {
            let region = region.expect("a region");
            device
                .lock()
                .unwrap()
                .push((region.num_queues(), region.queue_size()));
            Ok(())
        });
        let policy = Policy {
            features: VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            protocol_features: (VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
                .bits(),
            max_queue_size: 256,
        };
        let faults = Arc::new(FaultWatch::new());
        let relay = std::thread::spawn(move || {
            relay(
                relay_frontend,
                relay_backend,
                policy,
                faults,
                Some(inflight),
            )
        });

        let asked = VhostUserInflight::new(0, 0, 2, 128);
        let early_get = request(FrontendReq::GET_INFLIGHT_FD, VERSION_1, asked.as_slice());
        send(&frontend, &early_get, &[]);
        // vhost answers REPLY_ACK only after GET_FEATURES; the relay holds to that too.
        let get_features = request(FrontendReq::GET_FEATURES, VERSION_1, &[]);
        send(&frontend, &get_features, &[]);
        let acked =
            VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK;
        let features = request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VERSION_1,
            VhostUserU64::new(acked.bits()).as_slice(),
        );
        send(&frontend, &features, &[]);

        send(
            &frontend,
            &request(FrontendReq::GET_INFLIGHT_FD, VERSION_1, asked.as_slice()),
            &[],
        );
        let (code, payload, mut files) = receive(&frontend);
        assert_eq!(code, GET_INFLIGHT_FD);
        let given = Inflight::parse(&payload).unwrap();
        let size = region_size(2, 128) as u64;
        assert_eq!(
            given,
            Inflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: 2,
                queue_size: 128
            }
        );
        let region = files.pop().expect("the region's fd");
        assert_eq!(region.metadata().unwrap().len(), size);

        let set = VhostUserInflight::new(size, 0, 2, 128);
        let set = request(
            FrontendReq::SET_INFLIGHT_FD,
            VERSION_1 | NEED_REPLY,
            set.as_slice(),
        );
        send(&frontend, &set, &[region.as_raw_fd()]);
        let (code, payload, _) = receive(&frontend);
        assert_eq!(
            (code, payload),
            (SET_INFLIGHT_FD, 0u64.to_le_bytes().to_vec())
        );
        assert_eq!(*regions.lock().unwrap(), [(2, 128)]);

        let unsealed = tempfile::tempfile().unwrap();
        unsealed.set_len(size).unwrap();
        send(&frontend, &set, &[unsealed.as_raw_fd()]);
        let (_, payload, _) = receive(&frontend);
        assert_eq!(payload, 1u64.to_le_bytes(), "an unsealed region is refused");
        send(&frontend, &set, &[]);
        let (_, payload, _) = receive(&frontend);
        assert_eq!(
            payload,
            1u64.to_le_bytes(),
            "a region without its fd is refused"
        );

        let too_many = VhostUserInflight::new(0, 0, 3, 128);
        send(
            &frontend,
            &request(FrontendReq::GET_INFLIGHT_FD, VERSION_1, too_many.as_slice()),
            &[],
        );
        let (_, payload, files) = receive(&frontend);
        assert_eq!(Inflight::parse(&payload).unwrap().mmap_size, 0);
        assert!(
            files.is_empty(),
            "no region for 3 queues of a 2-queue device"
        );
        assert_eq!(regions.lock().unwrap().len(), 1);

        drop(frontend);
        relay.join().unwrap().unwrap();
        let mut forwarded = Vec::new();
        backend.read_to_end(&mut forwarded).unwrap();
        assert_eq!(
            forwarded,
            [early_get, get_features, features].concat(),
            "only the messages before the negotiation reach the crate"
        );
    }
}
