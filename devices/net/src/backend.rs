//! The virtio-net device as a `VhostUserBackend`: one worker thread per RX/TX queue pair, each
//! with its own TAP queue, and the control queue on the first one.
//!
//! RX is driven by the TAP, but the TAP is only watched while the guest has posted receive
//! buffers: when the RX queue runs dry the TAP is taken out of the wait set (frames wait in the
//! kernel, where they are not lost), and the next RX kick puts it back. TX writes each chain to
//! the TAP as it stands (the virtio-net header is the TAP's vnet header); when the TAP is full
//! the chain stays in the ring and the TAP is watched for room.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Address, ByteValued, Bytes, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryMmap, Le16, Le32,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use hvisor_vhost_core::backend::{COMMON_FEATURES, GuestMemorySlot, common_protocol_features};
use hvisor_vhost_core::chain::{Segment, read_stream, split_chain, total_len, write_stream};
use hvisor_vhost_core::config_space::read_config;
use hvisor_vhost_core::exit::new_exit_event;
use hvisor_vhost_core::log_limit::LogLimiter;
use hvisor_vhost_core::queue::{Rings, queue_is_live};
use hvisor_vhost_core::{EventRegistry, VIRTIO_ID_NET, VirtioDevice};

use crate::config::{MacAddress, NetConfig};
use crate::tap::{Tap, TapError, TapQueue};
use crate::virtio_net::*;

/// Errors building the backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("{taps} TAP queues given for {pairs} queue pairs")]
    TapCount { taps: usize, pairs: u16 },
    #[error("cannot prepare TAP queue {queue}: {source}")]
    TapSetup { queue: usize, source: io::Error },
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Position of each queue inside its worker thread (`device_event` of a kick).
const RX_QUEUE_EVENT: u16 = 0;
const TX_QUEUE_EVENT: u16 = 1;
const CTRL_QUEUE_EVENT: u16 = 2;

/// Frames moved from the TAP per wake-up before the worker looks at its other events; the TAP
/// stays in the wait set, so the rest follows on the next round.
const RX_BATCH: usize = 256;

/// At most one line per queue pair and interval about dropped frames and chains.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Link speed and MTU reported in config space; drivers only use them when MTU or
/// SPEED_DUPLEX are offered, which they are not, but no byte is left undefined.
const CONFIG_MTU: u16 = 1500;

/// Counters of one device, over all queue pairs.
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// TX chains returned unsent: malformed, or refused by the TAP.
    pub tx_dropped: AtomicU64,
    /// Frames from the TAP not delivered (malformed or too big for a non-mergeable buffer)
    /// and RX chains returned empty because they were malformed.
    pub rx_dropped: AtomicU64,
}

impl NetStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One RX chain taken for the frame being delivered.
struct RxChain {
    head: u16,
    /// Range of its buffers in `PairState::rx_segments`.
    segments: std::ops::Range<usize>,
    capacity: usize,
}

/// What one worker thread keeps between events. Locked by that worker only, and by
/// `stop_vring` to wait for the batch in flight.
struct PairState {
    /// The TAP is in the wait set for reading / for writing.
    rx_listening: bool,
    tx_waiting: bool,
    /// Length of the frame in `rx_frame` that is read but not yet delivered (0: none).
    rx_pending: usize,
    /// One byte over the largest frame, so an oversized read is recognised.
    rx_frame: Vec<u8>,
    rx_chains: Vec<RxChain>,
    rx_segments: Vec<Segment>,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    tx_iovecs: Vec<libc::iovec>,
    /// Reports dropped frames and chains, at most one line per interval.
    drops: LogLimiter,
}

// SAFETY: the raw pointers in `tx_iovecs` are only dereferenced by `writev` while the guest
// memory they were built from is borrowed, inside one call on one thread; between frames they
// are stale values that are cleared before any use.
unsafe impl Send for PairState {}

