//! Queue-path tests: real `VringRwLock`s over `MockSplitQueue` rings, driven through
//! `handle_event` exactly as a transport's worker thread does.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;

use hvisor_vhost_core::queue::{QueueFault, RingFault, queue_is_live};
use hvisor_vhost_core::testing::{
    Buffer, FaultRecorder, UsedRing, mock_queue, mock_used_ring, publish_heads, raw, readable,
    rebased, returns_within, set_avail_idx, writable,
};
use hvisor_vhost_core::{InlineKick, VirtioDevice};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, Le32, Le64};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use std::sync::Arc;

use hvisor_vhost_core::inflight::{InflightQueue, InflightRegion, create_region_file};
use virtio_queue::QueueT;

use super::BlkBackend;
use crate::config::BlkConfig;
use crate::storage::FileStorage;
use crate::testing::FaultyStorage;
use crate::virtio_blk::*;
use std::sync::atomic::AtomicBool;

const QUEUE_SIZE: u16 = 16;
const MEMORY_SIZE: u64 = 0x10_0000;
const DISK_SIZE: u64 = 1 << 20;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const INDIRECT_TABLE: u64 = 0x4_0000;
const STATUS_UNTOUCHED: u8 = 0xff;
/// Bound of a kick that must return (a worker spinning on a broken ring fails the test).
const KICK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Each queue's rings take a page of their own.
fn queue_start(queue: u16) -> u64 {
    u64::from(queue) * 0x1000
}

/// A test rig: guest memory, one or more queues, and the backend under test.
struct Rig {
    /// Leaked so the rings below can borrow it for the whole test.
    mem: &'static GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    /// Shared, so a kick can run on a thread of its own (see `kick_within_bound`).
    backend: std::sync::Arc<BlkBackend<FaultyStorage>>,
    vrings: Vec<VringRwLock>,
    calls: Vec<EventFd>,
    /// The driver's side of each queue's kick descriptor.
    kicks: Vec<EventFd>,
    /// Next free descriptor index per queue.
    next_desc: Vec<u16>,
}

impl Rig {
    fn new(config: BlkConfig, event_idx: bool) -> Self {
        Self::with_storage(config, FaultyStorage::new(DISK_SIZE), event_idx)
    }

    /// A rig whose reads, writes, flushes and zeroings go through io_uring.
    fn uring(event_idx: bool) -> Self {
        let storage = FaultyStorage {
            ring: true,
            ..FaultyStorage::new(DISK_SIZE)
        };
        Self::with_storage(BlkConfig::memory(DISK_SIZE), storage, event_idx)
    }

    /// A rig whose queues run io_uring on a buffered image file: page-cache reads and writes
    /// are executed in the call, flushes and zeroings take the ring. (An in-memory disk would
    /// not do: shmem refuses `RWF_NOWAIT` reads.)
    fn buffered_uring(event_idx: bool) -> Self {
        let image = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        image.as_file().set_len(DISK_SIZE).unwrap();
        // The storage keeps the file open; its name may go with `image`.
        let storage = FaultyStorage {
            inner: FileStorage::open(image.path(), false, false).unwrap(),
            faults: Arc::default(),
            ring: true,
            buffered: true,
        };
        Self::with_storage(BlkConfig::memory(DISK_SIZE), storage, event_idx)
    }

    fn kick_inline(&self, queue: usize) -> InlineKick {
        self.backend.serve_kick_inline(queue, &self.vrings[queue])
    }

