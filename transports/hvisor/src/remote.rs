//! The device side of a vhost-user backend in another process: this daemon is the backend's
//! vhost-user frontend (the vhost crate's `Frontend`), and the backend serves the zone's rings
//! directly in zone RAM.
//!
//! - Opening the device (before the hand-off) connects to the backend's socket and negotiates:
//!   SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, CONFIG, REPLY_ACK and RESET_DEVICE
//!   where offered; with REPLY_ACK every message asks for an answer, so a failure is seen where
//!   it happens) and GET_QUEUE_NUM. Starting it shares zone RAM with SET_MEM_TABLE: each
//!   region's file and offset, as the daemon maps it (a memfd window of the hand-off, or
//!   `/dev/hvisor` at `mmap_offset` = the region's zone0_ipa on a board).
//! - The registers map onto messages: DeviceFeatures are the backend's features minus
//!   [`super::mmio::NOT_OFFERED`]; FEATURES_OK sends SET_FEATURES (with PROTOCOL_FEATURES when
//!   the backend offered it); config space goes through GET_CONFIG/SET_CONFIG; QueueReady sends
//!   SET_VRING_NUM/BASE/ADDR/CALL/KICK and DRIVER_OK SET_VRING_ENABLE; a queue stopped or
//!   reset gets SET_VRING_ENABLE 0 and GET_VRING_BASE; a reset RESET_DEVICE where negotiated.
//!   QueueNotify only writes the kick eventfd the backend waits on; the backend's call eventfd
//!   is read by the interrupt thread ([`CallReader::InterruptThread`]) and becomes INT_VRING.
//! - Every guest access is answered whatever the backend does. A backend that refuses a
//!   message sets DEVICE_NEEDS_RESET. A message not answered within [`REPLY_TIMEOUT`] has its
//!   connection shut down by the device's watchdog thread (the vhost crate retries a timed-out
//!   read forever, so a socket timeout cannot bound it).
//! - A connection that fails or hangs up (watched by the device's link thread) is reconnected
//!   on the same socket for [`RECONNECT_WINDOW`]; the new backend gets the memory table, the
//!   negotiated features and every ready queue again, each ring resuming at the used index in
//!   guest memory (requests the old backend had taken but not completed are served again, as
//!   QEMU does without inflight tracking). A backend that does not come back sets
//!   DEVICE_NEEDS_RESET; the driver's reset then starts another reconnection window.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{ExternalBackend, MAX_REMOTE_QUEUES};
use super::counters::DeviceCounters;
use super::devices::{DeviceError, StartDevice, Started};
use super::interrupt::{CallReader, Injector, InterruptLine};
use super::mmio::{DeviceSide, NeedsReset, QueueRegisters};

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

/// Bounds each message to the backend: a message not answered within [`REPLY_TIMEOUT`] gets
/// its connection shut down, which ends the wait with an error. Its thread does nothing else.
struct Watchdog {
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watchdog {
    fn start(name: &str) -> io::Result<Self> {
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
    fn guard<T>(&self, exchange: impl FnOnce() -> Result<T, Failed>) -> Result<T, Failed> {
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
struct Link {
    frontend: Frontend,
    /// The same connection, to watch for a hang-up and to shut it down.
    stream: UnixStream,
    /// The backend's virtio features.
    features: u64,
    /// The protocol features in force.
    protocol: VhostUserProtocolFeatures,
    queues: usize,
}

/// A message that failed, by name.
struct Failed {
    message: &'static str,
    error: vhost::Error,
}

trait Named<T> {
    fn named(self, message: &'static str) -> Result<T, Failed>;
}

impl<T> Named<T> for vhost::Result<T> {
    fn named(self, message: &'static str) -> Result<T, Failed> {
        self.map_err(|error| Failed { message, error })
    }
}

impl Failed {
    fn at(self, socket: &Path) -> RemoteError {
        RemoteError::Message {
            socket: socket.to_owned(),
            message: self.message,
            source: self.error,
        }
    }

    /// The backend answered that the request failed (REPLY_ACK with an error, an empty
    /// GET_CONFIG); anything else broke the connection.
    fn refused(&self) -> bool {
        matches!(
            self.error,
            vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError)
        )
    }
}

impl Link {
    /// Connects to the backend of `backend` and negotiates, each message under `watchdog`.
    fn connect(backend: &ExternalBackend, watchdog: &Watchdog) -> Result<Link, RemoteError> {
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
                    | VhostUserProtocolFeatures::RESET_DEVICE);
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

    /// The features SET_FEATURES sends for the driver's `features`.
    fn features_for(&self, features: u64) -> u64 {
        features | self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn has_protocol_features(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
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
                    start: vm_memory::GuestMemoryRegion::start_addr(region).0,
                    source,
                }
            })
        })
        .collect()
}

/// The rings of `queue` at their addresses in this process, which SET_VRING_ADDR takes (the
/// backend translates them through the memory table). Each ring must lie in one region.
fn vring_config(
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
            link,
            watchdog,
        } = *self;
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
        let remote = Arc::new(Remote {
            name: name.clone(),
            backend,
            memory: memory.clone(),
            kicks,
            calls,
            needs_reset,
            watchdog,
            state: Mutex::new(State {
                connection: Connection::Up(link),
                generation: 0,
                features: None,
                queues: vec![None; num_queues],
            }),
            wake: EventFd::new(EFD_NONBLOCK).map_err(start_error)?,
            stopping: AtomicBool::new(false),
        });
        {
            let mut state = remote.lock();
            let Connection::Up(link) = &mut state.connection else {
                unreachable!("connected above")
            };
            remote
                .share_memory(link)
                .map_err(|error| start_error(io::Error::other(error)))?;
        }
        let link_thread = {
            let remote = remote.clone();
            std::thread::Builder::new()
                .name(format!("{name}-link"))
                .spawn(move || remote.run_link_thread())
                .map_err(start_error)?
        };
        let device = RemoteDevice {
            remote,
            features,
            queue_size,
            line,
            counters,
            link_thread: Some(link_thread),
        };
        Ok(Started::new(name, device, memory))
    }
}