impl Default for PairState {
    fn default() -> Self {
        PairState {
            rx_listening: false,
            tx_waiting: false,
            rx_pending: 0,
            rx_frame: vec![0; MAX_FRAME_LEN + 1],
            rx_chains: Vec::new(),
            rx_segments: Vec::new(),
            readable: Vec::new(),
            writable: Vec::new(),
            tx_iovecs: Vec::new(),
            drops: LogLimiter::new(module_path!(), DROP_LOG_INTERVAL),
        }
    }
}

/// An RX/TX queue pair and the TAP queue it serves.
struct QueuePair<T> {
    tap: T,
    /// Duplicates of the TAP descriptor: epoll keys interest on the descriptor, so readable
    /// and writable interest can be added and removed independently through the registry's
    /// plain add/remove.
    rx_watch: OwnedFd,
    tx_watch: OwnedFd,
    /// The TAP queue takes frames from the kernel (multiqueue: VQ_PAIRS_SET detaches the
    /// pairs the driver does not use, so no frame is steered to a queue nobody reads).
    attached: AtomicBool,
    registry: Mutex<Option<Arc<dyn EventRegistry>>>,
    state: Mutex<PairState>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum TxError {
    WouldBlock,
    Drop(String),
}

enum RxStop {
    TapEmpty,
    /// No (or not enough) buffers; the last `rewound` chains were put back in the ring.
    QueueDry {
        rewound: u16,
    },
    BatchFull,
    TapFailed,
}

enum Delivery {
    Done,
    FrameDropped,
    NoRoom { rewound: u16 },
}

/// A virtio-net device over TAP queues: [`Tap`] in production, anything implementing
/// [`TapQueue`] in tests.
pub struct NetBackend<T = Tap> {
    pairs: Vec<QueuePair<T>>,
    mac: MacAddress,
    queue_size: u16,
    supports_ufo: bool,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    memory: GuestMemorySlot,
    rings: Rings,
    stats: NetStats,
}

impl NetBackend<Tap> {
    /// Attaches to (or creates) the TAP described by a validated config.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let taps = Tap::open_queues(&config.tap, config.queue_pairs, config.create_tap)?;
        Self::with_taps(taps, config)
    }
}

impl<T: TapQueue> NetBackend<T> {
    /// A device over already opened TAP queues, one per queue pair.
    pub fn with_taps(taps: Vec<T>, config: &NetConfig) -> Result<Self, NetError> {
        if taps.len() != usize::from(config.queue_pairs) || taps.is_empty() {
            return Err(NetError::TapCount {
                taps: taps.len(),
                pairs: config.queue_pairs,
            });
        }
        // UFO went away in Linux 4.14 and came back only for virtio compatibility on some
        // kernels: offer it only where the TAP accepts it.
        let supports_ufo = taps[0]
            .set_offloads(libc::TUN_F_CSUM | libc::TUN_F_UFO)
            .is_ok();
        let pairs = taps
            .into_iter()
            .enumerate()
            .map(|(queue, tap)| {
                let setup = |source| NetError::TapSetup { queue, source };
                tap.set_offloads(0).map_err(setup)?;
                let rx_watch = tap.as_fd().try_clone_to_owned().map_err(setup)?;
                let tx_watch = tap.as_fd().try_clone_to_owned().map_err(setup)?;
                Ok(QueuePair {
                    tap,
                    rx_watch,
                    tx_watch,
                    attached: AtomicBool::new(true),
                    registry: Mutex::new(None),
                    state: Mutex::default(),
                })
            })
            .collect::<Result<Vec<_>, NetError>>()?;
        Ok(NetBackend {
            pairs,
            mac: config.mac(),
            queue_size: config.queue_size,
            supports_ufo,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            memory: GuestMemorySlot::default(),
            rings: Rings::default(),
            stats: NetStats::default(),
        })
    }

    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    fn has_control_queue(&self) -> bool {
        self.pairs.len() > 1
    }

    fn control_queue_index(&self) -> usize {
        2 * self.pairs.len()
    }

    fn rx_queue_index(pair: usize) -> u16 {
        2 * pair as u16
    }