    fn with_storage(config: BlkConfig, storage: FaultyStorage, event_idx: bool) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap(),
        ));
        let backend = std::sync::Arc::new(BlkBackend::with_storage(storage, &config).unwrap());
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut vrings = Vec::new();
        let mut calls = Vec::new();
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for queue in 0..config.num_queues {
            let (rings, vring, call) =
                mock_queue(mem, &atomic, queue_start(queue), QUEUE_SIZE, event_idx);
            // A kick descriptor as vhost-user sets one: io_uring waits poll it.
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: the descriptor comes from a fresh duplicate that nothing else owns.
            let kick_file = unsafe { File::from_raw_fd(kick.try_clone().unwrap().into_raw_fd()) };
            vring.set_kick(Some(kick_file));
            kicks.push(kick);
            vrings.push(vring);
            calls.push(call);
            queues.push(rings);
        }
        backend.update_memory(atomic).unwrap();
        backend.set_event_idx(event_idx);
        let next_desc = vec![0; vrings.len()];
        Rig {
            mem,
            queues,
            backend,
            vrings,
            calls,
            kicks,
            next_desc,
        }
    }

    fn default(event_idx: bool) -> Self {
        Self::new(BlkConfig::memory(DISK_SIZE), event_idx)
    }

    /// A fresh inflight region for the rig's queues, as GET_INFLIGHT_FD makes one.
    fn inflight_file(&self) -> File {
        create_region_file(self.vrings.len() as u16, QUEUE_SIZE)
            .unwrap()
            .0
    }

    /// A mapping of the inflight region in `file`, as SET_INFLIGHT_FD makes one.
    fn map_inflight(&self, file: &File) -> Arc<InflightRegion> {
        let queues = self.vrings.len() as u16;
        let size = file.metadata().unwrap().len();
        let file = file.try_clone().unwrap();
        Arc::new(InflightRegion::map(file, 0, size, queues, QUEUE_SIZE).unwrap())
    }

    /// Gives the backend the region in `file`, as SET_INFLIGHT_FD does.
    fn set_inflight(&self, file: &File) {
        let region = self.map_inflight(file);
        self.backend.set_inflight_region(Some(region)).unwrap();
    }

    fn rings(&self, queue: usize) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        &self.queues[queue]
    }

    /// Publishes a chain of `buffers` (NEXT links filled in) on `queue`; returns its head.
    fn add_chain(&mut self, queue: usize, buffers: &[Buffer]) -> u16 {
        let first = self.next_index(queue, buffers.len());
        let descriptors: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| {
                let index = first + i as u16;
                if i + 1 < buffers.len() {
                    raw(*buffer, VRING_DESC_F_NEXT, index + 1)
                } else {
                    raw(*buffer, 0, 0)
                }
            })
            .collect();
        self.publish(queue, &descriptors)
    }

    /// Where the next chain of `count` descriptors goes: tests reuse the table from the start
    /// once it is full, since every earlier chain has been served by then.
    fn next_index(&self, queue: usize, count: usize) -> u16 {
        let first = self.next_desc[queue];
        if usize::from(first) + count > usize::from(QUEUE_SIZE) {
            0
        } else {
            first
        }
    }

    /// Publishes descriptors exactly as given (for malformed chains) at the index
    /// `next_index` returned; returns the head.
    fn publish(&mut self, queue: usize, descriptors: &[RawDescriptor]) -> u16 {
        let first = self.next_index(queue, descriptors.len());
        self.rings(queue)
            .add_desc_chains(descriptors, first)
            .unwrap();
        self.next_desc[queue] = first + descriptors.len() as u16;
        first
    }

    fn kick(&self, queue: usize) {
        self.backend
            .handle_event(0, EventSet::IN, &self.vrings[queue..=queue], queue)
            .unwrap();
    }

    /// Kicks `queue` on a thread of its own, failing the test if the kick does not return.
    fn kick_within_bound(&self, queue: usize) {
        let backend = self.backend.clone();
        let vrings = self.vrings[queue..=queue].to_vec();
        returns_within("a kick", KICK_TIMEOUT, move || {
            backend
                .handle_event(0, EventSet::IN, &vrings, queue)
                .unwrap();
        });
    }

    fn used_ring(&self, queue: usize) -> UsedRing {
        mock_used_ring(self.mem, queue_start(queue as u16), QUEUE_SIZE)
    }

    /// The used-ring entry at `position` of `queue`: (descriptor head, used length).
    fn used(&self, queue: usize, position: u16) -> (u32, u32) {
        self.used_ring(queue).entry(position)
    }

    fn used_idx(&self, queue: usize) -> u16 {
        self.used_ring(queue).idx()
    }

    fn header(&self, request_type: u32, sector: u64) {
        let header = RequestHeader {
            request_type: Le32::from(request_type),
            reserved: Le32::from(0),
            sector: Le64::from(sector),
        };
        self.mem.write_obj(header, GuestAddress(HEADER)).unwrap();
        self.mem
            .write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS))
            .unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; len];
        disk_file(&self.backend)
            .read_exact_at(&mut out, offset)
            .unwrap();
        out
    }

    /// Runs a flush on queue 0 and returns (status, used length).
    fn flush(&mut self) -> (u8, u32) {
        self.request(
            VIRTIO_BLK_T_FLUSH,
            0,
            &[readable(HEADER, 16), status_buffer()],
        )
    }

    /// Runs one request on queue 0 and returns (status, used length).
    fn request(&mut self, request_type: u32, sector: u64, buffers: &[Buffer]) -> (u8, u32) {
        self.header(request_type, sector);
        let head = self.add_chain(0, buffers);
        let before = self.used_idx(0);
        self.kick(0);
        assert_eq!(
            self.used_idx(0),
            before.wrapping_add(1),
            "request was not returned"
        );
        let (id, len) = self.used(0, before % QUEUE_SIZE);
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }
}

fn disk_file(backend: &BlkBackend<FaultyStorage>) -> &File {
    backend.device().storage().inner.file()
}

fn ok() -> u8 {
    VIRTIO_BLK_S_OK as u8
}

fn ioerr() -> u8 {
    VIRTIO_BLK_S_IOERR as u8
}

fn status_buffer() -> Buffer {
    writable(STATUS, 1)
}

fn write_then_read_round_trips(mut rig: Rig) {
    rig.fill(DATA, 4096, 0x42);
    rig.fill(DATA + 4096, 4096, 0x43);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_OUT,
        8,
        &[
            readable(HEADER, 16),
            readable(DATA, 4096),
            readable(DATA + 4096, 4096),
            status_buffer(),
        ],
    );
    assert_eq!((status, len), (ok(), 1));
    assert!(rig.disk(4096, 4096).iter().all(|&b| b == 0x42));
    assert!(rig.disk(8192, 4096).iter().all(|&b| b == 0x43));

    rig.fill(DATA, 8192, 0);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_IN,
        8,
        &[
            readable(HEADER, 16),
            writable(DATA, 1000),
            writable(DATA + 1000, 7192),
            status_buffer(),
        ],
    );
    assert_eq!((status, len), (ok(), 8193));
    assert!(rig.bytes(DATA, 4096).iter().all(|&b| b == 0x42));
    assert!(rig.bytes(DATA + 4096, 4096).iter().all(|&b| b == 0x43));
    let signals = rig.calls[0].read().unwrap();
    assert!(signals >= 1, "the driver was not notified");
}

#[test]
fn write_then_read_without_event_idx() {
    write_then_read_round_trips(Rig::default(false));
}

#[test]
fn write_then_read_with_event_idx() {
    write_then_read_round_trips(Rig::default(true));
}

#[test]
fn write_then_read_through_io_uring() {
    write_then_read_round_trips(Rig::uring(false));
    write_then_read_round_trips(Rig::uring(true));
}

