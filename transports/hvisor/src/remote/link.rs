//! One connection to a vhost-user backend ([`Link`]), negotiated through the vhost crate's
//! `Frontend`, and the watchdog that bounds every exchange on it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vhost::vhost_user::message::{
    VHOST_USER_CONFIG_SIZE, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{MAX_SHARED_REGIONS, REPLY_TIMEOUT, RemoteError};
use crate::config::{ExternalBackend, MAX_REMOTE_QUEUES};
use crate::mmio::QueueRegisters;

/// Bounds each message to the backend: a message not answered within [`REPLY_TIMEOUT`] gets
/// its connection shut down, which ends the wait with an error. Its thread does nothing else.
pub(super) struct Watchdog {
    shared: Arc<(Mutex<Watch>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Watch {
    /// When the message in flight is overdue.
    deadline: Option<Instant>,
    /// The deadline passed and the connection was shut down.
    fired: bool,
    /// The connection messages go over.
    stream: Option<UnixStream>,
    stopping: bool,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watchdog {
    pub(super) fn start(name: &str) -> io::Result<Self> {
        let shared = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-watchdog"))
                .spawn(move || Self::run(&shared))?
        };
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    fn run(shared: &(Mutex<Watch>, Condvar)) {
        let (watch, changed) = shared;
        let mut watch = lock(watch);
        loop {
            if watch.stopping {
                return;
            }
            watch = match watch.deadline {
                None => changed
                    .wait(watch)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(deadline) if Instant::now() >= deadline => {
                    watch.deadline = None;
                    watch.fired = true;
                    if let Some(stream) = &watch.stream {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    watch
                }
                Some(deadline) => {
                    changed
                        .wait_timeout(watch, deadline - Instant::now())
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Messages from now on go over `stream`.
    fn watch(&self, stream: &UnixStream) -> io::Result<()> {
        lock(&self.shared.0).stream = Some(stream.try_clone()?);
        Ok(())
    }

    /// Runs `exchange` (messages to the backend and their answers) under the deadline; if it
    /// fails because the deadline passed, the error says so.
    pub(super) fn guard<T>(
        &self,
        exchange: impl FnOnce() -> Result<T, Failed>,
    ) -> Result<T, Failed> {
        let (watch, changed) = &*self.shared;
        {
            let mut watch = lock(watch);
            watch.deadline = Some(Instant::now() + REPLY_TIMEOUT);
            watch.fired = false;
        }
        changed.notify_one();
        let result = exchange();
        let mut watch = lock(watch);
        watch.deadline = None;
        result.map_err(|failed| {
            if !std::mem::take(&mut watch.fired) {
                return failed;
            }
            Failed {
                message: failed.message,
                error: vhost::Error::IOError(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {REPLY_TIMEOUT:?}"),
                )),
            }
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared.0).stopping = true;
        self.shared.1.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection to the backend, negotiated.
pub(super) struct Link {
    pub(super) frontend: Frontend,
    /// The same connection, to watch for a hang-up and to shut it down.
    pub(super) stream: UnixStream,
    /// The backend's virtio features.
    pub(super) features: u64,
    /// The protocol features in force.
    pub(super) protocol: VhostUserProtocolFeatures,
    pub(super) queues: usize,
    /// SET_FEATURES acked PROTOCOL_FEATURES: rings are enabled and disabled by
    /// SET_VRING_ENABLE (without it, the backend enabled them at SET_FEATURES).
    ring_enable_messages: bool,
    /// The backend has been given the device's inflight region (or told of none) since it
    /// connected or was reset.
    inflight_given: bool,
}

/// The inflight region a backend handed out with GET_INFLIGHT_FD, which the daemon keeps for
/// the device's lifetime (until the driver's reset) and gives to every backend process that
/// serves the device with SET_INFLIGHT_FD: a restarted backend finds there the requests its
/// predecessor had taken and not completed. The daemon only passes the file on; the backend
/// alone reads and writes it.
pub(super) struct InflightFd {
    file: File,
    /// The region's size, offset and geometry, as the backend answered.
    layout: VhostUserInflight,
}

impl InflightFd {
    pub(super) fn size(&self) -> u64 {
        self.layout.mmap_size
    }
}

/// A message that failed, by name.
pub(super) struct Failed {
    pub(super) message: &'static str,
    pub(super) error: vhost::Error,
}

pub(super) trait Named<T> {
    fn named(self, message: &'static str) -> Result<T, Failed>;
}

impl<T> Named<T> for vhost::Result<T> {
    fn named(self, message: &'static str) -> Result<T, Failed> {
        self.map_err(|error| Failed { message, error })
    }
}

impl Failed {
    pub(super) fn at(self, socket: &Path) -> RemoteError {
        RemoteError::Message {
            socket: socket.to_owned(),
            message: self.message,
            source: self.error,
        }
    }

    /// The connection failed (the backend went away, did not answer in time, or answered out
    /// of turn); any other error is a request the backend (or the frontend, before sending it)
    /// refused, with the connection intact.
    pub(super) fn connection_lost(&self) -> bool {
        use vhost::vhost_user::Error as Protocol;
        matches!(
            self.error,
            vhost::Error::IOError(_)
                | vhost::Error::VhostUserProtocol(
                    Protocol::Disconnected
                        | Protocol::PartialMessage
                        | Protocol::SocketError(_)
                        | Protocol::SocketBroken(_)
                        | Protocol::SocketConnect(_)
                        | Protocol::SocketRetry(_)
                        | Protocol::InvalidMessage
                        | Protocol::OversizedMsg
                        | Protocol::IncorrectFds
                )
        )
    }
}

impl Link {
    /// Connects to the backend of `backend` and negotiates, each message under `watchdog`.
    pub(super) fn connect(
        backend: &ExternalBackend,
        watchdog: &Watchdog,
    ) -> Result<Link, RemoteError> {
        let socket = &backend.socket;
        let connect_error = |source| RemoteError::Connect {
            socket: socket.clone(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(connect_error)?;
        watchdog.watch(&stream).map_err(connect_error)?;
        let frontend = Frontend::from_stream(
            stream.try_clone().map_err(connect_error)?,
            u64::from(MAX_REMOTE_QUEUES),
        );
        let mut link = Link {
            frontend,
            stream,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queues: 0,
            ring_enable_messages: false,
            inflight_given: false,
        };
        link.negotiate(backend, watchdog)?;
        Ok(link)
    }

    fn negotiate(
        &mut self,
        backend: &ExternalBackend,
        watchdog: &Watchdog,
    ) -> Result<(), RemoteError> {
        let socket = &backend.socket;
        let frontend = &mut self.frontend;
        let at = |failed: Failed| failed.at(socket);
        watchdog
            .guard(|| frontend.set_owner().named("SET_OWNER"))
            .map_err(at)?;
        self.features = watchdog
            .guard(|| frontend.get_features().named("GET_FEATURES"))
            .map_err(at)?;
        if self.features & 1 << VIRTIO_F_VERSION_1 == 0 {
            return Err(RemoteError::NoVersion1 {
                socket: socket.clone(),
                features: self.features,
            });
        }
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = watchdog
                .guard(|| {
                    frontend
                        .get_protocol_features()
                        .named("GET_PROTOCOL_FEATURES")
                })
                .map_err(at)?;
            self.protocol = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::RESET_DEVICE
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
            let protocol = self.protocol;
            watchdog
                .guard(|| {
                    frontend
                        .set_protocol_features(protocol)
                        .named("SET_PROTOCOL_FEATURES")
                })
                .map_err(at)?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let reported = if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            Some(
                watchdog
                    .guard(|| frontend.get_queue_num().named("GET_QUEUE_NUM"))
                    .map_err(at)?,
            )
        } else {
            None
        };
        self.queues = match (backend.num_queues, reported) {
            (Some(wanted), Some(reported)) if u64::from(wanted) > reported => {
                return Err(RemoteError::TooFewQueues {
                    socket: socket.clone(),
                    reported,
                    wanted,
                });
            }
            (Some(wanted), _) => usize::from(wanted),
            (None, Some(reported)) if reported > u64::from(MAX_REMOTE_QUEUES) => {
                return Err(RemoteError::TooManyQueues {
                    socket: socket.clone(),
                    reported,
                });
            }
            (None, Some(reported)) => reported as usize,
            (None, None) => {
                return Err(RemoteError::QueueCountUnknown {
                    socket: socket.clone(),
                });
            }
        };
        Ok(())
    }

    /// SET_FEATURES for the driver's `features`, with PROTOCOL_FEATURES if the backend offers
    /// it.
    pub(super) fn set_features(&mut self, features: u64) -> Result<(), Failed> {
        let protocol = self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features | protocol)
            .named("SET_FEATURES")?;
        self.ring_enable_messages = protocol != 0;
        Ok(())
    }

    /// SET_VRING_ENABLE where the backend takes it.
    pub(super) fn enable_ring(&mut self, index: usize, enable: bool) -> Result<(), Failed> {
        if !self.ring_enable_messages {
            return Ok(());
        }
        self.frontend
            .set_vring_enable(index, enable)
            .named("SET_VRING_ENABLE")
    }

    /// Shares `memory` with the backend (SET_MEM_TABLE), under `watchdog`; `socket` names the
    /// backend in errors.
    pub(super) fn share_memory(
        &mut self,
        memory: &GuestMemoryMmap,
        watchdog: &Watchdog,
        socket: &Path,
    ) -> Result<(), RemoteError> {
        let table = memory_table(memory)?;
        watchdog
            .guard(|| {
                self.frontend
                    .set_mem_table(&table)
                    .named("SET_MEM_TABLE")
                    .map(drop)
            })
            .map_err(|failed| failed.at(socket))
    }

    /// Sets up ring `index` of `queue`'s registers, resuming at avail index `base`, signalling
    /// `call` and woken by `kick`; `memory` translates its addresses.
    pub(super) fn start_ring(
        &mut self,
        index: usize,
        (queue, memory): (&QueueRegisters, &GuestMemoryMmap),
        base: u16,
        (call, kick): (&EventFd, &EventFd),
    ) -> Result<(), Failed> {
        let config = vring_config(memory, queue).map_err(|_| Failed {
            message: "SET_VRING_ADDR",
            error: vhost::Error::InvalidQueue,
        })?;
        let frontend = &mut self.frontend;
        frontend
            .set_vring_num(index, queue.num)
            .named("SET_VRING_NUM")?;
        frontend
            .set_vring_base(index, base)
            .named("SET_VRING_BASE")?;
        frontend
            .set_vring_addr(index, &config)
            .named("SET_VRING_ADDR")?;
        frontend
            .set_vring_call(index, call)
            .named("SET_VRING_CALL")?;
        frontend.set_vring_kick(index, kick).named("SET_VRING_KICK")
    }

    /// Disables ring `index` and stops it (GET_VRING_BASE, answered once the backend has
    /// finished with the ring).
    pub(super) fn stop_ring(&mut self, index: usize) -> Result<(), Failed> {
        self.enable_ring(index, false)?;
        self.frontend
            .get_vring_base(index)
            .named("GET_VRING_BASE")
            .map(drop)
    }

    /// Whether the backend tracks in-flight requests and has not been given the device's region
    /// since it connected or was reset.
    pub(super) fn needs_inflight(&self) -> bool {
        self.tracks_inflight() && !self.inflight_given
    }

    /// Whether the backend tracks in-flight requests (INFLIGHT_SHMFD negotiated).
    pub(super) fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// GET_INFLIGHT_FD: a new zeroed region for `num_queues` queues of up to `queue_size`
    /// entries; `None` when the backend gives none. QEMU takes a reply with `mmap_size` 0 as
    /// "no tracking"; the vhost crate reads such a reply whole and then refuses it as
    /// InvalidMessage (it carries no descriptor, and backends such as ours zero its geometry),
    /// so that error is taken the same way. (A reply for another request lands there too; the
    /// next message then fails and the connection is renewed.)
    pub(super) fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightFd>, Failed> {
        let asked = VhostUserInflight::new(0, 0, num_queues, queue_size);
        match self.frontend.get_inflight_fd(&asked) {
            Ok((layout, file)) if layout.mmap_size > 0 => Ok(Some(InflightFd { file, layout })),
            Ok(_)
            | Err(vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidMessage)) => {
                Ok(None)
            }
            Err(error) => Err(Failed {
                message: "GET_INFLIGHT_FD",
                error,
            }),
        }
    }

    /// SET_INFLIGHT_FD with `region`, or nothing without one; either way the backend has what
    /// it gets until the next reset.
    pub(super) fn give_inflight(&mut self, region: Option<&InflightFd>) -> Result<(), Failed> {
        if let Some(region) = region {
            self.frontend
                .set_inflight_fd(&region.layout, region.file.as_raw_fd())
                .named("SET_INFLIGHT_FD")?;
        }
        self.inflight_given = true;
        Ok(())
    }

    /// `len` bytes of config space at `offset`; `None` without the CONFIG protocol feature.
    /// Asked for from offset 0, as QEMU does: libvhost-user (qemu-storage-daemon, ...) ignores
    /// GET_CONFIG's offset and answers from the start of config space.
    pub(super) fn get_config(
        &mut self,
        offset: u32,
        len: usize,
    ) -> Result<Option<Vec<u8>>, Failed> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(None);
        }
        let start = offset as usize;
        let end = start.saturating_add(len);
        if end > VHOST_USER_CONFIG_SIZE as usize {
            // Refused as the frontend refuses an out-of-range request, before sending it.
            return Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::InvalidParam,
            ))
            .named("GET_CONFIG");
        }
        let zeroes = vec![0u8; end];
        let (_, bytes) = self
            .frontend
            .get_config(
                0,
                zeroes.len() as u32,
                VhostUserConfigFlags::empty(),
                &zeroes,
            )
            .named("GET_CONFIG")?;
        Ok(Some(bytes[start..].to_vec()))
    }

    /// Writes `data` at `offset` of config space; `false` without the CONFIG protocol feature.
    pub(super) fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<bool, Failed> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(false);
        }
        self.frontend
            .set_config(offset, VhostUserConfigFlags::empty(), data)
            .named("SET_CONFIG")?;
        Ok(true)
    }

    /// RESET_DEVICE where negotiated: the backend forgets its features (PROTOCOL_FEATURES
    /// with them) and state. The device's next start gives it a new inflight region.
    pub(super) fn reset(&mut self) -> Result<(), Failed> {
        self.inflight_given = false;
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            return Ok(());
        }
        self.frontend.reset_device().named("RESET_DEVICE")?;
        self.ring_enable_messages = false;
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Other handles of the connection (the link thread's) must not keep it open.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The memory table of `memory`: each region's file, offset and address in this process.
fn memory_table(memory: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, RemoteError> {
    let regions = memory.num_regions();
    if regions > MAX_SHARED_REGIONS {
        return Err(RemoteError::TooManyRegions { regions });
    }
    memory
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|source| {
                RemoteError::Unshareable {
                    start: region.start_addr().0,
                    source,
                }
            })
        })
        .collect()
}

/// The rings of `queue` at their addresses in this process, which SET_VRING_ADDR takes (the
/// backend translates them through the memory table). Each ring must lie in one region.
pub(super) fn vring_config(
    memory: &GuestMemoryMmap,
    queue: &QueueRegisters,
) -> Result<VringConfigData, String> {
    let [desc, avail, used] = queue.ring_ranges().map(|(address, len)| {
        memory
            .get_slice(address, len)
            .map(|slice| slice.ptr_guard().as_ptr() as u64)
            .map_err(|_| {
                format!(
                    "the ring of {len:#x} bytes at {:#x} spans two zone RAM regions, which a \
                     vhost-user backend maps separately",
                    address.0
                )
            })
    });
    Ok(VringConfigData {
        queue_max_size: queue.num,
        queue_size: queue.num,
        flags: 0,
        desc_table_addr: desc?,
        used_ring_addr: used?,
        avail_ring_addr: avail?,
        log_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

    /// Regions of `size` bytes at `starts`, each backed by its own part of one file.
    fn file_backed(starts: &[u64], size: usize) -> (std::fs::File, GuestMemoryMmap) {
        let file = tempfile::tempfile().unwrap();
        file.set_len((starts.len() * size) as u64).unwrap();
        let regions = starts
            .iter()
            .enumerate()
            .map(|(n, &start)| {
                let offset = FileOffset::new(file.try_clone().unwrap(), (n * size) as u64);
                GuestRegionMmap::from_range(GuestAddress(start), size, Some(offset)).unwrap()
            })
            .collect();
        (file, GuestMemoryMmap::from_regions(regions).unwrap())
    }

    #[test]
    fn the_memory_table_gives_each_region_its_file_offset_and_address() {
        let (_file, memory) = file_backed(&[0x5000_0000, 0x9000_0000], 0x10000);
        let table = memory_table(&memory).unwrap();
        assert_eq!(table.len(), 2);
        for (n, (entry, region)) in table.iter().zip(memory.iter()).enumerate() {
            assert_eq!(entry.guest_phys_addr, region.start_addr().0);
            assert_eq!(entry.memory_size, 0x10000);
            assert_eq!(entry.mmap_offset, n as u64 * 0x10000);
            assert_eq!(entry.userspace_addr, region.as_ptr() as u64);
            assert!(entry.mmap_handle >= 0);
        }
    }

    #[test]
    fn memory_a_backend_cannot_map_is_refused() {
        let anonymous =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x4000_0000), 0x10000)]).unwrap();
        let starts: Vec<u64> = (0..9).map(|n| 0x4000_0000 + n * 0x10000).collect();
        let (_file, nine) = file_backed(&starts, 0x10000);
        for (memory, what, expected) in [
            (
                &anonymous,
                "anonymous memory",
                "zone RAM at 0x40000000 cannot be shared",
            ),
            (&nine, "nine regions", "zone RAM has 9 regions; at most 8"),
        ] {
            let Err(error) = memory_table(memory) else {
                panic!("{what} shared")
            };
            let error = error.to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn ring_addresses_are_given_in_this_process_and_within_one_region() {
        // Two regions adjacent in guest memory, apart in this process.
        let (_file, memory) = file_backed(&[0x5000_0000, 0x5001_0000], 0x10000);
        let queue = QueueRegisters {
            num: 16,
            ready: false,
            desc: 0x5000_1000,
            avail: 0x5000_2000,
            used: 0x5001_3000,
        };
        let config = vring_config(&memory, &queue).unwrap();
        let host = |gpa: u64| memory.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        assert_eq!(config.desc_table_addr, host(0x5000_1000));
        assert_eq!(config.avail_ring_addr, host(0x5000_2000));
        assert_eq!(config.used_ring_addr, host(0x5001_3000));
        assert_eq!((config.queue_size, config.flags), (16, 0));
        // A descriptor table that runs from the first region into the second.
        let spanning = QueueRegisters {
            desc: 0x5000_ff80,
            ..queue
        };
        let Err(error) = vring_config(&memory, &spanning) else {
            panic!("a ring across two regions accepted")
        };
        assert!(
            error.contains("at 0x5000ff80 spans two zone RAM regions"),
            "{error}"
        );
    }
}
