//! A VM-less vhost-user frontend: the "driver side" of a virtio device.
//!
//! Tests use [`VhostUserDriver`] to talk to a vhost-user backend over its real
//! Unix socket, the way QEMU or cloud-hypervisor would, but with the guest
//! reduced to one memfd-backed RAM region owned by the test process. The
//! driver lays out split virtqueues in that RAM, builds descriptor chains,
//! kicks, and reads completions back, so a test can assert on exactly what a
//! guest would see.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering, fence};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;
/// Size of one used-ring element (`id: u32, len: u32`).
const USED_ELEM_SIZE: u64 = 8;
/// Rings are page aligned although virtio only needs 16/2/4-byte alignment:
/// it keeps every ring on its own page, which makes hex dumps readable.
const RING_ALIGN: u64 = 4096;
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
    #[error("backend does not offer {0}")]
    NotOffered(&'static str),
    #[error("backend has {available} queues, {wanted} were asked for")]
    TooFewQueues { available: u64, wanted: usize },
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    #[error("queue {queue}: {needed} descriptors needed, {free} free")]
    OutOfDescriptors {
        queue: usize,
        needed: usize,
        free: usize,
    },
    #[error("guest RAM has no free block of {0} bytes")]
    OutOfGuestMemory(u64),
    #[error("{0:#x} is not the start of an allocation")]
    NotAllocated(u64),
    #[error("queue {queue}: backend used head {head}, which was not in flight")]
    UnknownHead { queue: usize, head: u32 },
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

/// One buffer of a descriptor chain, in guest-physical terms. Used with
/// [`VhostUserDriver::enqueue_raw`] when a test needs control over addresses
/// (for example to point a descriptor outside guest RAM).
#[derive(Clone, Copy, Debug)]
pub struct GuestBuffer {
    pub addr: GuestAddress,
    pub len: u32,
    pub device_writable: bool,
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

/// A chain the device owns until it shows up in the used ring.
#[derive(Debug)]
struct InFlight {
    /// Descriptor-table entries to return to the free list.
    descs: Vec<u16>,
    /// Guest RAM the driver allocated for this chain (buffers, indirect table).
    allocations: Vec<GuestAddress>,
    /// Device-writable buffers to copy out on completion.
    writable: Vec<(GuestAddress, u32)>,
}

/// Driver-side state of one split virtqueue.
struct Virtqueue {
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    free_descs: Vec<u16>,
    /// Shadow of `avail->idx`: the next avail slot the driver fills.
    avail_idx: u16,
    /// `avail->idx` at the last notification decision (EVENT_IDX's "old").
    notified_avail_idx: u16,
    /// Next used-ring slot the driver will read.
    last_used_idx: u16,
    in_flight: HashMap<u16, InFlight>,
    kick: EventFd,
    call: EventFd,
    /// Waits on `call` with a timeout.
    call_epoll: Epoll,
    stats: QueueStats,
}

impl Virtqueue {
    fn avail_idx_addr(&self) -> GuestAddress {
        self.avail_ring.unchecked_add(2)
    }
    fn avail_slot_addr(&self, idx: u16) -> GuestAddress {
        self.avail_ring
            .unchecked_add(4 + 2 * u64::from(idx % self.size))
    }
    /// `used_event`, which the driver writes, sits after the avail ring.
    fn used_event_addr(&self) -> GuestAddress {
        self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size))
    }
    fn used_flags_addr(&self) -> GuestAddress {
        self.used_ring
    }
    fn used_idx_addr(&self) -> GuestAddress {
        self.used_ring.unchecked_add(2)
    }
    fn used_elem_addr(&self, idx: u16) -> GuestAddress {
        self.used_ring
            .unchecked_add(4 + USED_ELEM_SIZE * u64::from(idx % self.size))
    }
    /// `avail_event`, which the device writes, sits after the used ring.
    fn avail_event_addr(&self) -> GuestAddress {
        self.used_ring
            .unchecked_add(4 + USED_ELEM_SIZE * u64::from(self.size))
    }
}