#[test]
fn io_uring_flush_completes_after_the_writes_before_it() {
    let mut rig = Rig::uring(true);
    let mut heads = Vec::new();
    for i in 0..4u64 {
        let header = HEADER + 0x100 * (i + 1);
        let data = DATA + 0x1000 * i;
        rig.mem
            .write_obj(
                RequestHeader {
                    request_type: Le32::from(VIRTIO_BLK_T_OUT),
                    reserved: Le32::from(0),
                    sector: Le64::from(8 * i),
                },
                GuestAddress(header),
            )
            .unwrap();
        rig.fill(data, 4096, 0x10 + i as u8);
        heads.push(rig.add_chain(
            0,
            &[
                readable(header, 16),
                readable(data, 4096),
                writable(STATUS + 1 + i, 1),
            ],
        ));
    }
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    let flush = rig.add_chain(0, &[readable(HEADER, 16), status_buffer()]);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 5);
    let order: Vec<u32> = (0..5).map(|position| rig.used(0, position).0).collect();
    assert_eq!(
        order[4],
        u32::from(flush),
        "the flush overtook a write: {order:?}"
    );
    assert_eq!(rig.status(), ok());
    for i in 0..4u64 {
        assert_eq!(rig.bytes(STATUS + 1 + i, 1)[0], ok());
        assert!(
            rig.disk(4096 * i, 4096)
                .iter()
                .all(|&b| b == 0x10 + i as u8)
        );
    }
    // The writes complete together, the drained flush may complete in a later batch.
    let interrupts = rig.calls[0].read().unwrap();
    assert!(
        (1..=2).contains(&interrupts),
        "{interrupts} interrupts for 5 requests"
    );
    assert_eq!(
        rig.backend.workers[0].lock().unwrap().requests.in_flight(),
        0
    );
}

/// A flush that arrives while the worker's kick poll is armed completes (a flush ordered with
/// IOSQE_IO_DRAIN would wait for that poll, i.e. for a kick that never comes).
#[test]
fn io_uring_flush_after_a_wait_on_a_direct_image() {
    let image = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    image.as_file().set_len(DISK_SIZE).unwrap();
    let Ok(inner) = FileStorage::open(image.path(), false, true) else {
        return; // no O_DIRECT on this file system: nothing here is slow enough to wait for
    };
    let storage = FaultyStorage {
        inner,
        faults: Arc::default(),
        ring: true,
        buffered: false,
    };
    let mut rig = Rig::with_storage(BlkConfig::memory(DISK_SIZE), storage, true);
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let watchdog_done = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(30));
        if !watchdog_done.load(Ordering::SeqCst) {
            eprintln!("io_uring flush hung");
            std::process::abort();
        }
    });
    // Page-aligned guest buffers, so that O_DIRECT takes them without a bounce.
    for round in 0..8u64 {
        if round == 4 {
            // Kicks that come while the worker is idle make its kick poll post completions;
            // thousands of them must neither overflow into an error nor hold up what follows.
            for _ in 0..5000 {
                rig.kicks[0].write(1).unwrap();
            }
        }
        rig.fill(DATA, 4096, 0x60 + round as u8);
        let write = rig.request(
            VIRTIO_BLK_T_OUT,
            8 * round,
            &[readable(HEADER, 16), readable(DATA, 4096), status_buffer()],
        );
        assert_eq!(write, (ok(), 1));
        let flush = rig.flush();
        assert_eq!(flush, (ok(), 1));
    }
    done.store(true, Ordering::SeqCst);
    // Through a buffered descriptor: the backend's own is O_DIRECT.
    let content = std::fs::read(image.path()).unwrap();
    assert!(content[7 * 4096..8 * 4096].iter().all(|&b| b == 0x67));
}

#[test]
fn io_uring_keeps_validation_and_statuses() {
    let mut rig = Rig::uring(false);
    let last = DISK_SIZE / 512;
    let beyond = rig.request(
        VIRTIO_BLK_T_IN,
        last,
        &[readable(HEADER, 16), writable(DATA, 512), status_buffer()],
    );
    assert_eq!(beyond, (ioerr(), 1));
    let odd = rig.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(HEADER, 16), readable(DATA, 100), status_buffer()],
    );
    assert_eq!(odd, (ioerr(), 1));
    let flush = rig.flush();
    assert_eq!(flush, (ok(), 1));
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    let mut rig = Rig::default(false);
    rig.fill(DATA, 512, 0x77);
    rig.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    // Header split over two descriptors; data and status in one writable buffer.
    rig.header(VIRTIO_BLK_T_IN, 0);
    rig.fill(DATA + 0x1000, 513, 0);
    rig.add_chain(
        0,
        &[
            readable(HEADER, 8),
            readable(HEADER + 8, 8),
            writable(DATA + 0x1000, 513),
        ],
    );
    rig.kick(0);
    assert_eq!(rig.used(0, 1).1, 513);
    assert!(rig.bytes(DATA + 0x1000, 512).iter().all(|&b| b == 0x77));
    assert_eq!(rig.bytes(DATA + 0x1000 + 512, 1)[0], ok());
}

#[test]
fn indirect_chains_are_followed() {
    let mut rig = Rig::default(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let table = [
        raw(readable(HEADER, 16), VRING_DESC_F_NEXT, 1),
        raw(writable(DATA, 512), VRING_DESC_F_NEXT, 2),
        raw(status_buffer(), 0, 0),
    ];
    for (i, descriptor) in table.iter().enumerate() {
        rig.mem
            .write_obj(*descriptor, GuestAddress(INDIRECT_TABLE + 16 * i as u64))
            .unwrap();
    }
    let head = RawDescriptor::from(SplitDescriptor::new(
        INDIRECT_TABLE,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    rig.publish(0, &[head]);
    rig.kick(0);
    assert_eq!(rig.used(0, 0).1, 513);
    assert_eq!(rig.status(), ok());
}

#[test]
fn flush_get_id_and_unknown_types() {
    let config = BlkConfig {
        serial: "serial-0123456789abc".into(),
        ..BlkConfig::memory(DISK_SIZE)
    };
    let mut rig = Rig::new(config, false);
    assert_eq!(rig.flush(), (ok(), 1));
    assert_eq!(
        rig.backend
            .device()
            .storage()
            .faults
            .flushes
            .load(Ordering::Relaxed),
        1
    );

    let (status, len) = rig.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[readable(HEADER, 16), writable(DATA, 20), status_buffer()],
    );
    assert_eq!((status, len), (ok(), 21));
    assert_eq!(rig.bytes(DATA, 20), b"serial-0123456789abc");

    rig.fill(DATA, 20, 0xaa);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[readable(HEADER, 16), writable(DATA, 6), status_buffer()],
    );
    assert_eq!((status, len), (ok(), 7));
    assert_eq!(rig.bytes(DATA, 7), b"serial\xaa");

    let (status, len) = rig.request(99, 0, &[readable(HEADER, 16), status_buffer()]);
    assert_eq!((status, len), (VIRTIO_BLK_S_UNSUPP as u8, 1));
}

/// An ID buffer the device may not write gets IOERR, as a read into one does, instead of OK
/// with no ID delivered.
#[test]
fn get_id_into_a_device_readable_buffer_gets_ioerr() {
    let mut rig = Rig::default(false);
    rig.fill(DATA, 20, 0xaa);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[readable(HEADER, 16), readable(DATA, 20), status_buffer()],
    );
    assert_eq!((status, len), (ioerr(), 1));
    assert_eq!(rig.bytes(DATA, 20), vec![0xaa; 20]);
}

