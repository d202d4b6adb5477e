//! A VM-less vhost-user frontend: the "driver side" of a virtio device.
//!
//! Tests use [`VhostUserDriver`] to talk to a vhost-user backend over its real
//! Unix socket, the way QEMU or cloud-hypervisor would, but with the guest
//! reduced to one memfd-backed RAM region owned by the test process. The
//! driver lays out split virtqueues in that RAM, builds descriptor chains,
//! kicks, and reads completions back, so a test can assert on exactly what a
//! guest would see. The rings are `virtio_guest_driver`'s [`DriverQueue`], as
//! the hvisor simulator's guest has them; what is vhost-user's (negotiation,
//! memory table, eventfds) and the allocator of buffers in guest RAM are here.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
pub use virtio_guest_driver::Buffer;
use virtio_guest_driver::{DESC_SIZE, DriverQueue, QueueLayout};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Alignment of allocated buffers: enough for any header a device reads as a
/// struct, and it keeps neighbouring buffers from sharing bytes.
const BUFFER_ALIGN: u64 = 16;
/// Byte that fills device-writable buffers before they are handed over, so a
/// device that reports bytes it never wrote is caught, and so a buffer reused
/// from an earlier request can't pass a read-back check by accident.
pub const POISON_BYTE: u8 = 0xa5;