/// The state of the connection to the backend.
enum Connection {
    Up(Link),
    /// The connection failed or hung up; the link thread connects again.
    Reconnecting,
    /// The backend did not come back in time: DEVICE_NEEDS_RESET is set, and the driver's
    /// reset starts another reconnection.
    Gone,
}

/// A ready queue, as the backend must know it.
#[derive(Clone, Copy, Debug)]
struct Ring {
    registers: QueueRegisters,
    /// DRIVER_OK: the ring is enabled.
    live: bool,
}

struct State {
    connection: Connection,
    /// Counts the links made after the first, so that the link thread knows whether the
    /// hang-up it saw is the current link's.
    generation: u64,
    /// The driver's features, once accepted at FEATURES_OK.
    features: Option<u64>,
    /// Each queue the driver made ready.
    queues: Vec<Option<Ring>>,
}

/// Why a message did not take effect.
enum Undelivered {
    /// No connection: the backend is being reconnected, or gone.
    NoLink,
    /// The backend answered that it failed.
    Refused(&'static str),
    /// The connection failed and was closed (logged); the link thread reconnects.
    Broken,
}

/// What the request loop and the link thread share.
struct Remote {
    name: String,
    backend: ExternalBackend,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Written by QueueNotify, read by the backend.
    kicks: Vec<EventFd>,
    /// Written by the backend, read by the interrupt thread (duplicates of the line's).
    calls: Vec<EventFd>,
    needs_reset: NeedsReset,
    watchdog: Watchdog,
    state: Mutex<State>,
    /// Wakes the link thread: the connection changed, or the daemon stops.
    wake: EventFd,
    stopping: AtomicBool,
}

impl Remote {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn socket(&self) -> std::path::Display<'_> {
        self.backend.socket.display()
    }

    fn wake_link_thread(&self) {
        if let Err(error) = self.wake.write(1) {
            error!("{}: cannot wake the link thread: {error}", self.name);
        }
    }

    /// Runs `request` on the link under the watchdog. A connection failure closes the link and
    /// has the link thread reconnect.
    fn send<T>(
        &self,
        state: &mut State,
        request: impl FnOnce(&mut Link) -> Result<T, Failed>,
    ) -> Result<T, Undelivered> {
        let Connection::Up(link) = &mut state.connection else {
            return Err(Undelivered::NoLink);
        };
        match self.watchdog.guard(|| request(link)) {
            Ok(value) => Ok(value),
            Err(failed) if failed.refused() => Err(Undelivered::Refused(failed.message)),
            Err(Failed { message, error }) => {
                error!(
                    "{}: vhost-user backend at {}: {message} failed: {error}; reconnecting",
                    self.name,
                    self.socket()
                );
                state.connection = Connection::Reconnecting;
                self.wake_link_thread();
                Err(Undelivered::Broken)
            }
        }
    }

