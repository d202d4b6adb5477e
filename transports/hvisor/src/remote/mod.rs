//! The device side of a vhost-user backend in another process: this daemon is the backend's
//! vhost-user frontend (the vhost crate's `Frontend`), and the backend serves the zone's rings
//! directly in zone RAM.
//!
//! - Opening the device (before the hand-off) connects to the backend's socket and negotiates:
//!   SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, CONFIG, REPLY_ACK, RESET_DEVICE
//!   and INFLIGHT_SHMFD where offered; with REPLY_ACK every message asks for an answer, so a
//!   failure is seen where it happens) and GET_QUEUE_NUM. Starting it shares zone RAM with
//!   SET_MEM_TABLE: each region's file and offset, as the daemon maps it (a memfd window of the
//!   hand-off, or `/dev/hvisor` at `mmap_offset` = the region's zone0_ipa on a board).
//! - The registers map onto messages: DeviceFeatures are the backend's features minus
//!   [`super::mmio::NOT_OFFERED`]; FEATURES_OK sends SET_FEATURES (with PROTOCOL_FEATURES when
//!   the backend offered it); config space goes through GET_CONFIG/SET_CONFIG; QueueReady sends
//!   SET_VRING_NUM/BASE/ADDR/CALL/KICK (the first ring of a backend that tracks in-flight
//!   requests is preceded by SET_INFLIGHT_FD, with the region GET_INFLIGHT_FD gave once per
//!   device lifetime) and DRIVER_OK SET_VRING_ENABLE; a queue stopped or reset gets
//!   SET_VRING_ENABLE 0 and GET_VRING_BASE; a reset RESET_DEVICE where negotiated.
//!   QueueNotify only writes the kick eventfd the backend waits on; the backend's call eventfd
//!   is read by the interrupt thread ([`CallReader::InterruptThread`]) and becomes INT_VRING.
//! - Every guest access is answered whatever the backend does. A backend that refuses a
//!   message sets DEVICE_NEEDS_RESET. A message not answered within [`REPLY_TIMEOUT`] has its
//!   connection shut down by the device's watchdog thread (the vhost crate retries a timed-out
//!   read forever, so a socket timeout cannot bound it).
//! - A connection that fails or hangs up (watched by the device's link thread) is reconnected
//!   on the same socket for [`RECONNECT_WINDOW`]; the new backend gets the memory table, the
//!   negotiated features, the inflight region and every ready queue again, each ring with
//!   SET_VRING_BASE = the used index in guest memory, as QEMU does. A backend with the region
//!   resubmits the requests its predecessor had taken and not completed, and reads the
//!   available ring on after them; one without serves again what follows the used index, which
//!   is exact only for a backend that completed in order (one that completed out of order
//!   before dying loses and repeats requests). A backend that does not come back sets
//!   DEVICE_NEEDS_RESET; the driver's reset then starts another reconnection window, and drops
//!   the region (the next start asks for a fresh one), as QEMU's reset does.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{ExternalBackend, MAX_REMOTE_QUEUES};
use super::counters::DeviceCounters;
use super::devices::{DeviceError, StartDevice, Started};
use super::interrupt::{CallReader, Injector, InterruptLine};
use super::mmio::{DeviceSide, NeedsReset, QueueRegisters};
use link::{Link, Watchdog, lock, vring_config};
use session::{Connection, Ring, Session, State, Undelivered};

mod link;
mod session;

/// How long the daemon waits for the backend's answer to one message.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a backend that went away may take to come back on its socket.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(3);
/// Between two attempts to connect again.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(50);
/// QueueNumMax when the entry gives no `queue_size`: vhost-user has no message for the
/// backend's largest ring, and every backend we know takes 128 entries.
pub const DEFAULT_QUEUE_SIZE: u16 = 128;
/// Regions of one SET_MEM_TABLE (the vhost-user spec's VHOST_MEMORY_BASELINE_NREGIONS).
pub const MAX_SHARED_REGIONS: usize = 8;