/// The default protocol features the driver asks for (and acks if offered).
pub fn default_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// How the driver sets up the device. Start from `DriverConfig::default()`.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Number of virtqueues to set up and enable.
    pub num_queues: usize,
    /// Entries per virtqueue (a power of two).
    pub queue_size: u16,
    /// Guest RAM size in bytes; rings and all buffers live in it.
    pub mem_size: u64,
    /// Guest-physical address of guest RAM. Non-zero by default so a backend
    /// that confuses guest addresses with offsets into the region fails.
    pub mem_base: u64,
    /// Device-specific feature bits the test wants; the driver acks those
    /// the backend offers (see [`VhostUserDriver::acked_features`]).
    pub device_features: u64,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` and suppress kicks/calls with it.
    /// Setup fails if the backend does not offer it.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` and put every chain in an
    /// indirect table. Setup fails if the backend does not offer it.
    pub indirect: bool,
    /// Protocol features to ack, intersected with what the backend offers.
    pub protocol_features: VhostUserProtocolFeatures,
    /// How long to keep retrying while the socket does not exist or refuses.
    pub connect_timeout: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            num_queues: 1,
            queue_size: 256,
            mem_size: 16 << 20,
            mem_base: 0x4000_0000,
            device_features: 0,
            event_idx: false,
            indirect: false,
            protocol_features: default_protocol_features(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("connecting to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("vhost-user {request} failed: {source}")]
    Vhost {
        request: &'static str,
        source: vhost::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error(transparent)]
    Queue(#[from] virtio_guest_driver::DriverError),
    #[error("backend does not offer {0}")]
    NotOffered(&'static str),
    #[error("backend has {available} queues, {wanted} were asked for")]
    TooFewQueues { available: u64, wanted: usize },
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("guest RAM has no free block of {0} bytes")]
    OutOfGuestMemory(u64),
    #[error("{0:#x} is not the start of an allocation")]
    NotAllocated(u64),
    #[error("queue {queue}: device used a buffer but sent no interrupt")]
    MissedInterrupt { queue: usize },
    #[error("queue {queue}: nothing used within {timeout:?}")]
    Timeout { queue: usize, timeout: Duration },
}

pub type Result<T> = std::result::Result<T, DriverError>;

fn vhost_err(request: &'static str) -> impl FnOnce(vhost::Error) -> DriverError {
    move |source| DriverError::Vhost { request, source }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DriverError {
    move |source| DriverError::Io { what, source }
}

/// A completed chain, as read from the used ring.
#[derive(Clone, Debug)]
pub struct UsedBuffer {
    /// Head descriptor index, as returned by `submit`/`enqueue`.
    pub head: u16,
    /// Byte count the device reported as written.
    pub len: u32,
    /// Full contents of each device-writable buffer the driver allocated, in
    /// chain order (bytes the device did not write hold [`POISON_BYTE`]).
    /// Empty for chains built with [`VhostUserDriver::enqueue_raw`].
    pub writable: Vec<Vec<u8>>,
}

/// Notification counters of one queue, for asserting on suppression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Kicks written to the kick eventfd.
    pub kicks: u64,
    /// Kicks skipped because the device asked not to be notified.
    pub suppressed_kicks: u64,
    /// Sum of the call eventfd counters read (interrupts the device sent).
    pub calls: u64,
}

/// First-fit allocator for guest RAM outside the rings.
#[derive(Debug)]
struct GuestAllocator {
    /// Free blocks, start -> length, never adjacent (merged on free).
    free: BTreeMap<u64, u64>,
    /// Live allocations, start -> length.
    used: HashMap<u64, u64>,
}

impl GuestAllocator {
    fn new(start: u64, len: u64) -> Self {
        GuestAllocator {
            free: BTreeMap::from([(start, len)]),
            used: HashMap::new(),
        }
    }

    fn alloc(&mut self, len: u64) -> Result<GuestAddress> {
        // Zero-length buffers still get a distinct address so they can be freed.
        let size = len.max(1).next_multiple_of(BUFFER_ALIGN);
        let (&start, &block) = self
            .free
            .iter()
            .find(|&(_, &block)| block >= size)
            .ok_or(DriverError::OutOfGuestMemory(len))?;
        self.free.remove(&start);
        if block > size {
            self.free.insert(start + size, block - size);
        }
        self.used.insert(start, size);
        Ok(GuestAddress(start))
    }

    fn free(&mut self, addr: GuestAddress) -> Result<()> {
        let mut start = addr.0;
        let mut size = self
            .used
            .remove(&start)
            .ok_or(DriverError::NotAllocated(start))?;
        if let Some(next) = self.free.remove(&(start + size)) {
            size += next;
        }
        if let Some((&prev, &prev_size)) = self.free.range(..start).next_back() {
            if prev + prev_size == start {
                self.free.remove(&prev);
                start = prev;
                size += prev_size;
            }
        }
        self.free.insert(start, size);
        Ok(())
    }
}

/// Guest RAM the driver allocated for a chain the device owns, until it shows up in the used
/// ring.
#[derive(Debug, Default)]
struct ChainMemory {
    /// Buffers and indirect table, to free.
    allocations: Vec<GuestAddress>,
    /// Device-writable buffers to copy out on completion.
    writable: Vec<(GuestAddress, u32)>,
}

/// One virtqueue: its rings, the guest RAM of the chains in flight, and its eventfds.
struct Virtqueue {
    ring: DriverQueue,
    /// The guest RAM of each chain in flight, by head (none for chains built with
    /// [`VhostUserDriver::enqueue_raw`]).
    chains: HashMap<u16, ChainMemory>,
    kick: EventFd,
    call: EventFd,
    /// Waits on `call` with a timeout.
    call_epoll: Epoll,
    stats: QueueStats,
}

/// Queue `queue` of `queues`.
fn queue_mut(queues: &mut [Virtqueue], queue: usize) -> Result<&mut Virtqueue> {
    queues.get_mut(queue).ok_or(DriverError::NoSuchQueue(queue))
}

fn memfd(name: &str, len: u64) -> Result<File> {
    let name = std::ffi::CString::new(name).expect("memfd name has no NUL");
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // memfd_create has no other memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd, so nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len)
        .map_err(io_err("sizing guest RAM memfd"))?;
    Ok(file)
}

/// Connects, retrying while the backend has not bound its socket yet.
fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(DriverError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

/// A connection after owner, feature and protocol-feature negotiation.
struct Negotiated {
    frontend: Frontend,
    offered_features: u64,
    acked_features: u64,
    offered_protocol_features: VhostUserProtocolFeatures,
    acked_protocol_features: VhostUserProtocolFeatures,
}

impl Negotiated {
    fn new(path: &Path, config: &DriverConfig) -> Result<Self> {
        let stream = connect_with_retry(path, config.connect_timeout)?;
        let mut frontend = Frontend::from_stream(stream, config.num_queues as u64);

        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered_features = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let mut acked_features = (1 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (config.device_features & offered_features);
        if config.event_idx {
            acked_features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if config.indirect {
            acked_features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        for (bit, name) in [
            (1 << VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (
                VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ),
            (1 << VIRTIO_RING_F_EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX"),
            (
                1 << VIRTIO_RING_F_INDIRECT_DESC,
                "VIRTIO_RING_F_INDIRECT_DESC",
            ),
        ] {
            if acked_features & bit != 0 && offered_features & bit == 0 {
                return Err(DriverError::NotOffered(name));
            }
        }

        let offered_protocol_features = frontend
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        let acked_protocol_features = offered_protocol_features & config.protocol_features;
        frontend
            .set_protocol_features(acked_protocol_features)
            .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        if acked_protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then gets an ack, so a backend rejecting a message
            // fails the call that sent it instead of a later, unrelated one.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked_protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let available = frontend
                .get_queue_num()
                .map_err(vhost_err("GET_QUEUE_NUM"))?;
            if available < config.num_queues as u64 {
                return Err(DriverError::TooFewQueues {
                    available,
                    wanted: config.num_queues,
                });
            }
        }
        frontend
            .set_features(acked_features)
            .map_err(vhost_err("SET_FEATURES"))?;
        Ok(Negotiated {
            frontend,
            offered_features,
            acked_features,
            offered_protocol_features,
            acked_protocol_features,
        })
    }
}

/// The frontend end of one vhost-user connection, with its guest RAM and
/// virtqueues. Dropping it closes the connection (see [`Self::disconnect`]).
pub struct VhostUserDriver {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    allocator: GuestAllocator,
    queues: Vec<Virtqueue>,
    offered_features: u64,
    acked_features: u64,
    offered_protocol_features: VhostUserProtocolFeatures,
    acked_protocol_features: VhostUserProtocolFeatures,
    event_idx: bool,
    indirect: bool,
    /// The inflight region from GET_INFLIGHT_FD, kept across reconnections.
    inflight: Option<(VhostUserInflight, File)>,
}

impl VhostUserDriver {
    /// Connects to the backend at `path` and brings the device up the way
    /// QEMU does: owner, feature and protocol-feature negotiation, memory
    /// table, then every queue configured and enabled, ready for requests.
    pub fn connect(path: impl AsRef<Path>, config: &DriverConfig) -> Result<Self> {
        assert!(
            config.queue_size.is_power_of_two(),
            "split queue size must be a power of two"
        );
        let negotiated = Negotiated::new(path.as_ref(), config)?;
        let mut frontend = negotiated.frontend;
        // Before the rings, as QEMU's vhost-user-blk does: a fresh region for every queue.
        let inflight = if negotiated
            .acked_protocol_features
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            let asked = VhostUserInflight::new(0, 0, config.num_queues as u16, config.queue_size);
            let (region, file) = frontend
                .get_inflight_fd(&asked)
                .map_err(vhost_err("GET_INFLIGHT_FD"))?;
            frontend
                .set_inflight_fd(&region, file.as_raw_fd())
                .map_err(vhost_err("SET_INFLIGHT_FD"))?;
            Some((region, file))
        } else {
            None
        };

        let mem = Self::create_guest_ram(config)?;
        Self::set_mem_table(&mut frontend, &mem)?;

        let rings_len = QueueLayout::footprint(config.queue_size);
        let data_start = config.mem_base + rings_len * config.num_queues as u64;
        assert!(
            data_start < config.mem_base + config.mem_size,
            "guest RAM too small for the rings"
        );
        let allocator =
            GuestAllocator::new(data_start, config.mem_base + config.mem_size - data_start);

        let mut driver = VhostUserDriver {
            frontend,
            mem,
            allocator,
            queues: Vec::with_capacity(config.num_queues),
            offered_features: negotiated.offered_features,
            acked_features: negotiated.acked_features,
            offered_protocol_features: negotiated.offered_protocol_features,
            acked_protocol_features: negotiated.acked_protocol_features,
            event_idx: config.event_idx,
            indirect: config.indirect,
            inflight,
        };
        for index in 0..config.num_queues {
            let at = GuestAddress(config.mem_base + rings_len * index as u64);
            driver.setup_queue(index, QueueLayout::new(config.queue_size, at))?;
        }
        Ok(driver)
    }

    /// Connects again to a backend started anew on `path` (after the previous one died) and
    /// restarts the device the way QEMU does after a reconnection: the same guest RAM and rings,
    /// the inflight region kept from the first connection, each ring's base set to its used
    /// index (QEMU's fallback when it could not ask the dead backend), and new kick and call
    /// eventfds, so that nothing kicks the device unless it kicks itself. Chains in flight stay
    /// in flight, waiting for the new backend.
    pub fn reconnect(&mut self, path: impl AsRef<Path>, config: &DriverConfig) -> Result<()> {
        let negotiated = Negotiated::new(path.as_ref(), config)?;
        self.frontend = negotiated.frontend;
        if let Some((region, file)) = &self.inflight {
            self.frontend
                .set_inflight_fd(region, file.as_raw_fd())
                .map_err(vhost_err("SET_INFLIGHT_FD"))?;
        }
        Self::set_mem_table(&mut self.frontend, &self.mem)?;
        for index in 0..self.queues.len() {
            let used_idx = self.device_used_idx(index)?;
            let (kick, call, call_epoll) = Self::ring_eventfds()?;
            let queue = &mut self.queues[index];
            (queue.kick, queue.call, queue.call_epoll) = (kick, call, call_epoll);
            self.configure_ring(index, used_idx)?;
        }
        Ok(())
    }

    /// The inflight region's file, when INFLIGHT_SHMFD was negotiated.
    pub fn inflight_file(&self) -> Option<&File> {
        self.inflight.as_ref().map(|(_, file)| file)
    }

    fn set_mem_table(frontend: &mut Frontend, mem: &GuestMemoryMmap) -> Result<()> {
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(vhost_err("describing guest RAM"))?;
        frontend
            .set_mem_table(&regions)
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        Ok(())
    }

    fn create_guest_ram(config: &DriverConfig) -> Result<GuestMemoryMmap> {
        // The backend maps guest RAM through the fd passed in SET_MEM_TABLE,
        // so it has to be a shareable file, not anonymous memory.
        let file = memfd("vhost-user-test-guest-ram", config.mem_size)?;
        let len = usize::try_from(config.mem_size).expect("guest RAM size fits in usize");
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(config.mem_base),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| io_err("mapping guest RAM")(io::Error::other(e)))
    }

    /// Frontend virtual address of a guest address: what SET_VRING_ADDR
    /// takes (vhost-user translates it through the memory table's
    /// `userspace_addr`, not through guest-physical addresses).
    fn frontend_addr(&self, addr: GuestAddress) -> Result<u64> {
        Ok(self.mem.get_host_address(addr)? as u64)
    }

    fn ring_eventfds() -> Result<(EventFd, EventFd, Epoll)> {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating kick eventfd"))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating call eventfd"))?;
        let call_epoll = Epoll::new().map_err(io_err("creating epoll"))?;
        call_epoll
            .ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(io_err("watching call eventfd"))?;
        Ok((kick, call, call_epoll))
    }

    fn setup_queue(&mut self, index: usize, layout: QueueLayout) -> Result<()> {
        let (kick, call, call_epoll) = Self::ring_eventfds()?;
        self.queues.push(Virtqueue {
            ring: DriverQueue::new(index as u32, layout),
            chains: HashMap::new(),
            kick,
            call,
            call_epoll,
            stats: QueueStats::default(),
        });
        self.configure_ring(index, 0)
    }

    /// Stops queue `index` (GET_VRING_BASE) and hands it to the backend again with its rings at
    /// `layout`, reading the available ring from `base` on; the driver side keeps its own
    /// layout, so requests go through [`Self::write_memory`] from then on.
    pub fn move_ring(&mut self, index: usize, layout: QueueLayout, base: u16) -> Result<()> {
        self.get_vring_base(index)?;
        self.configure_ring_at(index, layout, base)
    }

    /// Where queue `index`'s rings are in guest RAM.
    pub fn ring_layout(&self, index: usize) -> Result<QueueLayout> {
        Ok(self.queue(index)?.ring.layout)
    }

    /// Hands queue `index` to the backend, reading the available ring from `base` on.
    fn configure_ring(&mut self, index: usize, base: u16) -> Result<()> {
        let layout = self.queues[index].ring.layout;
        self.configure_ring_at(index, layout, base)
    }

    fn configure_ring_at(&mut self, index: usize, layout: QueueLayout, base: u16) -> Result<()> {
        let q = &self.queues[index];
        let ring_config = VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: self.frontend_addr(layout.desc)?,
            used_ring_addr: self.frontend_addr(layout.used)?,
            avail_ring_addr: self.frontend_addr(layout.avail)?,
            log_addr: None,
        };
        self.frontend
            .set_vring_num(index, layout.size)
            .map_err(vhost_err("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_base(index, base)
            .map_err(vhost_err("SET_VRING_BASE"))?;
        self.frontend
            .set_vring_addr(index, &ring_config)
            .map_err(vhost_err("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_call(index, &q.call)
            .map_err(vhost_err("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_kick(index, &q.kick)
            .map_err(vhost_err("SET_VRING_KICK"))?;
        // With PROTOCOL_FEATURES acked, rings start disabled until this.
        self.frontend
            .set_vring_enable(index, true)
            .map_err(vhost_err("SET_VRING_ENABLE"))
    }

    /// Feature bits the backend offered in GET_FEATURES.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Feature bits sent in SET_FEATURES.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Protocol features the backend offered in GET_PROTOCOL_FEATURES.
    pub fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.offered_protocol_features
    }

    /// Protocol features sent in SET_PROTOCOL_FEATURES.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol_features
    }

    /// The raw connection, for sending messages this driver does not wrap.
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Guest RAM, for tests that need `vm_memory::Bytes` directly.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Reads `size` bytes of device config space (GET_CONFIG).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .map_err(vhost_err("GET_CONFIG"))?;
        Ok(data)
    }

    /// Writes device config space (SET_CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::empty(), data)
            .map_err(vhost_err("SET_CONFIG"))
    }

    /// Stops a queue and returns the backend's next avail index
    /// (GET_VRING_BASE), as a frontend does before migration or reset.
    pub fn get_vring_base(&mut self, queue: usize) -> Result<u32> {
        self.queue(queue)?;
        self.frontend
            .get_vring_base(queue)
            .map_err(vhost_err("GET_VRING_BASE"))
    }

    /// Allocates `len` bytes of guest RAM (16-byte aligned).
    pub fn alloc(&mut self, len: u64) -> Result<GuestAddress> {
        self.allocator.alloc(len)
    }

    /// Returns memory from [`Self::alloc`].
    pub fn free(&mut self, addr: GuestAddress) -> Result<()> {
        self.allocator.free(addr)
    }

    /// Copies `data` into guest RAM at `addr`.
    pub fn write_memory(&self, addr: GuestAddress, data: &[u8]) -> Result<()> {
        Ok(self.mem.write_slice(data, addr)?)
    }

    /// Copies `len` bytes of guest RAM at `addr` out.
    pub fn read_memory(&self, addr: GuestAddress, len: usize) -> Result<Vec<u8>> {
        let mut data = vec![0u8; len];
        self.mem.read_slice(&mut data, addr)?;
        Ok(data)
    }

    fn queue(&self, queue: usize) -> Result<&Virtqueue> {
        self.queues
            .get(queue)
            .ok_or(DriverError::NoSuchQueue(queue))
    }

    /// Kick and call counters of `queue` since connecting.
    pub fn stats(&self, queue: usize) -> Result<QueueStats> {
        Ok(self.queue(queue)?.stats)
    }

    /// Chains handed to the device and not yet seen in the used ring.
    pub fn in_flight(&self, queue: usize) -> Result<usize> {
        Ok(self.queue(queue)?.ring.in_flight())
    }

    /// [`Self::enqueue`] then [`Self::notify`]: one request, as a guest
    /// driver without batching sends it. Returns the chain's head index.
    pub fn submit(&mut self, queue: usize, readable: &[&[u8]], writable: &[u32]) -> Result<u16> {
        let head = self.enqueue(queue, readable, writable)?;
        self.notify(queue)?;
        Ok(head)
    }

    /// Copies `readable` into fresh guest buffers, allocates `writable`
    /// buffers (filled with [`POISON_BYTE`]), and publishes the chain —
    /// readable buffers first, as virtio requires — in the avail ring
    /// without notifying the device. Returns the chain's head index.
    pub fn enqueue(&mut self, queue: usize, readable: &[&[u8]], writable: &[u32]) -> Result<u16> {
        self.queue(queue)?;
        let mut buffers = Vec::with_capacity(readable.len() + writable.len());
        let mut allocations = Vec::with_capacity(buffers.capacity());
        let mut readback = Vec::with_capacity(writable.len());
        let result = self.fill_buffers(readable, writable, &mut buffers, &mut allocations);
        if let Err(e) = result {
            self.release(&allocations);
            return Err(e);
        }
        for buffer in buffers.iter().filter(|b| b.device_writable) {
            readback.push((buffer.addr, buffer.len));
        }
        let memory = ChainMemory {
            allocations,
            writable: readback,
        };
        self.publish(queue, &buffers, memory)
    }

    fn fill_buffers(
        &mut self,
        readable: &[&[u8]],
        writable: &[u32],
        buffers: &mut Vec<Buffer>,
        allocations: &mut Vec<GuestAddress>,
    ) -> Result<()> {
        for data in readable {
            let addr = self.allocator.alloc(data.len() as u64)?;
            allocations.push(addr);
            self.mem.write_slice(data, addr)?;
            buffers.push(Buffer {
                addr,
                len: u32::try_from(data.len()).expect("buffer fits a descriptor"),
                device_writable: false,
            });
        }
        for &len in writable {
            let addr = self.allocator.alloc(u64::from(len))?;
            allocations.push(addr);
            self.mem
                .write_slice(&vec![POISON_BYTE; len as usize], addr)?;
            buffers.push(Buffer {
                addr,
                len,
                device_writable: true,
            });
        }
        Ok(())
    }

    /// Publishes a chain of caller-owned buffers, unchecked: order, addresses
    /// and lengths go to the device as given. Does not notify.
    pub fn enqueue_raw(&mut self, queue: usize, buffers: &[Buffer]) -> Result<u16> {
        self.publish(queue, buffers, ChainMemory::default())
    }

    fn release(&mut self, allocations: &[GuestAddress]) {
        for &addr in allocations {
            self.allocator
                .free(addr)
                .expect("driver frees only what it allocated");
        }
    }

    /// Puts `buffers` in the avail ring of `queue`, directly or (with indirect descriptors)
    /// through a table allocated here; `memory` is the chain's until it is used. On failure
    /// `memory` is freed.
    fn publish(
        &mut self,
        queue: usize,
        buffers: &[Buffer],
        mut memory: ChainMemory,
    ) -> Result<u16> {
        let ring = &mut queue_mut(&mut self.queues, queue)?.ring;
        let published = if self.indirect {
            self.allocator
                .alloc(DESC_SIZE * buffers.len() as u64)
                .and_then(|table| {
                    memory.allocations.push(table);
                    Ok(ring.add_indirect(&self.mem, table, buffers)?)
                })
        } else {
            ring.add(&self.mem, buffers).map_err(DriverError::from)
        };
        match published {
            Ok(head) => {
                self.queues[queue].chains.insert(head, memory);
                Ok(head)
            }
            Err(e) => {
                self.release(&memory.allocations);
                Err(e)
            }
        }
    }

    /// Kicks the device about everything enqueued since the last call,
    /// unless it asked not to be notified (`avail_event` with EVENT_IDX,
    /// `VRING_USED_F_NO_NOTIFY` without). Returns whether it kicked.
    pub fn notify(&mut self, queue: usize) -> Result<bool> {
        let ring = &mut queue_mut(&mut self.queues, queue)?.ring;
        let needed = ring.needs_notification(&self.mem, self.event_idx)?;
        if needed {
            self.kick(queue)?;
        } else {
            self.queues[queue].stats.suppressed_kicks += 1;
        }
        Ok(needed)
    }

    /// Moves `avail->idx` of `queue` `ahead` entries past what the driver published, without
    /// publishing anything: a broken or hostile driver.
    pub fn break_avail_idx(&mut self, queue: usize, ahead: u16) -> Result<()> {
        let ring = &self.queue(queue)?.ring;
        let idx = ring.avail_idx().wrapping_add(ahead);
        self.mem
            .store(idx.to_le(), ring.layout.avail_idx(), Ordering::Release)?;
        Ok(())
    }

    /// Kicks the device unconditionally.
    pub fn kick(&mut self, queue: usize) -> Result<()> {
        let q = queue_mut(&mut self.queues, queue)?;
        q.kick.write(1).map_err(io_err("writing kick eventfd"))?;
        q.stats.kicks += 1;
        Ok(())
    }

    /// The used index the device has published, taken by the driver or not.
    pub fn device_used_idx(&self, queue: usize) -> Result<u16> {
        Ok(self.queue(queue)?.ring.device_used_idx(&self.mem)?)
    }

    /// Takes the next used element, if the device has published one.
    pub fn poll_used(&mut self, queue: usize) -> Result<Option<UsedBuffer>> {
        let q = queue_mut(&mut self.queues, queue)?;
        let Some((head, len)) = q.ring.take_used(&self.mem)? else {
            return Ok(None);
        };
        let chain = q
            .chains
            .remove(&head)
            .expect("every chain in flight has its memory");
        let writable = chain
            .writable
            .iter()
            .map(|&(addr, len)| self.read_memory(addr, len as usize))
            .collect::<Result<Vec<_>>>()?;
        self.release(&chain.allocations);
        Ok(Some(UsedBuffer {
            head,
            len,
            writable,
        }))
    }

    /// Waits up to `timeout` for the next used element, sleeping on the call
    /// eventfd. A device that publishes the element but never interrupts
    /// gets [`DriverError::MissedInterrupt`], not a slow success.
    pub fn wait_used(&mut self, queue: usize, timeout: Duration) -> Result<UsedBuffer> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.poll_used(queue)? {
                return Ok(used);
            }
            if self.event_idx {
                // Ask for an interrupt as soon as the next element is used,
                // then look again: the device may have used it before it
                // could see the request.
                self.queues[queue].ring.request_interrupt(&self.mem)?;
                if let Some(used) = self.poll_used(queue)? {
                    return Ok(used);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || !self.wait_call(queue, remaining)? {
                return Err(if self.queues[queue].ring.used_pending(&self.mem)? {
                    DriverError::MissedInterrupt { queue }
                } else {
                    DriverError::Timeout { queue, timeout }
                });
            }
        }
    }

    /// Sleeps until the call eventfd fires or `timeout` passes, and counts
    /// the interrupts. Returns false on timeout.
    fn wait_call(&mut self, queue: usize, timeout: Duration) -> Result<bool> {
        let q = &mut self.queues[queue];
        let timeout_ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut events = [EpollEvent::default()];
        let ready = q
            .call_epoll
            .wait(timeout_ms, &mut events)
            .map_err(io_err("waiting on call eventfd"))?;
        if ready == 0 {
            return Ok(false);
        }
        match q.call.read() {
            Ok(count) => q.stats.calls += count,
            // Readiness without a count: nothing to add, just look again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err("reading call eventfd")(e)),
        }
        Ok(true)
    }

    /// Closes the connection, as a frontend that quits or crashes does.
    /// The backend sees EOF; guest RAM is unmapped on this side.
    pub fn disconnect(self) {
        drop(self);
    }
}