    /// A message that changes the device's state did not take effect: the device needs a reset
    /// if the backend refused it or is gone. While the backend reconnects, what the message
    /// would have set is replayed to the new one.
    fn undelivered(&self, state: &State, why: Undelivered) {
        match why {
            Undelivered::Refused(message) => {
                self.needs_reset.raise(
                    &self.name,
                    format_args!(
                        "the vhost-user backend at {} refused {message}",
                        self.socket()
                    ),
                );
            }
            Undelivered::NoLink if matches!(state.connection, Connection::Gone) => {
                self.needs_reset.raise(
                    &self.name,
                    format_args!("the vhost-user backend at {} is gone", self.socket()),
                );
            }
            Undelivered::NoLink | Undelivered::Broken => {}
        }
    }

    /// Runs `request` for a message that changes the device's state (see [`Self::undelivered`]).
    fn apply(&self, state: &mut State, request: impl FnOnce(&mut Link) -> Result<(), Failed>) {
        if let Err(why) = self.send(state, request) {
            self.undelivered(state, why);
        }
    }

    fn share_memory(&self, link: &mut Link) -> Result<(), RemoteError> {
        let table = memory_table(&self.memory.memory())?;
        self.watchdog
            .guard(|| link.frontend.set_mem_table(&table).named("SET_MEM_TABLE"))
            .map_err(|failed| failed.at(&self.backend.socket))?;
        Ok(())
    }

    /// Sets up ring `index` on the backend, resuming at avail index `base`.
    fn start_ring(
        &self,
        link: &mut Link,
        index: usize,
        ring: &Ring,
        base: u16,
    ) -> Result<(), Failed> {
        let config = vring_config(&self.memory.memory(), &ring.registers).map_err(|_| Failed {
            message: "SET_VRING_ADDR",
            error: vhost::Error::InvalidQueue,
        })?;
        let frontend = &mut link.frontend;
        frontend
            .set_vring_num(index, ring.registers.num)
            .named("SET_VRING_NUM")?;
        frontend
            .set_vring_base(index, base)
            .named("SET_VRING_BASE")?;
        frontend
            .set_vring_addr(index, &config)
            .named("SET_VRING_ADDR")?;
        frontend
            .set_vring_call(index, &self.calls[index])
            .named("SET_VRING_CALL")?;
        frontend
            .set_vring_kick(index, &self.kicks[index])
            .named("SET_VRING_KICK")?;
        if ring.live {
            self.enable_ring(link, index)?;
        }
        Ok(())
    }

    /// Enables ring `index` and kicks it, so that what the driver made available is served.
    fn enable_ring(&self, link: &mut Link, index: usize) -> Result<(), Failed> {
        // Without PROTOCOL_FEATURES the backend enabled its rings at SET_FEATURES.
        if link.has_protocol_features() {
            link.frontend
                .set_vring_enable(index, true)
                .named("SET_VRING_ENABLE")?;
        }
        self.kick(index);
        Ok(())
    }

    fn kick(&self, index: usize) {
        if let Err(error) = self.kicks[index].write(1) {
            error!("{}: kicking queue {index}: {error}", self.name);
        }
    }

    /// Gives a new backend everything the old one had: the memory table, the features and the
    /// ready rings, each resuming at its used index in guest memory. Returns the rings
    /// restored.
    fn restore(&self, state: &State, link: &mut Link) -> Result<usize, RemoteError> {
        let socket = &self.backend.socket;
        if link.queues < state.queues.len() {
            return Err(RemoteError::TooFewQueues {
                socket: socket.clone(),
                reported: link.queues as u64,
                wanted: state.queues.len() as u16,
            });
        }
        self.share_memory(link)?;
        if let Some(features) = state.features {
            let missing = features & !link.features;
            if missing != 0 {
                return Err(RemoteError::LostFeatures {
                    socket: socket.clone(),
                    features: link.features,
                    missing,
                });
            }
            let features = link.features_for(features);
            self.watchdog
                .guard(|| link.frontend.set_features(features).named("SET_FEATURES"))
                .map_err(|failed| failed.at(socket))?;
        }
        let mut restored = 0;
        for (index, ring) in state.queues.iter().enumerate() {
            let Some(ring) = ring else { continue };
            let used_index = GuestAddress(ring.registers.used + 2);
            let base = self
                .memory
                .memory()
                .read_obj::<u16>(used_index)
                .map(u16::from_le)
                .map_err(|_| RemoteError::Message {
                    socket: socket.clone(),
                    message: "SET_VRING_BASE",
                    source: vhost::Error::UsedAddress,
                })?;
            self.watchdog
                .guard(|| self.start_ring(link, index, ring, base))
                .map_err(|failed| failed.at(socket))?;
            restored += 1;
        }
        Ok(restored)
    }