/// Bytes each ring of a `size`-entry split queue needs: (desc, avail, used).
fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (DESC_SIZE * n, 6 + 2 * n, 6 + USED_ELEM_SIZE * n)
}

/// The virtio "should I notify?" test for EVENT_IDX (`vring_need_event`):
/// true if `event` lies in the window of indices published since `old`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
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
        let stream = connect_with_retry(path.as_ref(), config.connect_timeout)?;
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

        let offered_protocol = frontend
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        let acked_protocol_features = offered_protocol & config.protocol_features;
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

        let mem = Self::create_guest_ram(config)?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(vhost_err("describing guest RAM"))?;
        frontend
            .set_mem_table(&regions)
            .map_err(vhost_err("SET_MEM_TABLE"))?;

        let (desc_len, avail_len, used_len) = ring_sizes(config.queue_size);
        let rings_len = desc_len.next_multiple_of(RING_ALIGN)
            + avail_len.next_multiple_of(RING_ALIGN)
            + used_len.next_multiple_of(RING_ALIGN);
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
            offered_features,
            acked_features,
            offered_protocol_features: offered_protocol,
            acked_protocol_features,
            event_idx: config.event_idx,
            indirect: config.indirect,
        };
        for index in 0..config.num_queues {
            let desc_table = GuestAddress(config.mem_base + rings_len * index as u64);
            let avail_ring = desc_table.unchecked_add(desc_len.next_multiple_of(RING_ALIGN));
            let used_ring = avail_ring.unchecked_add(avail_len.next_multiple_of(RING_ALIGN));
            driver.setup_queue(index, config.queue_size, desc_table, avail_ring, used_ring)?;
        }
        Ok(driver)
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

    fn setup_queue(
        &mut self,
        index: usize,
        size: u16,
        desc_table: GuestAddress,
        avail_ring: GuestAddress,
        used_ring: GuestAddress,
    ) -> Result<()> {
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

        let ring_config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.frontend_addr(desc_table)?,
            used_ring_addr: self.frontend_addr(used_ring)?,
            avail_ring_addr: self.frontend_addr(avail_ring)?,
            log_addr: None,
        };
        self.frontend
            .set_vring_num(index, size)
            .map_err(vhost_err("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_base(index, 0)
            .map_err(vhost_err("SET_VRING_BASE"))?;
        self.frontend
            .set_vring_addr(index, &ring_config)
            .map_err(vhost_err("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_call(index, &call)
            .map_err(vhost_err("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_kick(index, &kick)
            .map_err(vhost_err("SET_VRING_KICK"))?;
        // With PROTOCOL_FEATURES acked, rings start disabled until this.
        self.frontend
            .set_vring_enable(index, true)
            .map_err(vhost_err("SET_VRING_ENABLE"))?;

        self.queues.push(Virtqueue {
            size,
            desc_table,
            avail_ring,
            used_ring,
            // Popped from the back, so heads are handed out 0, 1, 2, ...
            free_descs: (0..size).rev().collect(),
            avail_idx: 0,
            notified_avail_idx: 0,
            last_used_idx: 0,
            in_flight: HashMap::new(),
            kick,
            call,
            call_epoll,
            stats: QueueStats::default(),
        });
        Ok(())
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

    fn queue_mut(&mut self, queue: usize) -> Result<&mut Virtqueue> {
        self.queues
            .get_mut(queue)
            .ok_or(DriverError::NoSuchQueue(queue))
    }

    /// Kick and call counters of `queue` since connecting.
    pub fn stats(&self, queue: usize) -> Result<QueueStats> {
        Ok(self.queue(queue)?.stats)
    }

    /// Chains handed to the device and not yet seen in the used ring.
    pub fn in_flight(&self, queue: usize) -> Result<usize> {
        Ok(self.queue(queue)?.in_flight.len())
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
        self.publish(queue, &buffers, allocations, readback)
    }

    fn fill_buffers(
        &mut self,
        readable: &[&[u8]],
        writable: &[u32],
        buffers: &mut Vec<GuestBuffer>,
        allocations: &mut Vec<GuestAddress>,
    ) -> Result<()> {
        for data in readable {
            let addr = self.allocator.alloc(data.len() as u64)?;
            allocations.push(addr);
            self.mem.write_slice(data, addr)?;
            buffers.push(GuestBuffer {
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
            buffers.push(GuestBuffer {
                addr,
                len,
                device_writable: true,
            });
        }
        Ok(())
    }

    /// Publishes a chain of caller-owned buffers, unchecked: order, addresses
    /// and lengths go to the device as given. Does not notify.
    pub fn enqueue_raw(&mut self, queue: usize, buffers: &[GuestBuffer]) -> Result<u16> {
        self.publish(queue, buffers, Vec::new(), Vec::new())
    }

    fn release(&mut self, allocations: &[GuestAddress]) {
        for &addr in allocations {
            self.allocator
                .free(addr)
                .expect("driver frees only what it allocated");
        }
    }

    fn publish(
        &mut self,
        queue: usize,
        buffers: &[GuestBuffer],
        mut allocations: Vec<GuestAddress>,
        writable: Vec<(GuestAddress, u32)>,
    ) -> Result<u16> {
        if buffers.is_empty() {
            self.release(&allocations);
            return Err(DriverError::EmptyChain);
        }
        let needed = if self.indirect { 1 } else { buffers.len() };
        let free = self.queue(queue)?.free_descs.len();
        if free < needed {
            self.release(&allocations);
            return Err(DriverError::OutOfDescriptors {
                queue,
                needed,
                free,
            });
        }

        let descs: Vec<u16> = {
            let q = self.queue_mut(queue)?;
            let split_at = q.free_descs.len() - needed;
            q.free_descs.drain(split_at..).rev().collect()
        };
        let head = descs[0];
        let written = if self.indirect {
            self.write_indirect_chain(queue, head, buffers)
                .map(|table| allocations.push(table))
        } else {
            self.write_chain(queue, &descs, buffers)
        };
        if let Err(e) = written {
            self.queue_mut(queue)?.free_descs.extend(descs);
            self.release(&allocations);
            return Err(e);
        }

        let q = &mut self.queues[queue];
        self.mem
            .write_obj(head.to_le(), q.avail_slot_addr(q.avail_idx))?;
        q.avail_idx = q.avail_idx.wrapping_add(1);
        // Release: the device must see the descriptors and the ring slot
        // before it sees the new index.
        self.mem
            .store(q.avail_idx.to_le(), q.avail_idx_addr(), Ordering::Release)?;
        q.in_flight.insert(
            head,
            InFlight {
                descs,
                allocations,
                writable,
            },
        );
        Ok(head)
    }

    /// Writes `buffers` into the descriptor-table entries `descs`, linked
    /// in order.
    fn write_chain(&self, queue: usize, descs: &[u16], buffers: &[GuestBuffer]) -> Result<()> {
        let q = &self.queues[queue];
        for (i, buffer) in buffers.iter().enumerate() {
            let next = descs.get(i + 1).copied();
            let desc = Self::descriptor(buffer, next);
            let addr = q.desc_table.unchecked_add(DESC_SIZE * u64::from(descs[i]));
            self.mem.write_obj(desc, addr)?;
        }
        Ok(())
    }

    /// Writes `buffers` into a freshly allocated indirect table and points
    /// descriptor `head` at it. Returns the table's address.
    fn write_indirect_chain(
        &mut self,
        queue: usize,
        head: u16,
        buffers: &[GuestBuffer],
    ) -> Result<GuestAddress> {
        let table_len = DESC_SIZE * buffers.len() as u64;
        let table = self.allocator.alloc(table_len)?;
        let write_all = || -> Result<()> {
            for (i, buffer) in buffers.iter().enumerate() {
                // Indirect tables are indexed from their own start.
                let next = (i + 1 < buffers.len()).then_some(i as u16 + 1);
                self.mem.write_obj(
                    Self::descriptor(buffer, next),
                    table.unchecked_add(DESC_SIZE * i as u64),
                )?;
            }
            let head_desc = Descriptor::new(
                table.0,
                u32::try_from(table_len).expect("indirect table fits a descriptor"),
                VRING_DESC_F_INDIRECT as u16,
                0,
            );
            let head_addr = self.queues[queue]
                .desc_table
                .unchecked_add(DESC_SIZE * u64::from(head));
            self.mem.write_obj(head_desc, head_addr)?;
            Ok(())
        };
        match write_all() {
            Ok(()) => Ok(table),
            Err(e) => {
                self.release(&[table]);
                Err(e)
            }
        }
    }

    fn descriptor(buffer: &GuestBuffer, next: Option<u16>) -> Descriptor {
        let mut flags = 0;
        if buffer.device_writable {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        Descriptor::new(buffer.addr.0, buffer.len, flags, next.unwrap_or(0))
    }

    /// Kicks the device about everything enqueued since the last call,
    /// unless it asked not to be notified (`avail_event` with EVENT_IDX,
    /// `VRING_USED_F_NO_NOTIFY` without). Returns whether it kicked.
    pub fn notify(&mut self, queue: usize) -> Result<bool> {
        self.queue(queue)?;
        let q = &mut self.queues[queue];
        let (old, new) = (q.notified_avail_idx, q.avail_idx);
        q.notified_avail_idx = new;
        // The index store must be visible before the device's suppression
        // state is read, or both sides can decide the other will act.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let avail_event = u16::from_le(self.mem.load(q.avail_event_addr(), Ordering::Acquire)?);
            need_event(avail_event, new, old)
        } else {
            let flags = u16::from_le(self.mem.load(q.used_flags_addr(), Ordering::Acquire)?);
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
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
        let q = self.queue(queue)?;
        let idx = q.avail_idx.wrapping_add(ahead);
        self.mem
            .store(idx.to_le(), q.avail_idx_addr(), Ordering::Release)?;
        Ok(())
    }

    /// Kicks the device unconditionally.
    pub fn kick(&mut self, queue: usize) -> Result<()> {
        let q = self.queue_mut(queue)?;
        q.kick.write(1).map_err(io_err("writing kick eventfd"))?;
        q.stats.kicks += 1;
        Ok(())
    }

    /// Whether the device has published a used element not yet taken.
    fn used_pending(&self, queue: usize) -> Result<bool> {
        let q = self.queue(queue)?;
        // Acquire: the used element and written buffers are read after this.
        let used_idx = u16::from_le(self.mem.load(q.used_idx_addr(), Ordering::Acquire)?);
        Ok(used_idx != q.last_used_idx)
    }

    /// Takes the next used element, if the device has published one.
    pub fn poll_used(&mut self, queue: usize) -> Result<Option<UsedBuffer>> {
        if !self.used_pending(queue)? {
            return Ok(None);
        }
        let q = &self.queues[queue];
        let elem = q.used_elem_addr(q.last_used_idx);
        let head = u32::from_le(self.mem.read_obj(elem)?);
        let len = u32::from_le(self.mem.read_obj(elem.unchecked_add(4))?);

        let q = &mut self.queues[queue];
        q.last_used_idx = q.last_used_idx.wrapping_add(1);
        let chain = u16::try_from(head)
            .ok()
            .and_then(|h| q.in_flight.remove(&h))
            .ok_or(DriverError::UnknownHead { queue, head })?;
        q.free_descs.extend(&chain.descs);

        let writable = chain
            .writable
            .iter()
            .map(|&(addr, len)| self.read_memory(addr, len as usize))
            .collect::<Result<Vec<_>>>()?;
        self.release(&chain.allocations);
        Ok(Some(UsedBuffer {
            head: head as u16,
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
                let q = &self.queues[queue];
                self.mem.store(
                    q.last_used_idx.to_le(),
                    q.used_event_addr(),
                    Ordering::Release,
                )?;
                fence(Ordering::SeqCst);
                if let Some(used) = self.poll_used(queue)? {
                    return Ok(used);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || !self.wait_call(queue, remaining)? {
                return Err(if self.used_pending(queue)? {
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