fn range_segment(rig: &Rig, at: u64, sector: u64, sectors: u32, flags: u32) {
    let segment = DiscardWriteZeroesSegment {
        sector: Le64::from(sector),
        num_sectors: Le32::from(sectors),
        flags: Le32::from(flags),
    };
    rig.mem.write_obj(segment, GuestAddress(at)).unwrap();
}

fn discard_and_write_zeroes_clear_ranges(mut rig: Rig) {
    rig.fill(DATA, 8192, 0x99);
    rig.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(HEADER, 16), readable(DATA, 8192), status_buffer()],
    );

    range_segment(&rig, DATA, 0, 2, 0);
    range_segment(&rig, DATA + 16, 4, 1, 0);
    let (status, _) = rig.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[readable(HEADER, 16), readable(DATA, 32), status_buffer()],
    );
    assert_eq!(status, ok());
    range_segment(&rig, DATA, 8, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (status, _) = rig.request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[readable(HEADER, 16), readable(DATA, 16), status_buffer()],
    );
    assert_eq!(status, ok());
    let disk = rig.disk(0, 8192);
    let zeroed = |sector: usize| {
        disk[sector * 512..(sector + 1) * 512]
            .iter()
            .all(|&b| b == 0)
    };
    let expected = [
        true, true, false, false, true, false, false, false, true, true, false,
    ];
    for (sector, zero) in expected.iter().enumerate() {
        assert_eq!(zeroed(sector), *zero, "sector {sector}");
    }

    // A range list that is not whole 16-byte segments, and a discard with the unmap flag.
    let (status, _) = rig.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[readable(HEADER, 16), readable(DATA, 20), status_buffer()],
    );
    assert_eq!(status, ioerr());
    range_segment(&rig, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (status, _) = rig.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[readable(HEADER, 16), readable(DATA, 16), status_buffer()],
    );
    assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn discard_and_write_zeroes_clear_ranges_with_the_sync_engine() {
    discard_and_write_zeroes_clear_ranges(Rig::default(false));
}

#[test]
fn discard_and_write_zeroes_clear_ranges_through_io_uring() {
    discard_and_write_zeroes_clear_ranges(Rig::uring(true));
}

#[test]
fn out_of_range_and_overflowing_sectors_get_ioerr() {
    let mut rig = Rig::default(false);
    let sectors = DISK_SIZE / 512;
    for sector in [sectors, sectors - 1, u64::MAX, u64::MAX / 512] {
        let (status, len) = rig.request(
            VIRTIO_BLK_T_IN,
            sector,
            &[readable(HEADER, 16), writable(DATA, 1024), status_buffer()],
        );
        assert_eq!((status, len), (ioerr(), 1), "sector {sector}");
    }
    let (status, _) = rig.request(
        VIRTIO_BLK_T_OUT,
        sectors,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    assert_eq!(status, ioerr());
}

#[test]
fn malformed_requests_get_ioerr() {
    let mut rig = Rig::default(false);
    // Header missing or short.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &[status_buffer()]).0,
        ioerr()
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &[readable(HEADER, 8), status_buffer()])
            .0,
        ioerr()
    );
    // Data on the wrong side.
    let (status, _) = rig.request(
        VIRTIO_BLK_T_IN,
        0,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    assert_eq!(status, ioerr());
    let (status, _) = rig.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(HEADER, 16), writable(DATA, 512), status_buffer()],
    );
    assert_eq!(status, ioerr());
    // A data buffer outside guest memory, and one straddling its end.
    for (addr, len) in [(MEMORY_SIZE + 0x1000, 512), (MEMORY_SIZE - 256, 512)] {
        let (status, _) = rig.request(
            VIRTIO_BLK_T_IN,
            0,
            &[readable(HEADER, 16), writable(addr, len), status_buffer()],
        );
        assert_eq!(status, ioerr(), "buffer at {addr:#x}");
    }
    // Data not a whole number of sectors.
    let (status, _) = rig.request(
        VIRTIO_BLK_T_IN,
        0,
        &[readable(HEADER, 16), writable(DATA, 100), status_buffer()],
    );
    assert_eq!(status, ioerr());
    assert_eq!(rig.used_idx(0), 7, "every malformed request was answered");
}

/// The fault-injecting storage wraps the engines, so its failures reach every request type
/// whichever engine serves it.
fn storage_failures_get_ioerr(mut rig: Rig) {
    rig.backend
        .device()
        .storage()
        .faults
        .fail
        .store(true, Ordering::Relaxed);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_IN,
        0,
        &[readable(HEADER, 16), writable(DATA, 512), status_buffer()],
    );
    assert_eq!((status, len), (ioerr(), 1));
    let write = rig.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    assert_eq!(write, (ioerr(), 1));
    let flush = rig.flush();
    assert_eq!(flush, (ioerr(), 1));
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        range_segment(&rig, DATA, 0, 1, 0);
        let (status, _) = rig.request(
            request_type,
            0,
            &[readable(HEADER, 16), readable(DATA, 16), status_buffer()],
        );
        assert_eq!(status, ioerr(), "request type {request_type}");
    }
}

#[test]
fn storage_failures_get_ioerr_with_the_sync_engine() {
    storage_failures_get_ioerr(Rig::default(false));
}

#[test]
fn storage_failures_get_ioerr_through_io_uring() {
    storage_failures_get_ioerr(Rig::uring(false));
}

