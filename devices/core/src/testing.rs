//! Rigs for device unit tests (feature `test-utils`): rings in guest memory driven through real
//! `VringRwLock`s, and an epoll set standing in for a transport's worker.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::EventRegistry;
use crate::queue::{FaultHandler, QueueFault};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Where a queue's used ring goes inside its page in rigs that publish through
/// `virtio_queue::mock::MockSplitQueue`: the mock (virtio-queue 0.18) sizes its avail ring in
/// entries instead of bytes and puts its used ring over avail entries 8 and up, so the device's
/// used ring is placed here instead, clear of both.
const MOCK_USED_RING_OFFSET: u64 = 0x800;

/// A ready, enabled `VringRwLock` of `size` entries over the rings at the given addresses, as a
/// transport sets one up; returned with the driver's side of its call eventfd.
pub fn ready_vring(
    memory: &GuestMemoryAtomic<GuestMemoryMmap>,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    event_idx: bool,
) -> (VringRwLock, EventFd) {
    let vring = VringRwLock::new(memory.clone(), size).unwrap();
    vring.set_queue_size(size);
    vring
        .set_queue_info(desc_table.0, avail_ring.0, used_ring.0)
        .unwrap();
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: the descriptor comes from a fresh duplicate that nothing else owns.
    let call_file = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
    vring.set_call(Some(call_file));
    (vring, call)
}

/// A queue in the page at `start` that the test publishes to through `MockSplitQueue`, and the
/// device's vring over it, whose used ring is [`mock_used_ring`].
pub fn mock_queue(
    memory: &'static GuestMemoryMmap,
    atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    start: u64,
    size: u16,
    event_idx: bool,
) -> (
    MockSplitQueue<'static, GuestMemoryMmap>,
    VringRwLock,
    EventFd,
) {
    let rings = MockSplitQueue::create(memory, GuestAddress(start), size);
    let used_ring = mock_used_ring(memory, start, size).addr();
    let (vring, call) = ready_vring(
        atomic,
        size,
        rings.desc_table_addr(),
        rings.avail_addr(),
        used_ring,
        event_idx,
    );
    (rings, vring, call)
}

/// Publishes `heads` as they are in the avail ring of a [`mock_queue`] of `size` entries,
/// without writing descriptors: a driver naming heads the table may not have.
pub fn publish_heads(rings: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16, heads: &[u16]) {
    let avail = rings.avail();
    for &head in heads {
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }
}

/// Moves the avail index of a [`mock_queue`] to `idx`, as a driver breaking its ring may.
pub fn set_avail_idx(rings: &MockSplitQueue<'_, GuestMemoryMmap>, idx: u16) {
    rings.avail().idx().store(idx);
}

/// The device's used ring of the [`mock_queue`] at `start`.
pub fn mock_used_ring(memory: &'static GuestMemoryMmap, start: u64, size: u16) -> UsedRing {
    UsedRing::new(memory, GuestAddress(start + MOCK_USED_RING_OFFSET), size)
}

/// A used ring the device writes, read as the driver reads it.
#[derive(Clone, Copy)]
pub struct UsedRing {
    memory: &'static GuestMemoryMmap,
    addr: GuestAddress,
    size: u16,
}

impl UsedRing {
    pub fn new(memory: &'static GuestMemoryMmap, addr: GuestAddress, size: u16) -> Self {
        UsedRing { memory, addr, size }
    }

    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    pub fn idx(&self) -> u16 {
        self.memory.read_obj(self.addr.unchecked_add(2)).unwrap()
    }

    /// The entry at `position`: (descriptor head, used length).
    pub fn entry(&self, position: u16) -> (u32, u32) {
        let element = self
            .addr
            .unchecked_add(4 + 8 * u64::from(position % self.size));
        (
            self.memory.read_obj(element).unwrap(),
            self.memory.read_obj(element.unchecked_add(4)).unwrap(),
        )
    }

    /// The avail index after which the device wants a kick (EVENT_IDX `avail_event`).
    pub fn avail_event(&self) -> u16 {
        let at = self.addr.unchecked_add(4 + 8 * u64::from(self.size));
        self.memory.read_obj(at).unwrap()
    }
}