/// A backend that cannot serve the device; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("vhost-user backend at {}: cannot connect: {source}", socket.display())]
    Connect { socket: PathBuf, source: io::Error },
    #[error("vhost-user backend at {}: {message} failed: {source}", socket.display())]
    Message {
        socket: PathBuf,
        message: &'static str,
        source: vhost::Error,
    },
    #[error(
        "vhost-user backend at {}: does not offer VIRTIO_F_VERSION_1 (features {features:#x}), \
         which virtio-mmio version 2 needs",
        socket.display()
    )]
    NoVersion1 { socket: PathBuf, features: u64 },
    #[error(
        "vhost-user backend at {}: does not report its number of queues (no MQ protocol \
         feature); give \"num_queues\" in the device's entry",
        socket.display()
    )]
    QueueCountUnknown { socket: PathBuf },
    #[error(
        "vhost-user backend at {}: has {reported} queue(s), fewer than the {wanted} of \
         \"num_queues\"",
        socket.display()
    )]
    TooFewQueues {
        socket: PathBuf,
        reported: u64,
        wanted: u16,
    },
    #[error(
        "vhost-user backend at {}: has {reported} queues; at most {MAX_REMOTE_QUEUES} are \
         served (give \"num_queues\" to serve fewer)",
        socket.display()
    )]
    TooManyQueues { socket: PathBuf, reported: u64 },
    #[error(
        "vhost-user backend at {}: no longer offers features {missing:#x} that the driver \
         negotiated (it offers {features:#x})",
        socket.display()
    )]
    LostFeatures {
        socket: PathBuf,
        features: u64,
        missing: u64,
    },
    #[error(
        "zone RAM has {regions} regions; at most {MAX_SHARED_REGIONS} can be shared with a \
         vhost-user backend"
    )]
    TooManyRegions { regions: usize },
    #[error("zone RAM at {start:#x} cannot be shared with a vhost-user backend: {source}")]
    Unshareable { start: u64, source: vhost::Error },
}

/// A vhost-user backend connected and negotiated, not yet serving a zone.
pub struct RemoteBackend {
    backend: ExternalBackend,
    link: Link,
    watchdog: Watchdog,
}

impl RemoteBackend {
    /// Connects to the backend `backend` names and negotiates; `name` is the device's, for log
    /// lines and thread names.
    pub fn connect(name: &str, backend: &ExternalBackend) -> Result<Self, RemoteError> {
        let watchdog = Watchdog::start(name).map_err(|source| RemoteError::Connect {
            socket: backend.socket.clone(),
            source,
        })?;
        let link = Link::connect(backend, &watchdog)?;
        Ok(RemoteBackend {
            backend: backend.clone(),
            link,
            watchdog,
        })
    }

    /// What the start-up log says about the backend.
    pub fn describe(&self) -> String {
        format!(
            "vhost-user backend at {}: device id {}, features {:#x}, protocol features {:#x}, \
             {} queue(s) of up to {} entries",
            self.backend.socket.display(),
            self.backend.device_id,
            self.link.features,
            self.link.protocol.bits(),
            self.link.queues,
            self.queue_size()
        )
    }

    fn queue_size(&self) -> u16 {
        self.backend.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE)
    }
}

impl StartDevice for RemoteBackend {
    fn start(
        self: Box<Self>,
        name: String,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        (zone, irq): (u32, u32),
        injector: Arc<Injector>,
    ) -> Result<Started, DeviceError> {
        let start_error = |source: io::Error| DeviceError::Start {
            name: name.clone(),
            source,
        };
        let queue_size = self.queue_size();
        let RemoteBackend {
            backend,
            mut link,
            watchdog,
        } = *self;
        link.share_memory(&memory.memory(), &watchdog, &backend.socket)
            .map_err(|error| start_error(io::Error::other(error)))?;
        let num_queues = link.queues;
        let eventfds = || -> io::Result<Vec<EventFd>> {
            (0..num_queues)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect()
        };
        let kicks = eventfds().map_err(start_error)?;
        let calls = eventfds().map_err(start_error)?;
        let calls_for_line = calls
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(start_error)?;
        let counters = Arc::new(DeviceCounters::new(num_queues, 0));
        let config_change = EventFd::new(EFD_NONBLOCK).map_err(start_error)?;
        let needs_reset = NeedsReset::new(config_change.try_clone().map_err(start_error)?);
        let line = Arc::new(
            InterruptLine::new(
                zone,
                irq,
                injector,
                calls_for_line,
                CallReader::InterruptThread,
                config_change,
                counters.clone(),
            )
            .map_err(start_error)?,
        );
        let features = link.features;
        let session = Arc::new(Session {
            name: name.clone(),
            backend,
            memory: memory.clone(),
            kicks,
            calls,
            needs_reset,
            watchdog,
            queue_size,
            state: Mutex::new(State {
                connection: Connection::Up(link),
                generation: 0,
                features: None,
                queues: vec![None; num_queues],
            }),
            inflight: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK).map_err(start_error)?,
            stopping: AtomicBool::new(false),
        });
        let link_thread = {
            let session = session.clone();
            std::thread::Builder::new()
                .name(format!("{name}-link"))
                .spawn(move || session.run_link_thread())
                .map_err(start_error)?
        };
        let device = RemoteDevice {
            session,
            features,
            queue_size,
            line,
            counters,
            link_thread: Some(link_thread),
        };
        Ok(Started::new(name, device, memory))
    }
}