/// In writethrough mode every write, discard and zeroing is followed by a flush before it
/// completes; in writeback mode none is.
fn writethrough_flushes_after_each_change(mut rig: Rig) {
    let flushes = |rig: &Rig| {
        rig.backend
            .device()
            .storage()
            .faults
            .flushes
            .load(Ordering::Relaxed)
    };
    let write = [readable(HEADER, 16), readable(DATA, 512), status_buffer()];
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &write), (ok(), 1));
    assert_eq!(flushes(&rig), 0);
    rig.backend
        .set_config(CONFIG_WRITEBACK_OFFSET as u32, &[0])
        .unwrap();
    rig.fill(DATA, 512, 0x3c);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &write), (ok(), 1));
    assert_eq!(flushes(&rig), 1);
    assert!(rig.disk(0, 512).iter().all(|&b| b == 0x3c));
    range_segment(&rig, DATA, 0, 1, 0);
    let ranges = [readable(HEADER, 16), readable(DATA, 16), status_buffer()];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &ranges),
        (ok(), 1)
    );
    assert_eq!(flushes(&rig), 2);
    assert!(rig.disk(0, 512).iter().all(|&b| b == 0));
    // A flush that fails fails the write it follows.
    rig.backend
        .device()
        .storage()
        .faults
        .fail
        .store(true, Ordering::Relaxed);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &write).0, ioerr());
}

#[test]
fn writethrough_flushes_after_each_change_with_the_sync_engine() {
    writethrough_flushes_after_each_change(Rig::default(true));
}

#[test]
fn writethrough_flushes_after_each_change_through_io_uring() {
    writethrough_flushes_after_each_change(Rig::uring(true));
}

/// Chains that leave no place for a status byte are returned with length 0 and the status
/// location is never written.
#[test]
fn unanswerable_chains_are_dropped_without_writing() {
    let mut rig = Rig::default(false);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("no writable byte", vec![raw(readable(HEADER, 16), 0, 0)]),
        (
            "status not device-writable",
            vec![
                raw(readable(HEADER, 16), VRING_DESC_F_NEXT, 1),
                raw(readable(STATUS, 1), 0, 0),
            ],
        ),
        ("zero-length chain", vec![raw(writable(STATUS, 0), 0, 0)]),
        (
            "status outside memory",
            vec![
                raw(readable(HEADER, 16), VRING_DESC_F_NEXT, 1),
                raw(writable(MEMORY_SIZE + 8, 1), 0, 0),
            ],
        ),
        (
            "readable after writable",
            vec![
                raw(readable(HEADER, 16), VRING_DESC_F_NEXT, 1),
                raw(writable(STATUS, 1), VRING_DESC_F_NEXT, 2),
                raw(readable(DATA, 16), 0, 0),
            ],
        ),
    ];
    for (name, descriptors) in cases {
        rig.header(VIRTIO_BLK_T_IN, 0);
        // Descriptor indices inside each case are relative; rebase the NEXT links.
        let base = rig.next_index(0, descriptors.len());
        let head = rig.publish(0, &rebased(&descriptors, base));
        let position = rig.used_idx(0);
        rig.kick(0);
        assert_eq!(rig.used_idx(0), position + 1, "{name}: not returned");
        assert_eq!(rig.used(0, position), (u32::from(head), 0), "{name}");
        assert_eq!(rig.status(), STATUS_UNTOUCHED, "{name}");
    }
}

#[test]
fn descriptor_loops_and_bad_next_indices_are_dropped() {
    let mut rig = Rig::default(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // Two descriptors pointing at each other, then one pointing past the table.
    rig.publish(
        0,
        &[
            raw(readable(HEADER, 16), VRING_DESC_F_NEXT, 1),
            raw(status_buffer(), VRING_DESC_F_NEXT, 0),
        ],
    );
    rig.publish(
        0,
        &[raw(readable(HEADER, 16), VRING_DESC_F_NEXT, QUEUE_SIZE + 5)],
    );
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 2);
    assert_eq!(rig.used(0, 0).1, 0);
    assert_eq!(rig.used(0, 1).1, 0);
    assert_eq!(rig.status(), STATUS_UNTOUCHED);
    // The queue keeps working afterwards.
    let (status, _) = rig.flush();
    assert_eq!(status, ok());
}

#[test]
fn nested_indirect_tables_are_dropped() {
    let mut rig = Rig::default(false);
    let inner = raw(readable(INDIRECT_TABLE, 16), VRING_DESC_F_INDIRECT, 0);
    rig.mem
        .write_obj(inner, GuestAddress(INDIRECT_TABLE))
        .unwrap();
    let head = RawDescriptor::from(SplitDescriptor::new(
        INDIRECT_TABLE,
        16,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    rig.publish(0, &[head]);
    rig.kick(0);
    assert_eq!(rig.used(0, 0), (0, 0));
}

#[test]
fn readonly_disks_refuse_writes_and_offer_ro() {
    let config = BlkConfig {
        readonly: true,
        ..BlkConfig::memory(DISK_SIZE)
    };
    let mut rig = Rig::new(config, false);
    assert_ne!(rig.backend.features() & (1 << VIRTIO_BLK_F_RO), 0);
    rig.fill(DATA, 512, 0x11);
    let (status, _) = rig.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    assert_eq!(status, ioerr());
    assert!(rig.disk(0, 512).iter().all(|&b| b == 0));
    range_segment(&rig, DATA, 0, 1, 0);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let (status, _) = rig.request(
            request_type,
            0,
            &[readable(HEADER, 16), readable(DATA, 16), status_buffer()],
        );
        assert_eq!(status, ioerr());
    }
    // Nothing to make durable: a flush succeeds without reaching the storage.
    let flush = rig.flush();
    assert_eq!(flush, (ok(), 1));
    let storage = rig.backend.device().storage();
    assert_eq!(storage.faults.flushes.load(Ordering::Relaxed), 0);
}

#[test]
fn event_idx_suppresses_notifications_the_driver_did_not_ask_for() {
    let mut rig = Rig::default(true);
    // used_event sits after the avail ring entries; ask to be notified only at entry 5.
    let used_event = rig.rings(0).avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
    rig.mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    rig.flush();
    assert!(
        rig.calls[0].read().is_err(),
        "notified although used_event was 5"
    );
    // The device publishes avail_event so the driver knows to kick for the next request.
    assert_eq!(rig.used_ring(0).avail_event(), 1);
    for _ in 0..5 {
        rig.flush();
    }
    assert_eq!(
        rig.calls[0].read().unwrap(),
        1,
        "notified once, when used_idx passed 5"
    );
}

#[test]
fn batches_are_served_and_signalled_once() {
    let mut rig = Rig::default(false);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..4 {
        rig.add_chain(0, &[readable(HEADER, 16), status_buffer()]);
    }
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 4);
    assert_eq!(rig.calls[0].read().unwrap(), 1);
}