    fn tx_queue_index(pair: usize) -> u16 {
        2 * pair as u16 + 1
    }

    /// Registry value for "the TAP is readable"; queues and the exit event use the values up
    /// to `num_queues`.
    fn tap_readable_event(&self) -> u16 {
        self.num_queues() as u16 + 1
    }

    fn tap_writable_event(&self) -> u16 {
        self.num_queues() as u16 + 2
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features.load(Ordering::Relaxed) & (1 << feature) != 0
    }

    fn header_len(&self) -> usize {
        header_len(self.acked_features.load(Ordering::Relaxed))
    }

    fn config_space(&self) -> VirtioNetConfig {
        VirtioNetConfig {
            mac: self.mac.0,
            status: Le16::from(VIRTIO_NET_S_LINK_UP as u16),
            max_virtqueue_pairs: Le16::from(self.pairs.len() as u16),
            mtu: Le16::from(CONFIG_MTU),
            speed: Le32::from(SPEED_UNKNOWN),
            duplex: DUPLEX_UNKNOWN,
            ..VirtioNetConfig::default()
        }
    }

    fn guest_memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.memory.current()
    }

    /// Passes the offloads the driver accepts to the TAP, without UFO where the kernel
    /// refuses it.
    fn apply_offloads(&self, index: usize, offloads: u32) {
        let tap = &self.pairs[index].tap;
        let result = match tap.set_offloads(offloads) {
            Err(error)
                if error.raw_os_error() == Some(libc::EINVAL)
                    && offloads & libc::TUN_F_UFO != 0 =>
            {
                info!("queue pair {index}: the TAP refuses UFO; receiving UDP unsegmented");
                tap.set_offloads(offloads & !libc::TUN_F_UFO)
            }
            result => result,
        };
        if let Err(error) = result {
            warn!("queue pair {index}: cannot set TAP offloads {offloads:#x}: {error}");
        }
    }

    /// Lets the TAP steer frames to the first `active` queues only.
    fn set_active_pairs(&self, active: usize) -> io::Result<()> {
        if !self.has_control_queue() {
            return Ok(());
        }
        for (index, pair) in self.pairs.iter().enumerate() {
            let enable = index < active;
            if pair.attached.load(Ordering::Relaxed) == enable {
                continue;
            }
            pair.tap.set_queue_enabled(enable)?;
            pair.attached.store(enable, Ordering::Relaxed);
        }
        Ok(())
    }

    fn registry(&self, pair: &QueuePair<T>) -> Option<Arc<dyn EventRegistry>> {
        lock(&pair.registry).clone()
    }

    /// Adds or removes the TAP's readable interest in the pair's worker wait set.
    fn set_rx_listening(&self, index: usize, state: &mut PairState, listen: bool) {
        let pair = &self.pairs[index];
        let watch = (
            pair.rx_watch.as_raw_fd(),
            EventSet::IN,
            self.tap_readable_event(),
        );
        self.set_tap_interest(index, watch, &mut state.rx_listening, listen, "read");
    }

    /// Adds or removes the TAP's writable interest (waiting for room after EAGAIN).
    fn set_tx_waiting(&self, index: usize, state: &mut PairState, wait: bool) {
        let pair = &self.pairs[index];
        let watch = (
            pair.tx_watch.as_raw_fd(),
            EventSet::OUT,
            self.tap_writable_event(),
        );
        self.set_tap_interest(index, watch, &mut state.tx_waiting, wait, "write");
    }

    /// Registers or unregisters `watch` (descriptor, events, event id) so that `current`
    /// becomes `wanted`; `current` changes only when the registry accepted the change.
    fn set_tap_interest(
        &self,
        index: usize,
        (fd, events, data): (RawFd, EventSet, u16),
        current: &mut bool,
        wanted: bool,
        what: &str,
    ) {
        if *current == wanted {
            return;
        }
        let Some(registry) = self.registry(&self.pairs[index]) else {
            warn!("queue pair {index}: no event registry attached; cannot watch the TAP");
            return;
        };
        let result = if wanted {
            registry.register(fd, events, u64::from(data))
        } else {
            registry.unregister(fd, events, u64::from(data))
        };
        match result {
            Ok(()) => *current = wanted,
            Err(error) => warn!("queue pair {index}: cannot change TAP {what} interest: {error}"),
        }
    }

    /// Sends every available TX chain, stopping (with the chain kept in the ring) when the TAP
    /// is full; re-checks the ring after re-enabling notifications, so a chain the driver
    /// published meanwhile is not left without a kick (hvisor-tool #101).
    fn process_tx(
        &self,
        index: usize,
        state: &mut PairState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) {
        if !queue_is_live(vring) {
            return;
        }
        let tx_queue = Self::tx_queue_index(index);
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let header_len = self.header_len();
        let mut completed = 0usize;
        let mut blocked = false;
        loop {
            if event_idx {
                report(index, "TX", vring.disable_notification());
            }
            while let Some(chain) = self.rings.pop(vring, tx_queue, mem) {
                let head = chain.head_index();
                match self.transmit(index, state, mem, chain, header_len) {
                    Ok(()) => NetStats::bump(&self.stats.tx_frames),
                    Err(TxError::WouldBlock) => {
                        rewind(vring, 1);
                        blocked = true;
                        break;
                    }
                    Err(TxError::Drop(reason)) => {
                        NetStats::bump(&self.stats.tx_dropped);
                        state.drops.warn(format_args!(
                            "queue pair {index}: TX descriptor {head} dropped: {reason}"
                        ));
                    }
                }
                if self.rings.add_used(vring, tx_queue, head, 0) {
                    completed += 1;
                }
            }
            if blocked || !event_idx || !enable_notification(index, "TX", vring) {
                break;
            }
        }
        if completed > 0 {
            signal(index, "TX", vring);
        }
        if blocked {
            self.set_tx_waiting(index, state, true);
        }
    }

    fn transmit(
        &self,
        index: usize,
        state: &mut PairState,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        header_len: usize,
    ) -> Result<(), TxError> {
        state.readable.clear();
        state.writable.clear();
        split_chain(chain, Some(mem), &mut state.readable, &mut state.writable)
            .map_err(|error| TxError::Drop(error.to_string()))?;
        if !state.writable.is_empty() {
            return Err(TxError::Drop(
                "a TX chain has device-writable buffers".into(),
            ));
        }
        let len = stream_len(&state.readable);
        if len < header_len + ETH_HEADER_LEN {
            return Err(TxError::Drop(format!(
                "{len} bytes is shorter than the {header_len}-byte header and an Ethernet header"
            )));
        }
        if len > MAX_FRAME_LEN {
            return Err(TxError::Drop(format!(
                "{len} bytes is longer than {MAX_FRAME_LEN}"
            )));
        }
        state.tx_iovecs.clear();
        for segment in &state.readable {
            for slice in mem.get_slices(segment.addr, segment.len as usize) {
                let slice = slice.map_err(|error| TxError::Drop(error.to_string()))?;
                state.tx_iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        let fd = self.pairs[index].tap.as_fd();
        loop {
            match writev(fd, &state.tx_iovecs) {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Err(TxError::WouldBlock);
                }
                // EIO (interface down), EINVAL (a header the kernel refuses): the frame is lost
                // as on a real wire, the queue goes on.
                Err(error) => return Err(TxError::Drop(format!("the TAP refused it: {error}"))),
            }
        }
    }

    /// Moves frames from the TAP to the guest while both have some; then watches the TAP
    /// exactly when the guest has room.
    fn process_rx(
        &self,
        index: usize,
        state: &mut PairState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) {
        if !queue_is_live(vring) {
            self.set_rx_listening(index, state, false);
            return;
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut delivered = 0usize;
        let stop = loop {
            if event_idx {
                report(index, "RX", vring.disable_notification());
            }
            let stop = self.fill_rx(index, state, vring, mem, &mut delivered);
            match stop {
                RxStop::QueueDry { rewound } if event_idx => {
                    if !enable_notification_past(index, vring, rewound) {
                        break stop;
                    }
                }
                _ => break stop,
            }
        };
        if delivered > 0 {
            signal(index, "RX", vring);
        }
        let listen = matches!(stop, RxStop::TapEmpty | RxStop::BatchFull);
        self.set_rx_listening(index, state, listen);
    }

    fn fill_rx(
        &self,
        index: usize,
        state: &mut PairState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        delivered: &mut usize,
    ) -> RxStop {
        let header_len = self.header_len();
        for _ in 0..RX_BATCH {
            if state.rx_pending == 0 {
                let len = match read_frame(self.pairs[index].tap.as_fd(), &mut state.rx_frame) {
                    Ok(len) => len,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        return RxStop::TapEmpty;
                    }
                    Err(error) => {
                        state.drops.warn(format_args!(
                            "queue pair {index}: cannot read the TAP: {error}"
                        ));
                        return RxStop::TapFailed;
                    }
                };
                if len < header_len + ETH_HEADER_LEN || len > MAX_FRAME_LEN {
                    NetStats::bump(&self.stats.rx_dropped);
                    state.drops.warn(format_args!("queue pair {index}: RX frame of {len} bytes dropped: not within {}..={MAX_FRAME_LEN}",
                            header_len + ETH_HEADER_LEN
                        ),
                    );
                    continue;
                }
                state.rx_pending = len;
            }
            match self.deliver(index, state, vring, mem, header_len) {
                Delivery::Done => {
                    *delivered += 1;
                    state.rx_pending = 0;
                    NetStats::bump(&self.stats.rx_frames);
                }
                Delivery::FrameDropped => state.rx_pending = 0,
                Delivery::NoRoom { rewound } => return RxStop::QueueDry { rewound },
            }
        }
        RxStop::BatchFull
    }

    /// Places the pending frame in one chain, or with MRG_RXBUF in as many as it needs.
    /// Chains are only consumed once the whole frame fits; otherwise they go back to the ring.
    fn deliver(
        &self,
        index: usize,
        state: &mut PairState,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        header_len: usize,
    ) -> Delivery {
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let rx_queue = Self::rx_queue_index(index);
        let len = state.rx_pending;
        let PairState {
            rx_frame,
            rx_chains,
            rx_segments,
            readable,
            drops,
            ..
        } = state;
        rx_chains.clear();
        rx_segments.clear();
        let mut capacity = 0;
        while capacity < len && (mergeable || rx_chains.is_empty()) {
            let Some(chain) = self.rings.pop(vring, rx_queue, mem) else {
                let rewound = rx_chains.len() as u16;
                rewind(vring, rewound);
                return Delivery::NoRoom { rewound };
            };
            let head = chain.head_index();
            let first = rx_segments.len();
            readable.clear();
            let problem = match split_chain(chain, Some(mem), readable, rx_segments) {
                Err(error) => Some(error.to_string()),
                Ok(()) if !readable.is_empty() => {
                    Some("an RX chain has device-readable buffers".into())
                }
                Ok(())
                    if rx_chains.is_empty() && stream_len(&rx_segments[first..]) < header_len =>
                {
                    Some(format!(
                        "an RX chain is shorter than the {header_len}-byte header"
                    ))
                }
                Ok(()) if rx_segments.len() == first => Some("an RX chain is empty".into()),
                Ok(()) => None,
            };
            if let Some(problem) = problem {
                // Chains taken for this frame so far go back empty too, so what stays in the
                // ring is always the most recent, untouched part of it.
                NetStats::bump(&self.stats.rx_dropped);
                drops.warn(format_args!(
                    "queue pair {index}: RX descriptor {head} dropped: {problem}"
                ));
                for taken in rx_chains.drain(..) {
                    self.rings.add_used(vring, rx_queue, taken.head, 0);
                }
                self.rings.add_used(vring, rx_queue, head, 0);
                rx_segments.clear();
                capacity = 0;
                continue;
            }
            let chain_capacity = stream_len(&rx_segments[first..]);
            rx_chains.push(RxChain {
                head,
                segments: first..rx_segments.len(),
                capacity: chain_capacity,
            });
            capacity += chain_capacity;
        }
        if capacity < len {
            NetStats::bump(&self.stats.rx_dropped);
            drops.warn(format_args!("queue pair {index}: RX frame of {len} bytes dropped: the buffer holds {capacity} and mergeable \
                     buffers were not negotiated"
                ),
            );
            rewind(vring, 1);
            return Delivery::FrameDropped;
        }
        if header_len == HEADER_LEN {
            // A VERSION_1 driver without MRG_RXBUF reads num_buffers too; it must be 1.
            let count = rx_chains.len() as u16;
            rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&count.to_le_bytes());
        }
        let mut offset = 0;
        for chain in rx_chains.iter() {
            let take = chain.capacity.min(len - offset);
            let segments = &rx_segments[chain.segments.clone()];
            let written = match write_stream(mem, segments, &rx_frame[offset..offset + take]) {
                Ok(()) => take,
                // The buffers were checked against guest memory when the chain was split.
                Err(error) => {
                    warn!(
                        "queue pair {index}: RX descriptor {} left unwritten: {error}",
                        chain.head
                    );
                    0
                }
            };
            offset += take;
            self.rings
                .add_used(vring, rx_queue, chain.head, written as u32);
        }
        Delivery::Done
    }

    /// Serves control commands; only MQ's VQ_PAIRS_SET is supported, others get ERR.
    fn process_ctrl(&self, state: &mut PairState, vring: &VringRwLock, mem: &GuestMemoryMmap) {
        if !queue_is_live(vring) {
            return;
        }
        let ctrl_queue = self.control_queue_index() as u16;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut completed = 0usize;
        loop {
            if event_idx {
                report(0, "control", vring.disable_notification());
            }
            while let Some(chain) = self.rings.pop(vring, ctrl_queue, mem) {
                let head = chain.head_index();
                let used = self.control_command(state, mem, chain, head);
                if self.rings.add_used(vring, ctrl_queue, head, used) {
                    completed += 1;
                }
            }
            if !event_idx || !enable_notification(0, "control", vring) {
                break;
            }
        }
        if completed > 0 {
            signal(0, "control", vring);
        }
    }

    /// Runs one command; returns the used length (1 with an ack byte, 0 without).
    fn control_command(
        &self,
        state: &mut PairState,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        head: u16,
    ) -> u32 {
        state.readable.clear();
        state.writable.clear();
        if let Err(error) = split_chain(chain, Some(mem), &mut state.readable, &mut state.writable)
        {
            state.drops.warn(format_args!(
                "queue pair 0: control descriptor {head} dropped: {error}"
            ));
            return 0;
        }
        let Some(ack) = state
            .writable
            .last()
            .map(|last| last.addr.unchecked_add(u64::from(last.len) - 1))
        else {
            state.drops.warn(format_args!(
                "queue pair 0: control descriptor {head} dropped: no device-writable ack byte"
            ));
            return 0;
        };
        let mut command = [0u8; CTRL_HEADER_LEN + 2];
        let mut got = stream_len(&state.readable).min(command.len());
        if let Err(error) = read_stream(mem, &state.readable, 0, &mut command[..got]) {
            // The buffers were checked against guest memory when the chain was split.
            warn!("control descriptor {head}: cannot read the command: {error}");
            got = 0;
        }
        let status = match (command[0], command[1], got) {
            (class, cmd, 4)
                if u32::from(class) == VIRTIO_NET_CTRL_MQ
                    && u32::from(cmd) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET =>
            {
                let pairs = u16::from_le_bytes([command[2], command[3]]);
                self.set_queue_pairs(pairs)
            }
            (class, cmd, _) => {
                debug!("control command class {class} command {cmd} ({got} bytes) unsupported");
                VIRTIO_NET_ERR
            }
        };
        match mem.write_obj(status as u8, ack) {
            Ok(()) => 1,
            Err(error) => {
                warn!("control descriptor {head}: cannot write the ack: {error}");
                0
            }
        }
    }

    fn set_queue_pairs(&self, pairs: u16) -> u32 {
        if !self.acked(VIRTIO_NET_F_MQ) || !(1..=self.pairs.len()).contains(&usize::from(pairs)) {
            warn!(
                "VQ_PAIRS_SET {pairs} refused: MQ {} and 1..={} pairs offered",
                if self.acked(VIRTIO_NET_F_MQ) {
                    "negotiated"
                } else {
                    "not negotiated"
                },
                self.pairs.len()
            );
            return VIRTIO_NET_ERR;
        }
        match self.set_active_pairs(usize::from(pairs)) {
            Ok(()) => {
                info!("driver uses {pairs} queue pair(s)");
                VIRTIO_NET_OK
            }
            Err(error) => {
                warn!("VQ_PAIRS_SET {pairs}: {error}");
                VIRTIO_NET_ERR
            }
        }
    }
}