/// A vhost-user backend in another process behind virtio-mmio.
pub struct RemoteDevice {
    session: Arc<Session>,
    /// The features the backend offered when the daemon started.
    features: u64,
    queue_size: u16,
    line: Arc<InterruptLine>,
    counters: Arc<DeviceCounters>,
    link_thread: Option<JoinHandle<()>>,
}

impl DeviceSide for RemoteDevice {
    fn device_id(&self) -> u32 {
        self.session.backend.device_id
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn num_queues(&self) -> usize {
        self.session.kicks.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn line(&self) -> &Arc<InterruptLine> {
        &self.line
    }

    fn needs_reset(&self) -> &NeedsReset {
        &self.session.needs_reset
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn read_config(&mut self, offset: u32, size: u8) -> Result<u64, String> {
        let session = &self.session;
        let mut state = session.lock();
        let mut value = [0u8; 8];
        let len = usize::from(size);
        let read = session.send(&mut state, |link| link.get_config(offset, len));
        match read {
            Ok(Some(bytes)) => {
                value[..len].copy_from_slice(&bytes[..len]);
                Ok(u64::from_le_bytes(value))
            }
            Ok(None) => Err("the backend has no config space (no CONFIG protocol feature)".into()),
            Err(Undelivered::Refused(_, error)) => {
                Err(format!("the backend refused GET_CONFIG ({error})"))
            }
            Err(Undelivered::NoLink | Undelivered::Broken) => {
                Err("the backend is not connected".into())
            }
        }
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        let session = &self.session;
        let mut state = session.lock();
        let written = session.send(&mut state, |link| link.set_config(offset, data));
        match written {
            Ok(true) => Ok(()),
            Ok(false) => Err("the backend has no config space (no CONFIG protocol feature)".into()),
            Err(Undelivered::Refused(_, error)) => {
                Err(format!("the backend refused SET_CONFIG ({error})"))
            }
            Err(Undelivered::NoLink | Undelivered::Broken) => {
                Err("the backend is not connected".into())
            }
        }
    }

    fn accept_features(&mut self, features: u64) {
        let session = &self.session;
        let mut state = session.lock();
        state.features = Some(features);
        session.apply(&mut state, |link| link.set_features(features));
    }

    fn enable_queue(
        &mut self,
        index: usize,
        queue: QueueRegisters,
        _driver_features: u64,
        live: bool,
    ) -> Result<(), String> {
        vring_config(&self.session.memory.memory(), &queue)?;
        let ring = Ring {
            registers: queue,
            live,
        };
        let session = &self.session;
        let mut state = session.lock();
        state.queues[index] = Some(ring);
        session.apply(&mut state, |link| session.start_ring(link, index, &ring, 0));
        Ok(())
    }

    fn disable_queue(&mut self, index: usize, was_ready: bool) {
        if !was_ready {
            return;
        }
        let session = &self.session;
        let mut state = session.lock();
        state.queues[index] = None;
        session.apply(&mut state, |link| link.stop_ring(index));
    }

    fn start_queue(&mut self, index: usize) {
        let session = &self.session;
        let mut state = session.lock();
        let Some(ring) = state.queues[index].as_mut() else {
            return;
        };
        ring.live = true;
        session.apply(&mut state, |link| session.enable_ring(link, index));
    }

    fn kick(&mut self, index: usize) {
        self.session.kick(index);
    }

    fn reset(&mut self) {
        let session = &self.session;
        let mut state = session.lock();
        state.features = None;
        // As QEMU frees it at a reset: the device's next start asks for a fresh region.
        *lock(&session.inflight) = None;
        match state.connection {
            Connection::Up(_) => session.apply(&mut state, Link::reset),
            Connection::Reconnecting => {}
            Connection::Gone => {
                info!(
                    "{}: reset; trying the vhost-user backend at {} again",
                    session.name,
                    session.socket()
                );
                state.connection = Connection::Reconnecting;
                session.wake_link_thread();
            }
        }
        session.needs_reset.clear();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.link_thread.take() else {
            return;
        };
        self.session.stopping.store(true, Ordering::Relaxed);
        self.session.wake_link_thread();
        if thread.join().is_err() {
            error!("{}: the link thread panicked", self.session.name);
        }
        // Closes the connection: the backend sees the frontend leave.
        self.session.lock().connection = Connection::Gone;
        info!("{}: stopped", self.session.name);
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}