#[test]
fn each_queue_has_its_own_thread_and_ring() {
    let config = BlkConfig {
        num_queues: 2,
        ..BlkConfig::memory(DISK_SIZE)
    };
    let mut rig = Rig::new(config, false);
    assert_eq!(rig.backend.queues_per_thread(), vec![0b01, 0b10]);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    rig.add_chain(1, &[readable(HEADER, 16), status_buffer()]);
    rig.kick(1);
    assert_eq!(rig.used_idx(1), 1);
    assert_eq!(rig.used_idx(0), 0);
    let (consumer, notifier) = rig.backend.exit_event(1).unwrap();
    let (other_consumer, _) = rig.backend.exit_event(1).unwrap();
    notifier.notify().unwrap();
    assert!(consumer.consume().is_ok());
    assert!(
        other_consumer.consume().is_err(),
        "exit events must not be shared"
    );
}

#[test]
fn unexpected_events_are_ignored_without_stopping_the_worker() {
    let mut rig = Rig::default(false);
    let vrings = &rig.vrings[..];
    assert!(
        rig.backend
            .handle_event(0, EventSet::OUT, vrings, 0)
            .is_ok()
    );
    assert!(rig.backend.handle_event(7, EventSet::IN, vrings, 0).is_ok());
    assert!(rig.backend.handle_event(0, EventSet::IN, vrings, 9).is_ok());
    assert_eq!(rig.flush().0, ok());
}

#[test]
fn config_space_reads_honour_offset_and_size() {
    let rig = Rig::new(
        BlkConfig {
            num_queues: 3,
            ..BlkConfig::memory(DISK_SIZE)
        },
        false,
    );
    let full = rig.backend.get_config(0, 64);
    assert_eq!(full.len(), 64);
    let mut config = VirtioBlkConfig::default();
    config.as_mut_slice().copy_from_slice(&full);
    assert_eq!(config.capacity.to_native(), DISK_SIZE / 512);
    assert_eq!(config.num_queues.to_native(), 3);
    assert_eq!(
        config.seg_max.to_native(),
        u32::from(rig.backend.max_queue_size() as u16) - 2
    );
    assert_eq!(rig.backend.get_config(34, 2), vec![3, 0]);
    assert_eq!(
        rig.backend.get_config(0, 8),
        (DISK_SIZE / 512).to_le_bytes()
    );
    assert_eq!(
        rig.backend.get_config(62, 4),
        vec![0; 4],
        "past the end reads as zero"
    );
    assert_eq!(rig.backend.get_config(1000, 2), vec![0; 2]);
}

#[test]
fn only_the_writeback_byte_is_writable() {
    let rig = Rig::default(false);
    rig.backend
        .set_config(CONFIG_WRITEBACK_OFFSET as u32, &[0])
        .unwrap();
    assert_eq!(
        rig.backend.get_config(CONFIG_WRITEBACK_OFFSET as u32, 1),
        vec![0]
    );
    assert!(rig.backend.set_config(0, &[1, 2, 3, 4]).is_err());
    assert!(
        rig.backend
            .set_config(CONFIG_WRITEBACK_OFFSET as u32, &[1, 1])
            .is_err()
    );
    rig.backend.reset_device();
    assert_eq!(
        rig.backend.get_config(CONFIG_WRITEBACK_OFFSET as u32, 1),
        vec![1]
    );
}

#[test]
fn stop_vring_waits_for_the_batch_in_flight() {
    use std::sync::atomic::AtomicBool;
    let rig = Rig::default(false);
    let stopped = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Hold the queue the way its worker does while serving a batch.
        let batch = rig.backend.workers[0].lock().unwrap();
        let stopper = scope.spawn(|| {
            rig.backend.stop_vring(0).unwrap();
            stopped.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !stopped.load(Ordering::SeqCst),
            "stop_vring returned mid-batch"
        );
        drop(batch);
        stopper.join().unwrap();
    });
    assert!(stopped.load(Ordering::SeqCst));
    rig.backend.stop_vring(5).unwrap();
}

/// Writes `byte` over 4 KiB at sector 8 * `index` through its own header, data and status
/// buffers; returns the head.
fn publish_write(rig: &mut Rig, index: u64, byte: u8) -> u16 {
    let header = HEADER + 0x100 * index;
    let data = DATA + 0x1000 * index;
    rig.mem
        .write_obj(
            RequestHeader {
                request_type: Le32::from(VIRTIO_BLK_T_OUT),
                reserved: Le32::from(0),
                sector: Le64::from(8 * index),
            },
            GuestAddress(header),
        )
        .unwrap();
    rig.fill(data, 4096, byte);
    rig.fill(STATUS + index, 1, STATUS_UNTOUCHED);
    rig.add_chain(
        0,
        &[
            readable(header, 16),
            readable(data, 4096),
            writable(STATUS + index, 1),
        ],
    )
}