/// Guest memory from address 0, leaked so rings can borrow it for the whole test.
pub struct TestMemory {
    pub mem: &'static GuestMemoryMmap,
    pub atomic: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl TestMemory {
    pub fn new(size: usize) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap(),
        ));
        TestMemory {
            mem,
            atomic: GuestMemoryAtomic::new(mem.clone()),
        }
    }

    pub fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }
}

/// One descriptor buffer of a test chain.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn readable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: false,
    }
}

pub fn writable(addr: u64, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        writable: true,
    }
}

/// The descriptor for `buffer` with `flags` (the `VRING_DESC_F_*` bits besides WRITE, as
/// virtio-bindings defines them) and `next`, for chains a test lays out by hand.
pub fn raw(buffer: Buffer, flags: u32, next: u16) -> RawDescriptor {
    let direction = if buffer.writable {
        VRING_DESC_F_WRITE
    } else {
        0
    };
    RawDescriptor::from(SplitDescriptor::new(
        buffer.addr,
        buffer.len,
        direction | flags as u16,
        next,
    ))
}

/// Descriptors of one chain with NEXT links from `first` on.
/// `descriptors` written as a chain starting at table index `first`: their NEXT fields, given
/// relative to the chain's first descriptor, become table indices.
pub fn rebased(descriptors: &[RawDescriptor], first: u16) -> Vec<RawDescriptor> {
    descriptors
        .iter()
        .map(|d| {
            let d = SplitDescriptor::from(*d);
            RawDescriptor::from(SplitDescriptor::new(
                d.addr().0,
                d.len(),
                d.flags(),
                d.next().wrapping_add(first),
            ))
        })
        .collect()
}

fn linked(buffers: &[Buffer], first: u16) -> Vec<RawDescriptor> {
    buffers
        .iter()
        .enumerate()
        .map(|(i, buffer)| {
            let index = first + i as u16;
            if i + 1 < buffers.len() {
                raw(*buffer, u32::from(VRING_DESC_F_NEXT), index + 1)
            } else {
                raw(*buffer, 0, 0)
            }
        })
        .collect()
}