/// Puts the last `count` popped chains back in the ring.
fn rewind(vring: &VringRwLock, count: u16) {
    if count == 0 {
        return;
    }
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    let next = queue.next_avail().wrapping_sub(count);
    queue.set_next_avail(next);
}

/// Queue errors are logged, never returned: an error from `handle_event` ends the worker.
fn report<E: fmt::Display>(index: usize, queue: &str, result: Result<(), E>) {
    if let Err(error) = result {
        warn!("queue pair {index}: {queue} queue: {error}");
    }
}

/// Re-enables notifications; true if chains arrived meanwhile on a queue that is still live
/// (one stopped meanwhile, e.g. for a broken ring, would report its chains forever).
fn enable_notification(index: usize, queue: &str, vring: &VringRwLock) -> bool {
    let more = vring.enable_notification().unwrap_or_else(|error| {
        warn!("queue pair {index}: {queue} queue: {error}");
        false
    });
    more && queue_is_live(vring)
}

/// Re-enables RX notifications for chains past the `rewound` ones that were put back for lack
/// of room: the driver must kick when it adds more, and "more arrived" must not count the
/// ones already seen, or the worker would spin on them.
fn enable_notification_past(index: usize, vring: &VringRwLock, rewound: u16) -> bool {
    let mut state = vring.get_mut();
    // A queue stopped meanwhile (e.g. for a broken ring) is left alone, as in
    // `enable_notification`.
    if !state.is_enabled() || !state.get_queue().ready() {
        return false;
    }
    let next = state.get_queue().next_avail();
    state
        .get_queue_mut()
        .set_next_avail(next.wrapping_add(rewound));
    let more = state.enable_notification().unwrap_or_else(|error| {
        warn!("queue pair {index}: RX queue: {error}");
        false
    });
    state.get_queue_mut().set_next_avail(next);
    more
}