/// A backend that died with requests in flight left them in the region; the new one resubmits
/// them, oldest first, before it takes new requests, and starts reading the available ring where
/// the dead one stopped although the frontend restored it to the used index. Here the dead
/// backend took heads 0, 1 and 2 (2 first), answered 1, and never saw 3: after the restart
/// the used ring holds 1, then 2 and 0 resubmitted, then 3, each exactly once.
#[test]
fn requests_left_in_flight_by_a_dead_backend_are_resubmitted_first() {
    let mut rig = Rig::default(false);
    let heads: Vec<u16> = (0..4)
        .map(|i| publish_write(&mut rig, i, 0x60 + i as u8))
        .collect();
    let region = rig.inflight_file();
    {
        let mut tracker = InflightQueue::new(rig.map_inflight(&region), 0).unwrap();
        tracker.recover(0, QUEUE_SIZE).unwrap();
        let vring = &rig.vrings[0];
        let mut taken = Vec::new();
        for _ in 0..3 {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(rig.mem);
            taken.push(chain.unwrap().head_index());
        }
        for head in [taken[2], taken[0], taken[1]] {
            tracker.begin(head);
        }
        tracker
            .publish(taken[1], || {
                vring.add_used(taken[1], 1).unwrap();
                Ok::<_, ()>(vring.get_ref().get_queue().next_used())
            })
            .unwrap();
    }
    // The restart: QEMU resumes the available ring at the used index, a new region mapping
    // arrives, and the queue's first event comes.
    rig.vrings[0].set_queue_next_avail(1);
    rig.set_inflight(&region);
    rig.kick(0);
    let used: Vec<u32> = (0..rig.used_idx(0)).map(|at| rig.used(0, at).0).collect();
    let expected: Vec<u32> = [1, 2, 0, 3].iter().map(|&i| u32::from(heads[i])).collect();
    assert_eq!(used, expected);
    for index in [0u64, 2, 3] {
        assert_eq!(rig.bytes(STATUS + index, 1), [ok()], "request {index}");
        assert!(
            rig.disk(4096 * index, 4096)
                .iter()
                .all(|&b| b == 0x60 + index as u8)
        );
    }
}

/// Counts the heap allocations of the current thread, for the hot-path test below.
mod allocation_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    struct CountingAllocator;

    // SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
    // a const-initialised thread-local, which never allocates.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
            // SAFETY: the caller's contract for `alloc` is passed on as it is.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    /// Allocations the current thread makes while running `f`.
    pub fn during(f: impl FnOnce()) -> u64 {
        let before = ALLOCATIONS.with(Cell::get);
        f();
        ALLOCATIONS.with(Cell::get) - before
    }
}

/// Serves a write, a read and a flush on queue 0; returns the allocations made meanwhile by
/// the worker (here: the calling thread).
fn serve_write_read_flush(rig: &mut Rig) -> u64 {
    let mut allocations = 0;
    for (request_type, buffers) in [
        (
            VIRTIO_BLK_T_OUT,
            &[readable(HEADER, 16), readable(DATA, 8192), status_buffer()][..],
        ),
        (
            VIRTIO_BLK_T_IN,
            &[readable(HEADER, 16), writable(DATA, 8192), status_buffer()],
        ),
        (VIRTIO_BLK_T_FLUSH, &[readable(HEADER, 16), status_buffer()]),
    ] {
        rig.header(request_type, 16);
        rig.add_chain(0, buffers);
        allocations += allocation_count::during(|| rig.kick(0));
        assert_eq!(rig.status(), ok(), "request type {request_type}");
    }
    allocations
}

/// Once a worker's buffers have grown to the largest request seen, serving reads, writes and
/// flushes allocates nothing, with either engine.
#[test]
fn the_request_path_does_not_allocate_once_warm() {
    let tracked = Rig::uring(true);
    tracked.set_inflight(&tracked.inflight_file());
    for mut rig in [Rig::default(true), Rig::uring(true), tracked] {
        // Five rounds of three requests: the mock rings cannot wrap past the 16th entry.
        serve_write_read_flush(&mut rig);
        let allocations: u64 = (0..4).map(|_| serve_write_read_flush(&mut rig)).sum();
        assert_eq!(allocations, 0, "allocations while serving 12 requests");
    }
}