    /// Watches the connection for a hang-up and reconnects a backend that went away, until the
    /// daemon stops.
    fn run_link_thread(&self) {
        if let Err(error) = self.watch_link() {
            error!("{}: link thread: {error}", self.name);
        }
    }

    fn watch_link(&self) -> io::Result<()> {
        const WAKE: u64 = 0;
        const HANGUP: u64 = 1;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        // The connection watched, with its generation.
        let mut watched: Option<(u64, UnixStream)> = None;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
            let reconnect = {
                let state = self.lock();
                match &state.connection {
                    Connection::Up(link) => {
                        if watched.as_ref().map(|(generation, _)| *generation)
                            != Some(state.generation)
                        {
                            if let Some((_, old)) = watched.take() {
                                epoll.ctl(
                                    ControlOperation::Delete,
                                    old.as_raw_fd(),
                                    EpollEvent::default(),
                                )?;
                            }
                            let stream = link.stream.try_clone()?;
                            epoll.ctl(
                                ControlOperation::Add,
                                stream.as_raw_fd(),
                                EpollEvent::new(EventSet::READ_HANG_UP, HANGUP),
                            )?;
                            watched = Some((state.generation, stream));
                        }
                        false
                    }
                    Connection::Reconnecting => true,
                    Connection::Gone => false,
                }
            };
            if reconnect {
                if let Some((_, old)) = watched.take() {
                    epoll.ctl(
                        ControlOperation::Delete,
                        old.as_raw_fd(),
                        EpollEvent::default(),
                    )?;
                }
                self.reconnect(&epoll, &mut events);
                continue;
            }
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            for event in &events[..ready] {
                if event.data() == WAKE {
                    let _ = self.wake.read();
                    continue;
                }
                let Some((generation, stream)) = watched.take() else {
                    continue;
                };
                epoll.ctl(
                    ControlOperation::Delete,
                    stream.as_raw_fd(),
                    EpollEvent::default(),
                )?;
                let mut state = self.lock();
                if state.generation == generation && matches!(state.connection, Connection::Up(_)) {
                    warn!(
                        "{}: the vhost-user backend at {} hung up; reconnecting",
                        self.name,
                        self.socket()
                    );
                    state.connection = Connection::Reconnecting;
                }
            }
        }
    }

    /// Connects again for up to [`RECONNECT_WINDOW`]; a backend that does not come back (or
    /// cannot take the device's state) sets DEVICE_NEEDS_RESET.
    fn reconnect(&self, epoll: &Epoll, events: &mut [EpollEvent]) {
        let deadline = Instant::now() + RECONNECT_WINDOW;
        loop {
            let attempt = Link::connect(&self.backend, &self.watchdog).and_then(|mut link| {
                let mut state = self.lock();
                if !matches!(state.connection, Connection::Reconnecting) {
                    return Ok(None);
                }
                let restored = self.restore(&state, &mut link)?;
                state.connection = Connection::Up(link);
                state.generation += 1;
                Ok(Some(restored))
            });
            let error = match attempt {
                Ok(Some(restored)) => {
                    info!(
                        "{}: reconnected to the vhost-user backend at {}; {restored} ring(s) \
                         restored",
                        self.name,
                        self.socket()
                    );
                    return;
                }
                Ok(None) => return,
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                let mut state = self.lock();
                if matches!(state.connection, Connection::Reconnecting) {
                    state.connection = Connection::Gone;
                    error!(
                        "{}: the vhost-user backend did not come back within \
                         {RECONNECT_WINDOW:?}: {error}",
                        self.name
                    );
                    self.undelivered(&state, Undelivered::NoLink);
                }
                return;
            }
            // Waits out the interval; a wake-up (the daemon stops) ends it early.
            let timeout = i32::try_from(RECONNECT_INTERVAL.as_millis()).unwrap_or(i32::MAX);
            if let Ok(ready) = epoll.wait(timeout, events) {
                if ready > 0 {
                    let _ = self.wake.read();
                }
            }
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// A vhost-user backend in another process behind virtio-mmio.
pub struct RemoteDevice {
    remote: Arc<Remote>,
    /// The features the backend offered when the daemon started.
    features: u64,
    queue_size: u16,
    line: Arc<InterruptLine>,
    counters: Arc<DeviceCounters>,
    link_thread: Option<JoinHandle<()>>,
}

impl DeviceSide for RemoteDevice {
    fn device_id(&self) -> u32 {
        self.remote.backend.device_id
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn num_queues(&self) -> usize {
        self.remote.kicks.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn line(&self) -> &Arc<InterruptLine> {
        &self.line
    }

    fn needs_reset(&self) -> &NeedsReset {
        &self.remote.needs_reset
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn read_config(&mut self, offset: u32, size: u8) -> Result<u64, String> {
        let remote = &self.remote;
        let mut state = remote.lock();
        let mut value = [0u8; 8];
        let len = usize::from(size);
        let read = remote.send(&mut state, |link| {
            if !link.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                return Ok(None);
            }
            let (_, bytes) = link
                .frontend
                .get_config(
                    offset,
                    u32::from(size),
                    VhostUserConfigFlags::empty(),
                    &value[..len],
                )
                .named("GET_CONFIG")?;
            Ok(Some(bytes))
        });
        match read {
            Ok(Some(bytes)) => {
                value[..len].copy_from_slice(&bytes[..len]);
                Ok(u64::from_le_bytes(value))
            }
            Ok(None) => Err("the backend has no config space (no CONFIG protocol feature)".into()),
            Err(Undelivered::Refused(_)) => Err("the backend refused GET_CONFIG".into()),
            Err(Undelivered::NoLink | Undelivered::Broken) => {
                Err("the backend is not connected".into())
            }
        }
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        let remote = &self.remote;
        let mut state = remote.lock();
        let written = remote.send(&mut state, |link| {
            if !link.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                return Ok(false);
            }
            link.frontend
                .set_config(offset, VhostUserConfigFlags::empty(), data)
                .named("SET_CONFIG")?;
            Ok(true)
        });
        match written {
            Ok(true) => Ok(()),
            Ok(false) => Err("the backend has no config space (no CONFIG protocol feature)".into()),
            Err(Undelivered::Refused(_)) => Err("the backend refused SET_CONFIG".into()),
            Err(Undelivered::NoLink | Undelivered::Broken) => {
                Err("the backend is not connected".into())
            }
        }
    }

    fn accept_features(&mut self, features: u64) {
        let remote = &self.remote;
        let mut state = remote.lock();
        state.features = Some(features);
        remote.apply(&mut state, |link| {
            let features = link.features_for(features);
            link.frontend.set_features(features).named("SET_FEATURES")
        });
    }

    fn enable_queue(
        &mut self,
        index: usize,
        queue: QueueRegisters,
        _driver_features: u64,
        live: bool,
    ) -> Result<(), String> {
        vring_config(&self.remote.memory.memory(), &queue)?;
        let ring = Ring {
            registers: queue,
            live,
        };
        let remote = &self.remote;
        let mut state = remote.lock();
        state.queues[index] = Some(ring);
        remote.apply(&mut state, |link| remote.start_ring(link, index, &ring, 0));
        Ok(())
    }

    fn disable_queue(&mut self, index: usize, was_ready: bool) {
        if !was_ready {
            return;
        }
        let remote = &self.remote;
        let mut state = remote.lock();
        state.queues[index] = None;
        remote.apply(&mut state, |link| {
            if link.has_protocol_features() {
                link.frontend
                    .set_vring_enable(index, false)
                    .named("SET_VRING_ENABLE")?;
            }
            // Stops the ring; the backend answers once it has finished with it.
            link.frontend
                .get_vring_base(index)
                .named("GET_VRING_BASE")
                .map(drop)
        });
    }

    fn start_queue(&mut self, index: usize) {
        let remote = &self.remote;
        let mut state = remote.lock();
        let Some(ring) = state.queues[index].as_mut() else {
            return;
        };
        ring.live = true;
        remote.apply(&mut state, |link| remote.enable_ring(link, index));
    }

    fn kick(&self, index: usize) {
        self.remote.kick(index);
    }

    fn reset(&mut self) {
        let remote = &self.remote;
        let mut state = remote.lock();
        state.features = None;
        remote.apply(&mut state, |link| {
            if !link
                .protocol
                .contains(VhostUserProtocolFeatures::RESET_DEVICE)
            {
                return Ok(());
            }
            link.frontend.reset_device().named("RESET_DEVICE")
        });
        remote.needs_reset.clear();
        if matches!(state.connection, Connection::Gone) {
            info!(
                "{}: reset; trying the vhost-user backend at {} again",
                remote.name,
                remote.socket()
            );
            state.connection = Connection::Reconnecting;
            remote.wake_link_thread();
        }
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.link_thread.take() else {
            return;
        };
        self.remote.stopping.store(true, Ordering::Relaxed);
        self.remote.wake_link_thread();
        if thread.join().is_err() {
            error!("{}: the link thread panicked", self.remote.name);
        }
        // Closes the connection: the backend sees the frontend leave.
        self.remote.lock().connection = Connection::Gone;
        info!("{}: stopped", self.remote.name);
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}