fn signal(index: usize, queue: &str, vring: &VringRwLock) {
    match vring.needs_notification() {
        Ok(false) => {}
        Ok(true) => report(index, queue, vring.signal_used_queue()),
        Err(error) => warn!("queue pair {index}: {queue} queue: {error}"),
    }
}

/// Reads one frame (with its vnet header); a read of 0 bytes means the TAP went away.
fn read_frame(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match ret {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            len if len > 0 => return Ok(len as usize),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

fn writev(fd: BorrowedFd<'_>, iovecs: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec points into guest memory that the caller keeps borrowed for the
    // duration of the call; the kernel only reads through them.
    let ret = unsafe { libc::writev(fd.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as libc::c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

impl<T: TapQueue> VirtioDevice for NetBackend<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn rings(&self) -> &Rings {
        &self.rings
    }

    fn attach_event_registry(
        &self,
        thread_id: usize,
        registry: Arc<dyn EventRegistry>,
    ) -> io::Result<()> {
        let Some(pair) = self.pairs.get(thread_id) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no queue pair for worker thread {thread_id}"),
            ));
        };
        *lock(&pair.registry) = Some(registry);
        // A new wait set holds none of our descriptors.
        let mut state = lock(&pair.state);
        state.rx_listening = false;
        state.tx_waiting = false;
        Ok(())
    }
}

impl<T: TapQueue> VhostUserBackend for NetBackend<T> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len() + usize::from(self.has_control_queue())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = COMMON_FEATURES
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_ECN
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_ECN;
        if self.supports_ufo {
            features |= 1 << VIRTIO_NET_F_HOST_UFO | 1 << VIRTIO_NET_F_GUEST_UFO;
        }
        if self.has_control_queue() {
            features |= 1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
        self.acked_features.store(features, Ordering::Relaxed);
        let header_len = header_len(features);
        let offloads = tap_offloads(features);
        for (index, pair) in self.pairs.iter().enumerate() {
            if let Err(error) = pair.tap.set_vnet_header_len(header_len) {
                warn!(
                    "queue pair {index}: cannot set the TAP header to {header_len} bytes: {error}"
                );
            }
            self.apply_offloads(index, offloads);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        common_protocol_features()
    }

    fn reset_device(&self) {
        if let Err(error) = self.set_active_pairs(self.pairs.len()) {
            warn!("cannot re-attach the TAP queues on reset: {error}");
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(self.config_space().as_slice(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        warn!(
            "config write of {} bytes at offset {offset} refused: the net config space is read-only",
            buf.len()
        );
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }

    fn update_memory(&self, memory: Memory) -> io::Result<()> {
        self.memory.replace(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len())
            .map(|pair| {
                let mut mask = 0b11 << (2 * pair);
                if pair == 0 && self.has_control_queue() {
                    mask |= 1 << self.control_queue_index();
                }
                mask
            })
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready, so once the worker's current batch is done it
        // takes no more chains: waiting for its lock waits for the frames in flight.
        let pair = (queue_index as usize / 2).min(self.pairs.len() - 1);
        drop(lock(&self.pairs[pair].state));
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here stop the worker thread for good, so guest mistakes and TAP
        // trouble are logged and never propagated.
        let Some(pair) = self.pairs.get(thread_id) else {
            warn!("net: event {device_event} on unknown worker thread {thread_id}; ignored");
            return Ok(());
        };
        let Some(mem) = self.guest_memory() else {
            warn!(
                "queue pair {thread_id}: event {device_event} before guest memory was set; ignored"
            );
            return Ok(());
        };
        let mut state = lock(&pair.state);
        let state = &mut *state;
        let kick = evset == EventSet::IN;
        match (device_event, vrings) {
            (RX_QUEUE_EVENT, [rx, ..]) if kick => self.process_rx(thread_id, state, rx, &mem),
            (TX_QUEUE_EVENT, [_, tx, ..]) if kick => {
                // While the TAP is full, the writable event resumes TX; a kick would only
                // meet EAGAIN again.
                if !state.tx_waiting {
                    self.process_tx(thread_id, state, tx, &mem);
                }
            }
            (CTRL_QUEUE_EVENT, [_, _, ctrl]) if kick && thread_id == 0 => {
                self.process_ctrl(state, ctrl, &mem);
            }
            (event, [rx, ..]) if event == self.tap_readable_event() => {
                self.process_rx(thread_id, state, rx, &mem);
            }
            (event, [_, tx, ..]) if event == self.tap_writable_event() => {
                self.set_tx_waiting(thread_id, state, false);
                self.process_tx(thread_id, state, tx, &mem);
            }
            _ => warn!(
                "queue pair {thread_id}: unexpected event {device_event} ({evset:?}); ignored"
            ),
        }
        Ok(())
    }
}

/// Bytes in all `segments`, as a length in memory (saturating, though no chain comes near).
fn stream_len(segments: &[Segment]) -> usize {
    usize::try_from(total_len(segments)).unwrap_or(usize::MAX)
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