/// Two heads beyond the descriptor table ahead of a valid request, published with one kick:
/// the bad heads are skipped and the request is served in the same kick, not the next one.
fn bad_heads_do_not_hold_back_the_batch(mut rig: Rig) {
    publish_heads(rig.rings(0), QUEUE_SIZE, &[QUEUE_SIZE, u16::MAX]);
    rig.header(VIRTIO_BLK_T_OUT, 8);
    rig.fill(DATA, 512, 0x5a);
    let head = rig.add_chain(
        0,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    rig.kick(0);
    assert_eq!(
        rig.used_idx(0),
        1,
        "the valid request waits for another kick"
    );
    assert_eq!(rig.used(0, 0), (u32::from(head), 1));
    assert_eq!(rig.status(), ok());
    assert_eq!(rig.disk(8 * 512, 512), vec![0x5a; 512]);
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_without_event_idx() {
    bad_heads_do_not_hold_back_the_batch(Rig::default(false));
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_with_event_idx() {
    bad_heads_do_not_hold_back_the_batch(Rig::default(true));
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_through_io_uring() {
    bad_heads_do_not_hold_back_the_batch(Rig::uring(true));
}

/// An avail index more than a ring ahead of the device (a request is published, then the
/// index jumps by the ring's size and 8 more): the kick returns, the queue is stopped and the
/// transport hears of it once; once the transport readies the queue again, it serves.
fn an_avail_index_beyond_the_ring_stops_the_queue(mut rig: Rig) {
    let recorder = FaultRecorder::default();
    rig.backend.set_fault_handler(recorder.handler());
    rig.header(VIRTIO_BLK_T_OUT, 0);
    rig.add_chain(
        0,
        &[readable(HEADER, 16), readable(DATA, 512), status_buffer()],
    );
    set_avail_idx(rig.rings(0), QUEUE_SIZE + 8);
    rig.kick_within_bound(0);
    let fault = QueueFault {
        queue: 0,
        fault: RingFault::AvailIndexBeyondRing {
            avail_idx: QUEUE_SIZE + 8,
            next_avail: 0,
            size: QUEUE_SIZE,
        },
    };
    assert_eq!(recorder.faults(), vec![fault]);
    assert!(!queue_is_live(&rig.vrings[0]), "the queue was not stopped");
    assert_eq!(rig.used_idx(0), 0);
    assert_eq!(rig.status(), STATUS_UNTOUCHED);
    rig.kick(0);
    assert_eq!(recorder.faults().len(), 1, "the fault is reported once");

    // The driver repairs its ring and the transport starts the queue again.
    set_avail_idx(rig.rings(0), 1);
    rig.vrings[0].set_queue_ready(true);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 1);
    assert_eq!(rig.status(), ok());
}

#[test]
fn an_avail_index_beyond_the_ring_stops_the_queue_without_event_idx() {
    an_avail_index_beyond_the_ring_stops_the_queue(Rig::default(false));
}

#[test]
fn an_avail_index_beyond_the_ring_stops_the_queue_with_event_idx() {
    an_avail_index_beyond_the_ring_stops_the_queue(Rig::default(true));
}

#[test]
fn an_avail_index_beyond_the_ring_stops_the_queue_through_io_uring() {
    an_avail_index_beyond_the_ring_stops_the_queue(Rig::uring(true));
}

/// Publishes a 4 KiB write of `byte` at sector 8 * `index` and, behind it, a read of the same
/// sectors into a buffer of its own; returns the read's data address.
fn publish_write_and_read_back(rig: &mut Rig, index: u64, byte: u8) -> u64 {
    publish_write(rig, index, byte);
    let base = 0x5_0000 + index * 0x1100;
    let header = RequestHeader {
        request_type: Le32::from(VIRTIO_BLK_T_IN),
        reserved: Le32::from(0),
        sector: Le64::from(8 * index),
    };
    rig.mem.write_obj(header, GuestAddress(base)).unwrap();
    rig.add_chain(
        0,
        &[
            readable(base, 16),
            writable(base + 0x10, 4096),
            writable(base + 0x1010, 1),
        ],
    );
    base + 0x10
}

#[test]
fn kicks_are_served_inline_when_requests_stay_in_the_page_cache() {
    for event_idx in [false, true] {
        let mut rig = Rig::buffered_uring(event_idx);
        let read_back = publish_write_and_read_back(&mut rig, 1, 0x5a);
        assert_eq!(rig.kick_inline(0), InlineKick::Served);
        assert_eq!(rig.used_idx(0), 2, "event_idx {event_idx}");
        assert_eq!(rig.disk(8 * 512, 4096), vec![0x5a; 4096]);
        assert_eq!(rig.bytes(read_back, 4096), vec![0x5a; 4096]);
        assert_eq!(rig.calls[0].read().unwrap(), 1, "the driver is notified");
    }
}

#[test]
fn an_inline_round_serves_a_bounded_batch_and_hands_the_rest_to_the_worker() {
    let mut rig = Rig::buffered_uring(false);
    // One chain made available again and again: the table holds too few descriptors for a
    // batch of distinct ones.
    let head = publish_write(&mut rig, 0, 0x33);
    let count = super::INLINE_CHAINS + 3;
    publish_heads(rig.rings(0), QUEUE_SIZE, &vec![head; count - 1]);
    assert_eq!(rig.kick_inline(0), InlineKick::HandedOver);
    assert_eq!(usize::from(rig.used_idx(0)), super::INLINE_CHAINS);
    rig.kick(0);
    assert_eq!(usize::from(rig.used_idx(0)), count);
    assert_eq!(rig.disk(0, 4096), vec![0x33; 4096]);
}

/// A rig whose inline round took a flush, which takes the ring, and so handed it over to the
/// queue's worker still in flight.
fn flush_handed_over(event_idx: bool) -> Rig {
    let mut rig = Rig::buffered_uring(event_idx);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    rig.add_chain(0, &[readable(HEADER, 16), status_buffer()]);
    assert_eq!(rig.kick_inline(0), InlineKick::HandedOver);
    assert_eq!(rig.used_idx(0), 0);
    rig
}

/// A flush takes the ring: the worker must submit it, wait for it and answer it.
#[test]
fn a_request_that_would_wait_is_left_to_the_worker() {
    let mut rig = flush_handed_over(true);
    assert_eq!(
        rig.kick_inline(0),
        InlineKick::Unserved,
        "the worker's request in flight keeps the queue"
    );
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 1);
    assert_eq!(rig.status(), ok());
    let read_back = publish_write_and_read_back(&mut rig, 2, 0x77);
    assert_eq!(rig.kick_inline(0), InlineKick::Served);
    assert_eq!(rig.bytes(read_back, 4096), vec![0x77; 4096]);
}

/// A reset that comes before the worker took a hand-over must not leave the requests in
/// flight for the worker to put into the rings the driver sets up next: `stop_vring` answers
/// them on the rings they came from.
#[test]
fn stopping_a_queue_finishes_what_an_inline_round_handed_over() {
    let rig = flush_handed_over(false);
    rig.vrings[0].set_queue_ready(false);
    rig.backend.stop_vring(0).unwrap();
    assert_eq!(rig.used_idx(0), 1, "answered by stop_vring");
    assert_eq!(rig.status(), ok());
    assert!(rig.backend.workers[0].lock().unwrap().handed_over.is_none());
    assert_eq!(
        rig.backend.workers[0].lock().unwrap().requests.in_flight(),
        0
    );
}

#[test]
fn a_worker_mid_batch_or_an_engine_that_may_sleep_turns_inline_kicks_away() {
    let mut rig = Rig::buffered_uring(false);
    publish_write(&mut rig, 0, 1);
    {
        let _batch = rig.backend.workers[0].lock().unwrap();
        assert_eq!(rig.kick_inline(0), InlineKick::WorkerBusy);
    }
    assert_eq!(
        rig.used_idx(0),
        0,
        "nothing taken while the worker held the queue"
    );
    for mut rig in [Rig::default(false), Rig::uring(false)] {
        publish_write(&mut rig, 0, 1);
        assert_eq!(rig.kick_inline(0), InlineKick::Unserved);
        assert_eq!(rig.used_idx(0), 0);
        rig.kick(0);
        assert_eq!(rig.used_idx(0), 1);
    }
}