/// A split ring in test memory, its `VringRwLock`, and the call eventfd the device signals.
///
/// The layout is computed here rather than taken from `virtio_queue::mock`, whose avail ring
/// leaves no room for `used_event` (the used ring overlaps it, which breaks EVENT_IDX tests).
pub struct TestQueue {
    memory: &'static GuestMemoryMmap,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: UsedRing,
    pub vring: VringRwLock,
    pub call: EventFd,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// A ready, enabled ring of `size` entries with its tables at `base`.
    pub fn new(memory: &TestMemory, base: u64, size: u16, event_idx: bool) -> Self {
        let desc_table = GuestAddress(base);
        let avail_ring = desc_table.unchecked_add(16 * u64::from(size));
        // flags, idx, ring[size], used_event; the used ring is 4-aligned.
        let used_ring = avail_ring
            .unchecked_add(6 + 2 * u64::from(size))
            .unchecked_align_up(4);
        let used_end = used_ring.unchecked_add(6 + 8 * u64::from(size));
        memory.fill(base, (used_end.0 - base) as usize, 0);
        let (vring, call) = ready_vring(
            &memory.atomic,
            size,
            desc_table,
            avail_ring,
            used_ring,
            event_idx,
        );
        TestQueue {
            memory: memory.mem,
            desc_table,
            avail_ring,
            used_ring: UsedRing::new(memory.mem, used_ring, size),
            vring,
            call,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Publishes a chain of `buffers`; returns its head. The descriptor table is reused from the
    /// start once full, so tests must let earlier chains complete first.
    pub fn add_chain(&mut self, buffers: &[Buffer]) -> u16 {
        let first = self.reserve(buffers.len());
        let descriptors = linked(buffers, first);
        self.publish_at(first, &descriptors)
    }

    /// Publishes one descriptor that points at an indirect table of `buffers` at `table`.
    pub fn add_indirect_chain(&mut self, table: u64, buffers: &[Buffer]) -> u16 {
        for (i, descriptor) in linked(buffers, 0).iter().enumerate() {
            self.memory
                .write_obj(*descriptor, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            16 * buffers.len() as u32,
            VRING_DESC_F_INDIRECT,
            0,
        ));
        let first = self.reserve(1);
        self.publish_at(first, &[head])
    }

    /// Publishes descriptors exactly as given (for malformed chains), their NEXT fields
    /// relative to the chain's first descriptor; returns the head.
    pub fn add_raw_chain(&mut self, descriptors: &[RawDescriptor]) -> u16 {
        let first = self.reserve(descriptors.len());
        self.publish_at(first, &rebased(descriptors, first))
    }

    fn reserve(&mut self, count: usize) -> u16 {
        let first = if usize::from(self.next_desc) + count > usize::from(self.size) {
            0
        } else {
            self.next_desc
        };
        self.next_desc = first + count as u16;
        first
    }

    fn publish_at(&mut self, first: u16, descriptors: &[RawDescriptor]) -> u16 {
        for (i, descriptor) in descriptors.iter().enumerate() {
            let slot = self
                .desc_table
                .unchecked_add(16 * u64::from(first + i as u16));
            self.memory.write_obj(*descriptor, slot).unwrap();
        }
        let avail = self.avail_ring;
        let slot = avail.unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
        self.memory.write_obj(first, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory
            .write_obj(self.avail_idx, avail.unchecked_add(2))
            .unwrap();
        first
    }

    pub fn used_idx(&self) -> u16 {
        self.used_ring.idx()
    }

    /// The used-ring entry at `position`: (descriptor head, used length).
    pub fn used(&self, position: u16) -> (u32, u32) {
        self.used_ring.entry(position)
    }

    /// Where the driver asks to be notified next (EVENT_IDX `used_event`).
    pub fn set_used_event(&self, index: u16) {
        let used_event = self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size));
        self.memory.write_obj(index, used_event).unwrap();
    }

    /// How many times the device signalled since the last call.
    pub fn signals(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    /// Publishes `heads` as they are, without descriptors: a driver naming heads the table may
    /// not have.
    pub fn add_heads(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = self
                .avail_ring
                .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
            self.memory.write_obj(head, slot).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.set_avail_idx(self.avail_idx);
    }

    /// Moves the avail index to `idx`, as a driver breaking its ring may.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.memory
            .write_obj(idx, self.avail_ring.unchecked_add(2))
            .unwrap();
    }
}

/// The faults a device reported, as its transport's [`FaultHandler`] saw them.
#[derive(Clone, Default)]
pub struct FaultRecorder(Arc<Mutex<Vec<QueueFault>>>);

impl FaultRecorder {
    pub fn handler(&self) -> FaultHandler {
        let faults = self.0.clone();
        Arc::new(move |fault: &QueueFault| faults.lock().unwrap().push(fault.clone()))
    }

    pub fn faults(&self) -> Vec<QueueFault> {
        self.0.lock().unwrap().clone()
    }
}

/// Runs `work` on a thread of its own and returns its result; panics naming `what` if it does
/// not return within `timeout`, so a worker that spins fails its test instead of hanging it
/// (the spinning thread is left behind until the test binary exits).
pub fn returns_within<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    match receiver.recv_timeout(timeout) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => panic!("{what} did not return within {timeout:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// A real epoll set that records what the device registered, standing in for a worker thread's
/// wait set.
pub struct EpollRegistry {
    epoll: Epoll,
    registered: Mutex<BTreeMap<u64, (RawFd, EventSet)>>,
}

impl Default for EpollRegistry {
    fn default() -> Self {
        EpollRegistry {
            epoll: Epoll::new().unwrap(),
            registered: Mutex::new(BTreeMap::new()),
        }
    }
}

impl EpollRegistry {
    /// Current registrations: event id -> (descriptor, events).
    pub fn registered(&self) -> BTreeMap<u64, (RawFd, EventSet)> {
        self.registered.lock().unwrap().clone()
    }

    /// Events ready within `timeout_ms`, as (event id, events).
    pub fn wait(&self, timeout_ms: i32) -> Vec<(u64, EventSet)> {
        let mut events = vec![EpollEvent::default(); 16];
        let ready = self.epoll.wait(timeout_ms, &mut events).unwrap();
        events[..ready]
            .iter()
            .map(|event| (event.data(), event.event_set()))
            .collect()
    }
}

impl EventRegistry for EpollRegistry {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))?;
        self.registered.lock().unwrap().insert(data, (fd, events));
        Ok(())
    }

    fn unregister(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.registered.lock().unwrap().remove(&data);
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::new(events, data))
    }
}
