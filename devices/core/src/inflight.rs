//! vhost-user inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split rings.
//!
//! A device that completes requests out of order cannot be restarted from the ring alone: after
//! a crash the frontend only knows the used index, and the available ring slots of requests that
//! were still running may already hold new heads. So the device records, in a shared-memory
//! region the frontend keeps across backend restarts, which heads it has taken and not yet
//! returned; a restarted backend resubmits those and carries on after them.
//!
//! Layout (vhost-user specification, "Inflight I/O tracking"), one region per queue, each
//! 64-byte aligned:
//!
//! ```text
//! u64 features (0) | u16 version (1) | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc_num x { u8 inflight | u8 padding[5] | u16 next | u64 counter }
//! ```
//!
//! Crash consistency: a SIGKILLed backend leaves exactly the stores it executed before the kill,
//! in program order (interrupts are precise), so what matters is that neither the compiler nor
//! the CPU lets a store become visible before the ones it depends on. Each such store below is a
//! `Release` store, with the reason written next to it. The restarted backend sees all of them:
//! the dead process's threads had stopped before its socket was closed, which is what made the
//! frontend reconnect.
//!
//! The frontend owns the memory: its contents are treated as untrusted input (every index is
//! bounds-checked, loops are bounded) and the file must be sealed against shrinking, so a
//! truncation cannot turn an access into SIGBUS.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};

use log::warn;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion, VolatileMemory,
};

/// The only region version the specification defines; 0 marks a region nobody initialised.
const VERSION: u16 = 1;

// Queue header fields, as byte offsets into a queue's region.
const FEATURES_OFFSET: usize = 0;
const VERSION_OFFSET: usize = 8;
const DESC_NUM_OFFSET: usize = 10;
const LAST_BATCH_HEAD_OFFSET: usize = 12;
const USED_IDX_OFFSET: usize = 14;
const QUEUE_HEADER_SIZE: usize = 16;
// Descriptor state fields, as byte offsets into one descriptor's entry.
const DESC_INFLIGHT_OFFSET: usize = 0;
const DESC_NEXT_OFFSET: usize = 6;
const DESC_COUNTER_OFFSET: usize = 8;
const DESC_STATE_SIZE: usize = 16;
/// Alignment of each queue's region (the stride libvhost-user uses too, so that regions stay
/// readable by either backend for power-of-two queue sizes of 4 and up).
const QUEUE_REGION_ALIGN: usize = 64;
const PAGE_SIZE: u64 = 0x1000;
/// The largest split ring virtio allows.
const MAX_QUEUE_SIZE: u16 = 32768;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region: num_queues is 0")]
    NoQueues,
    #[error("inflight region: queue_size {0} is not in 1..={MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error(
        "inflight region: mmap_size {size} is smaller than the {needed} bytes {num_queues} \
         queue(s) of {queue_size} entries need"
    )]
    TooSmall {
        size: u64,
        needed: usize,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("inflight region: mmap_offset {0:#x} is not page aligned")]
    UnalignedOffset(u64),
    #[error(
        "inflight fd holds {len} bytes, fewer than mmap_offset + mmap_size = {end} \
         (a frontend that shrank it?)"
    )]
    ShortFile { len: u64, end: u128 },
    #[error(
        "inflight fd is not sealed against shrinking (F_SEAL_SHRINK); a frontend that truncated \
         it would crash the daemon with SIGBUS, so only the sealed memfds handed out by \
         GET_INFLIGHT_FD are accepted"
    )]
    NotSealed,
    #[error("queue of {queue_size} entries, but the inflight region tracks {desc_num} per queue")]
    QueueTooLarge { queue_size: u16, desc_num: u16 },
    #[error("inflight region: {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> InflightError {
    move |source| InflightError::Io { what, source }
}

fn resubmission_error(error: impl std::fmt::Display) -> InflightError {
    InflightError::Io {
        what: "setting up the resubmission ring",
        source: io::Error::other(error.to_string()),
    }
}

/// Bytes one queue of `queue_size` entries takes in the region.
fn queue_region_size(queue_size: u16) -> usize {
    (QUEUE_HEADER_SIZE + DESC_STATE_SIZE * usize::from(queue_size))
        .next_multiple_of(QUEUE_REGION_ALIGN)
}

/// Bytes a region for `num_queues` queues of `queue_size` entries takes.
pub fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_size(queue_size)
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 {
        return Err(InflightError::NoQueues);
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    Ok(())
}

/// A zeroed region for `num_queues` queues of `queue_size` entries, as GET_INFLIGHT_FD hands
/// out: a memfd sealed against any size change, and its size.
pub fn create_region_file(num_queues: u16, queue_size: u16) -> Result<(File, u64), InflightError> {
    check_geometry(num_queues, queue_size)?;
    let size = region_size(num_queues, queue_size) as u64;
    // SAFETY: a NUL-terminated literal name; memfd_create has no other preconditions.
    let fd = unsafe {
        libc::memfd_create(
            c"hvisor-vhost-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io_error("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(io_error("sizing the memfd"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io_error("sealing the memfd")(io::Error::last_os_error()));
    }
    Ok((file, size))
}

/// The inflight region of a connection, mapped.
pub struct InflightRegion {
    mapping: MmapRegion,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// Maps the region SET_INFLIGHT_FD describes, after checking that `file` really holds it
    /// and cannot shrink under the mapping.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let needed = region_size(num_queues, queue_size);
        if size < needed as u64 {
            return Err(InflightError::TooSmall {
                size,
                needed,
                num_queues,
                queue_size,
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        if offset % page != 0 {
            return Err(InflightError::UnalignedOffset(offset));
        }
        // SAFETY: fcntl on a descriptor `file` owns, without pointer arguments.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = file
            .metadata()
            .map_err(io_error("fstat of the inflight fd"))?
            .len();
        let end = u128::from(offset) + u128::from(size);
        if u128::from(len) < end {
            return Err(InflightError::ShortFile { len, end });
        }
        // Only what the queues use is mapped, whatever size the frontend claims.
        let mapping = MmapRegion::from_file(FileOffset::new(file, offset), needed)
            .map_err(|error| io_error("mmap")(io::Error::other(error)))?;
        Ok(InflightRegion {
            mapping,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    // The offsets below are computed from a queue index < num_queues and a descriptor index <
    // queue_size, inside the `region_size` bytes mapped, and are naturally aligned (the mapping
    // is page aligned, queue regions 64-byte aligned, entries 16 bytes): the lookups cannot fail.
    fn u8_at(&self, offset: usize) -> &AtomicU8 {
        self.mapping
            .get_atomic_ref(offset)
            .expect("inflight offset inside the mapped region")
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        self.mapping
            .get_atomic_ref(offset)
            .expect("aligned inflight offset inside the mapped region")
    }

    // Not through `get_atomic_ref`: vm-memory implements it for 64-bit atomics only on the
    // architectures it lists, and loongarch64 is not among them, though it has them natively.
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset % std::mem::align_of::<AtomicU64>() == 0
                && offset + std::mem::size_of::<AtomicU64>() <= self.mapping.size(),
            "aligned inflight offset inside the mapped region"
        );
        // SAFETY: the 8 bytes at `offset` lie inside the mapping (asserted), which lives as long
        // as `self` and so as the reference; the address is aligned for AtomicU64 (the mapping
        // is page aligned, the offset asserted); AtomicU64 has the layout of u64, for which every
        // bit pattern is valid; and the region is only accessed through atomics, by us and by
        // the frontend's copy of it.
        unsafe { &*self.mapping.as_ptr().add(offset).cast::<AtomicU64>() }
    }
}

/// What a restarted queue must do before it takes new requests.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Heads the previous backend took and never returned, oldest first.
    pub resubmit: Vec<u16>,
    /// Where to read the available ring next (`None`: keep the frontend's SET_VRING_BASE, the
    /// region held no state).
    pub next_avail: Option<u16>,
}

/// One queue's tracker over its part of the region, owned by the queue's worker.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    index: u16,
    /// Byte offset of this queue's region.
    base: usize,
    /// Order in which heads were taken, kept across restarts through the region.
    counter: u64,
    recovered: bool,
}

impl InflightQueue {
    /// The tracker of queue `index`; `None` when the region has no such queue.
    pub fn new(region: Arc<InflightRegion>, index: u16) -> Option<Self> {
        if index >= region.num_queues {
            return None;
        }
        let base = usize::from(index) * queue_region_size(region.queue_size);
        Some(InflightQueue {
            region,
            index,
            base,
            counter: 0,
            recovered: false,
        })
    }

    /// Whether [`Self::recover`] has yet to run: once, before the queue takes its first request.
    pub fn needs_recovery(&self) -> bool {
        !self.recovered
    }

    fn desc_num(&self) -> u16 {
        self.region.queue_size
    }

    fn features(&self) -> &AtomicU64 {
        self.region.u64_at(self.base + FEATURES_OFFSET)
    }

    fn version(&self) -> &AtomicU16 {
        self.region.u16_at(self.base + VERSION_OFFSET)
    }

    fn stored_desc_num(&self) -> &AtomicU16 {
        self.region.u16_at(self.base + DESC_NUM_OFFSET)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.region.u16_at(self.base + LAST_BATCH_HEAD_OFFSET)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.region.u16_at(self.base + USED_IDX_OFFSET)
    }

    fn desc_offset(&self, head: u16) -> usize {
        self.base + QUEUE_HEADER_SIZE + DESC_STATE_SIZE * usize::from(head)
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.region
            .u8_at(self.desc_offset(head) + DESC_INFLIGHT_OFFSET)
    }

    fn next(&self, head: u16) -> &AtomicU16 {
        self.region
            .u16_at(self.desc_offset(head) + DESC_NEXT_OFFSET)
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        self.region
            .u64_at(self.desc_offset(head) + DESC_COUNTER_OFFSET)
    }

    /// Brings the region in line with the ring after a (re)connection: `used_idx` is the used
    /// ring's index as the driver sees it, `queue_size` the ring's size.
    ///
    /// A region nobody initialised (version 0: a fresh device) is initialised and nothing is
    /// resubmitted. Otherwise, the last published batch is settled first: when the ring's used
    /// index is ahead of the one recorded, the previous backend died between publishing a batch
    /// and clearing it, so the entries of that batch (a list from `last_batch_head`) are no
    /// longer in flight. Every head still marked is then resubmitted in the order it was taken,
    /// and new requests start after them: each head taken is either in the used ring or in
    /// flight, so the available ring was read up to `used_idx + in flight`.
    pub fn recover(&mut self, used_idx: u16, queue_size: u16) -> Result<Recovery, InflightError> {
        let desc_num = self.desc_num();
        if queue_size > desc_num {
            return Err(InflightError::QueueTooLarge {
                queue_size,
                desc_num,
            });
        }
        self.recovered = true;
        let version = self.version().load(Ordering::Acquire);
        let stored_desc_num = self.stored_desc_num().load(Ordering::Relaxed);
        if version != VERSION || stored_desc_num != desc_num {
            if version != 0 {
                warn!(
                    "queue {}: inflight region has version {version} and {stored_desc_num} \
                     entries (expected {VERSION} and {desc_num}): starting it afresh",
                    self.index
                );
            }
            self.initialise(used_idx);
            return Ok(Recovery {
                resubmit: Vec::new(),
                next_avail: None,
            });
        }
        let recorded = self.used_idx().load(Ordering::Acquire);
        if recorded != used_idx {
            // At most one entry per descriptor can be in a batch; a longer one (or a cycle in
            // the list) is a corrupted region, walked no further than that.
            let batch = used_idx.wrapping_sub(recorded).min(desc_num);
            let mut head = self.last_batch_head().load(Ordering::Acquire);
            for _ in 0..batch {
                if head >= desc_num {
                    break;
                }
                self.inflight(head).store(0, Ordering::Release);
                head = self.next(head).load(Ordering::Relaxed);
            }
            // Release: the clears above are in the region before the batch counts as settled;
            // a crash in between makes the next recovery settle it again, which is idempotent.
            self.used_idx().store(used_idx, Ordering::Release);
        }
        let mut in_flight: Vec<(u64, u16)> = Vec::new();
        for head in 0..desc_num {
            if self.inflight(head).load(Ordering::Acquire) == 0 {
                continue;
            }
            if head >= queue_size {
                warn!(
                    "queue {}: inflight region marks descriptor {head}, beyond the queue's \
                     {queue_size} entries: dropped",
                    self.index
                );
                self.inflight(head).store(0, Ordering::Release);
                continue;
            }
            in_flight.push((self.counter_of(head).load(Ordering::Relaxed), head));
        }
        in_flight.sort_unstable();
        self.counter = in_flight.last().map_or(0, |&(counter, _)| counter + 1);
        Ok(Recovery {
            next_avail: Some(used_idx.wrapping_add(in_flight.len() as u16)),
            resubmit: in_flight.into_iter().map(|(_, head)| head).collect(),
        })
    }

    fn initialise(&mut self, used_idx: u16) {
        for head in 0..self.desc_num() {
            self.inflight(head).store(0, Ordering::Relaxed);
        }
        self.features().store(0, Ordering::Relaxed);
        self.stored_desc_num()
            .store(self.desc_num(), Ordering::Relaxed);
        self.last_batch_head().store(0, Ordering::Relaxed);
        self.used_idx().store(used_idx, Ordering::Relaxed);
        // Release, last: a region with a version is complete; a crash before this store leaves
        // version 0, and the next start initialises it again.
        self.version().store(VERSION, Ordering::Release);
        self.counter = 0;
    }

    /// Marks `head` in flight: called when the head is taken from the available ring, before its
    /// request starts. Heads beyond the region (which the ring refuses to return anyway) are not
    /// tracked.
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num() {
            return;
        }
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        // Release: a restarted backend that finds the head in flight also finds its counter.
        self.inflight(head).store(1, Ordering::Release);
        self.counter += 1;
    }

    /// Returns `head` to the driver through `add_used`, which puts it in the used ring and
    /// returns the ring's new used index; the head is in flight until that is done, and is
    /// cleared right after, as a batch of one:
    ///
    /// 1. the head becomes the last batch (its `next` links the previous batch head, as the
    ///    specification describes the list);
    /// 2. `add_used` publishes it (virtio-queue stores the used index with `Release`, after the
    ///    element and after step 1);
    /// 3. the head is cleared, then `used_idx` records the ring index.
    ///
    /// A crash before 2 leaves the head in flight and the ring without it: it is resubmitted. A
    /// crash between 2 and the end of 3 leaves the ring one ahead of `used_idx`: recovery clears
    /// the last batch, this head. When `add_used` fails the head stays in flight (it was taken
    /// and is not in the used ring), which keeps the available-ring arithmetic of recovery right.
    pub fn publish<E>(
        &mut self,
        head: u16,
        add_used: impl FnOnce() -> Result<u16, E>,
    ) -> Result<(), E> {
        if head >= self.desc_num() {
            return add_used().map(drop);
        }
        let previous = self.last_batch_head().load(Ordering::Relaxed);
        self.next(head).store(previous, Ordering::Relaxed);
        // Release: after the link above, and after the previous head's `used_idx` store, so that
        // recovery never blames this head for a batch it was not part of.
        self.last_batch_head().store(head, Ordering::Release);
        let used_idx = add_used()?;
        // Release: only once the used ring holds the head.
        self.inflight(head).store(0, Ordering::Release);
        // Release: after the clear; until then recovery sees the ring ahead and clears it itself.
        self.used_idx().store(used_idx, Ordering::Release);
        Ok(())
    }
}

/// The chains a recovery resubmits, handed out by virtio-queue as if the driver had made them
/// available again, so that they are walked (indirect tables, loops, bounds) exactly as popped
/// ones are: their heads are listed in a private available ring, in a scratch region placed
/// beyond the end of guest memory in a copy of the guest memory map. Only the descriptors are
/// read through that copy; requests move their data through the real guest memory.
pub struct Resubmission {
    memory: GuestMemoryMmap,
    queue: Queue,
}

impl Resubmission {
    /// A private available ring listing `heads` (at most `queue_size` of them, each below it)
    /// for the descriptor table at `desc_table`.
    pub fn new(
        guest: &GuestMemoryMmap,
        desc_table: GuestAddress,
        queue_size: u16,
        heads: &[u16],
    ) -> Result<Self, InflightError> {
        // flags, idx, ring[queue_size], used_event
        let ring_len = 6 + 2 * u64::from(queue_size);
        let base = guest
            .last_addr()
            .checked_add(1)
            .and_then(|end| end.checked_align_up(PAGE_SIZE))
            .ok_or_else(|| {
                resubmission_error("guest memory reaches the end of the address space")
            })?;
        let scratch =
            GuestRegionMmap::from_range(base, ring_len.next_multiple_of(PAGE_SIZE) as usize, None)
                .map_err(resubmission_error)?;
        let memory = guest
            .insert_region(Arc::new(scratch))
            .map_err(resubmission_error)?;
        for (slot, &head) in heads.iter().enumerate() {
            memory
                .write_obj(head.to_le(), base.unchecked_add(4 + 2 * slot as u64))
                .map_err(resubmission_error)?;
        }
        memory
            .write_obj((heads.len() as u16).to_le(), base.unchecked_add(2))
            .map_err(resubmission_error)?;
        let mut queue = Queue::new(queue_size).map_err(resubmission_error)?;
        queue.set_size(queue_size);
        let halves = |addr: GuestAddress| (Some(addr.0 as u32), Some((addr.0 >> 32) as u32));
        let (low, high) = halves(desc_table);
        queue.set_desc_table_address(low, high);
        let (low, high) = halves(base);
        queue.set_avail_ring_address(low, high);
        queue.set_ready(true);
        Ok(Resubmission { memory, queue })
    }

    /// The chains, in the order of the heads given.
    pub fn chains(&mut self) -> impl Iterator<Item = DescriptorChain<&GuestMemoryMmap>> {
        let Resubmission { memory, queue } = self;
        queue.iter(&*memory).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::os::unix::fs::FileExt;

    use vhost_user_backend::{VringRwLock, VringT};

    use super::*;
    use crate::testing::{TestMemory, TestQueue, UsedRing, readable, ready_vring, writable};

    const QUEUE_SIZE: u16 = 16;
    const DESC_TABLE: u64 = 0x0;
    const AVAIL_RING: u64 = 0x1000;
    const USED_RING: u64 = 0x2000;
    /// Each request's one-descriptor buffer: 0x10000 + 0x100 * head.
    const BUFFERS: u64 = 0x1_0000;

    fn region(num_queues: u16) -> (File, Arc<InflightRegion>) {
        let (file, size) = create_region_file(num_queues, QUEUE_SIZE).unwrap();
        let mapped = map_again(&file, size, num_queues);
        (file, mapped)
    }

    /// A second mapping of the same file, as a restarted backend gets it through SET_INFLIGHT_FD.
    fn map_again(file: &File, size: u64, num_queues: u16) -> Arc<InflightRegion> {
        Arc::new(
            InflightRegion::map(file.try_clone().unwrap(), 0, size, num_queues, QUEUE_SIZE)
                .unwrap(),
        )
    }

    fn raw_bytes(file: &File, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        file.read_exact_at(&mut bytes, offset).unwrap();
        bytes
    }

    /// The specification's layout, byte for byte: queue 1 starts after queue 0's 64-byte aligned
    /// region; descriptor 3's entry holds inflight, next and counter at offsets 0, 6 and 8.
    #[test]
    fn the_region_has_the_layout_of_the_specification() {
        let (file, region) = region(2);
        assert_eq!(region_size(2, QUEUE_SIZE), 2 * 320);
        let mut tracker = InflightQueue::new(region.clone(), 1).unwrap();
        assert_eq!(
            tracker.recover(0, QUEUE_SIZE).unwrap(),
            Recovery {
                resubmit: vec![],
                next_avail: None
            }
        );
        let base = 320;
        assert_eq!(raw_bytes(&file, base + 8, 8), [1, 0, 16, 0, 0, 0, 0, 0]);
        tracker.begin(7);
        tracker.begin(3);
        let entry = |head: u64| raw_bytes(&file, base + 16 + 16 * head, 16);
        assert_eq!(entry(3), [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        tracker.publish(3, || Ok::<_, ()>(1)).unwrap();
        assert_eq!(
            raw_bytes(&file, base + 12, 4),
            [3, 0, 1, 0],
            "last_batch_head 3, used_idx 1"
        );
        assert_eq!(entry(3)[0], 0, "cleared");
        assert_eq!(entry(7)[0], 1, "still in flight");
        assert!(
            raw_bytes(&file, 0, 320).iter().all(|&byte| byte == 0),
            "queue 0 untouched"
        );
        assert!(InflightQueue::new(region, 2).is_none());
    }

    #[test]
    fn regions_that_could_hurt_the_daemon_are_refused() {
        let (file, size) = create_region_file(1, QUEUE_SIZE).unwrap();
        let map = |file: &File, offset, size, queues, queue_size| {
            InflightRegion::map(file.try_clone().unwrap(), offset, size, queues, queue_size)
                .unwrap_err()
                .to_string()
        };
        assert!(map(&file, 0, size, 0, QUEUE_SIZE).contains("num_queues is 0"));
        assert!(map(&file, 0, size, 1, 0).contains("queue_size 0"));
        assert!(map(&file, 0, size - 1, 1, QUEUE_SIZE).contains("mmap_size 319 is smaller"));
        assert!(map(&file, 100, size, 1, QUEUE_SIZE).contains("mmap_offset 0x64"));
        assert!(
            map(&file, 0, 2 * size, 2, QUEUE_SIZE).contains("holds 320 bytes"),
            "a file shorter than the region it claims to hold"
        );
        let unsealed = tempfile::tempfile().unwrap();
        unsealed.set_len(size).unwrap();
        assert!(map(&unsealed, 0, size, 1, QUEUE_SIZE).contains("F_SEAL_SHRINK"));
        // SAFETY: ftruncate on a descriptor the file owns.
        let shrunk = unsafe { libc::ftruncate(file.as_raw_fd(), 0) };
        assert_eq!(
            shrunk, -1,
            "the seal must keep the frontend from shrinking it"
        );
    }

    /// A driver and a device over one queue, with the device's tracker, where the device can be
    /// killed at any step and restarted on the same rings and region. The driver recycles the
    /// descriptors of completed requests at once, so available-ring slots of requests still in
    /// flight get overwritten, as with a real driver.
    struct Model {
        memory: TestMemory,
        file: File,
        size: u64,
        vring: VringRwLock,
        tracker: Option<InflightQueue>,
        used: UsedRing,
        /// The driver's side.
        avail_idx: u16,
        last_used: u16,
        free: Vec<u16>,
        /// Request id of each head the driver has in flight.
        outstanding: HashMap<u16, u64>,
        next_request: u64,
        /// How often each request id came back.
        completions: BTreeMap<u64, u32>,
        /// The device's side: heads taken and not yet returned, in the order taken.
        taken: Vec<u16>,
    }

    impl Model {
        fn new(track: bool) -> Self {
            let memory = TestMemory::new(0x2_0000);
            let (file, size) = create_region_file(1, QUEUE_SIZE).unwrap();
            let (vring, _) = Self::vring(&memory);
            let mut model = Model {
                used: UsedRing::new(memory.mem, GuestAddress(USED_RING), QUEUE_SIZE),
                memory,
                tracker: None,
                vring,
                file,
                size,
                avail_idx: 0,
                last_used: 0,
                free: (0..QUEUE_SIZE).rev().collect(),
                outstanding: HashMap::new(),
                next_request: 0,
                completions: BTreeMap::new(),
                taken: Vec::new(),
            };
            if track {
                model.tracker = InflightQueue::new(map_again(&model.file, size, 1), 0);
                model.recover();
            }
            model
        }

        fn vring(memory: &TestMemory) -> (VringRwLock, vmm_sys_util::eventfd::EventFd) {
            ready_vring(
                &memory.atomic,
                QUEUE_SIZE,
                GuestAddress(DESC_TABLE),
                GuestAddress(AVAIL_RING),
                GuestAddress(USED_RING),
                false,
            )
        }

        fn submit(&mut self) -> bool {
            let Some(head) = self.free.pop() else {
                return false;
            };
            let request = self.next_request;
            self.next_request += 1;
            let buffer = BUFFERS + 0x100 * u64::from(head);
            self.memory.write(buffer, &request.to_le_bytes());
            let descriptor = crate::testing::raw(readable(buffer, 8), 0, 0);
            self.memory
                .mem
                .write_obj(descriptor, GuestAddress(DESC_TABLE + 16 * u64::from(head)))
                .unwrap();
            let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            self.memory.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.memory
                .mem
                .store(
                    self.avail_idx,
                    GuestAddress(AVAIL_RING + 2),
                    Ordering::Release,
                )
                .unwrap();
            self.outstanding.insert(head, request);
            true
        }

        /// The driver takes every used element; a head it did not have in flight is a request
        /// answered twice.
        fn reap(&mut self) {
            while self.last_used != self.used.idx() {
                let (head, _) = self.used.entry(self.last_used);
                self.last_used = self.last_used.wrapping_add(1);
                let head = head as u16;
                let request = self.outstanding.remove(&head).unwrap_or_else(|| {
                    panic!("head {head} used but not in flight: a request answered twice")
                });
                *self.completions.entry(request).or_default() += 1;
                self.free.push(head);
            }
        }

        /// The device takes the next available head (and marks it, unless `crash_before_mark`).
        fn take(&mut self, crash_before_mark: bool) -> bool {
            let chain = self
                .vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(self.memory.mem);
            let Some(chain) = chain else { return false };
            let head = chain.head_index();
            if crash_before_mark {
                return true;
            }
            if let Some(tracker) = &mut self.tracker {
                tracker.begin(head);
            }
            self.taken.push(head);
            true
        }

        /// The device returns the `pick`-th head it holds; `crash` stops it at that step of
        /// publishing.
        fn complete(&mut self, pick: usize, crash: Option<PublishCrash>) -> bool {
            if self.taken.is_empty() {
                return false;
            }
            let head = self.taken.remove(pick % self.taken.len());
            let vring = &self.vring;
            let add_used = || -> Result<u16, ()> {
                if crash == Some(PublishCrash::BeforeUsedRing) {
                    return Err(());
                }
                vring.add_used(head, 0).unwrap();
                if crash == Some(PublishCrash::AfterUsedRing) {
                    return Err(());
                }
                Ok(vring.get_ref().get_queue().next_used())
            };
            match &mut self.tracker {
                Some(tracker) => {
                    let recorded = tracker.used_idx().load(Ordering::Relaxed);
                    let published = tracker.publish(head, add_used);
                    if crash == Some(PublishCrash::BeforeUsedIdx) {
                        // The last store of publishing did not happen.
                        tracker.used_idx().store(recorded, Ordering::Relaxed);
                    }
                    let _ = published;
                }
                None => {
                    let _ = add_used();
                }
            }
            true
        }

        /// Kills the device and starts a new one on the same rings and region, as QEMU
        /// reconnects: SET_VRING_BASE with the used index (QEMU's fallback when the backend died),
        /// then the tracker's recovery, then the resubmitted heads.
        fn restart(&mut self) {
            let (vring, _) = Self::vring(&self.memory);
            self.vring = vring;
            let used = self.used.idx();
            self.vring.set_queue_next_avail(used);
            self.vring.set_queue_next_used(used);
            self.taken.clear();
            if self.tracker.is_some() {
                self.tracker = InflightQueue::new(map_again(&self.file, self.size, 1), 0);
                self.recover();
            }
        }

        fn recover(&mut self) {
            let tracker = self.tracker.as_mut().unwrap();
            let recovery = tracker.recover(self.used.idx(), QUEUE_SIZE).unwrap();
            if let Some(next_avail) = recovery.next_avail {
                self.vring.set_queue_next_avail(next_avail);
            }
            let mut resubmission = Resubmission::new(
                self.memory.mem,
                GuestAddress(DESC_TABLE),
                QUEUE_SIZE,
                &recovery.resubmit,
            )
            .unwrap();
            let heads: Vec<u16> = resubmission
                .chains()
                .map(|chain| chain.head_index())
                .collect();
            assert_eq!(heads, recovery.resubmit, "every resubmitted head is walked");
            self.taken = heads;
        }

        /// Everything left is served and reaped; then every request came back exactly once.
        fn drain_and_check(&mut self) {
            for _ in 0..1000 {
                self.reap();
                while self.take(false) {}
                if !self.complete(0, None) && self.outstanding.is_empty() {
                    break;
                }
            }
            self.reap();
            assert!(
                self.outstanding.is_empty(),
                "requests never answered (lost): {:?}",
                self.outstanding
            );
            let twice: Vec<_> = self.completions.iter().filter(|(_, n)| **n != 1).collect();
            assert!(
                twice.is_empty(),
                "requests answered more than once: {twice:?}"
            );
            assert_eq!(self.completions.len() as u64, self.next_request);
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum PublishCrash {
        /// After the head became the last batch, before the used ring has it.
        BeforeUsedRing,
        /// After the used ring has it, before it was cleared.
        AfterUsedRing,
        /// After it was cleared, before `used_idx` was recorded.
        BeforeUsedIdx,
    }

    /// Each crash point by hand, with other requests in flight around it.
    #[test]
    fn a_crash_at_every_step_loses_and_repeats_nothing() {
        type Step = fn(&mut Model);
        let crashes: [(&str, Step); 5] = [
            ("after the pop, before the mark", |m| {
                m.take(true);
            }),
            ("after the mark, with the I/O running or done", |m| {
                m.take(false);
            }),
            ("between last_batch_head and the used ring", |m| {
                m.complete(1, Some(PublishCrash::BeforeUsedRing));
            }),
            ("between the used ring and the clear", |m| {
                m.complete(1, Some(PublishCrash::AfterUsedRing));
            }),
            ("between the clear and used_idx", |m| {
                m.complete(1, Some(PublishCrash::BeforeUsedIdx));
            }),
        ];
        for (name, crash) in crashes {
            let mut model = Model::new(true);
            // Six requests taken, two returned out of order, the driver reuses their slots.
            for _ in 0..6 {
                model.submit();
                model.take(false);
            }
            model.complete(3, None);
            model.complete(0, None);
            model.reap();
            model.submit();
            model.submit();
            crash(&mut model);
            let in_flight_at_crash = model.outstanding.len();
            model.restart();
            assert!(
                !model.taken.is_empty() || in_flight_at_crash == 0,
                "{name}: nothing resubmitted"
            );
            model.drain_and_check();
        }
    }

    /// Long random runs: requests taken and completed in random order, crashes at random steps
    /// (including inside publishing), the ring wrapping many times.
    #[test]
    fn random_crashes_lose_and_repeat_nothing() {
        for seed in 1..=40u64 {
            run_random(seed, true);
        }
    }

    /// The same runs without tracking (QEMU's fallback alone: resume at the used index) lose or
    /// repeat requests: the model catches what the tracker prevents.
    #[test]
    fn without_tracking_the_fallback_loses_or_repeats_requests() {
        let failures = (1..=40u64)
            .filter(|&seed| std::panic::catch_unwind(|| run_random(seed, false)).is_err())
            .count();
        assert!(
            failures > 30,
            "only {failures} of 40 untracked runs went wrong"
        );
    }

    fn run_random(seed: u64, track: bool) {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut random = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut model = Model::new(track);
        for _ in 0..3000 {
            match random(100) {
                0..=29 => {
                    model.submit();
                }
                30..=49 => model.reap(),
                50..=69 => {
                    model.take(false);
                }
                70..=96 => {
                    model.complete(random(16) as usize, None);
                }
                _ => {
                    match random(4) {
                        0 => {
                            model.take(true);
                        }
                        crash => {
                            let point = [
                                PublishCrash::BeforeUsedRing,
                                PublishCrash::AfterUsedRing,
                                PublishCrash::BeforeUsedIdx,
                            ][crash as usize - 1];
                            model.complete(random(16) as usize, Some(point));
                        }
                    }
                    model.restart();
                }
            }
        }
        model.drain_and_check();
        assert!(model.next_request > 500, "the ring wrapped many times");
    }

    /// Resubmission keeps the order in which heads were taken, across several restarts: a head
    /// taken after a restart is newer than every resubmitted one.
    #[test]
    fn resubmission_keeps_the_order_heads_were_taken_in() {
        let (_file, region) = region(1);
        let mut tracker = InflightQueue::new(region.clone(), 0).unwrap();
        tracker.recover(0, QUEUE_SIZE).unwrap();
        for head in [9, 2, 5] {
            tracker.begin(head);
        }
        let mut restarted = InflightQueue::new(region.clone(), 0).unwrap();
        let recovery = restarted.recover(0, QUEUE_SIZE).unwrap();
        assert_eq!(recovery.resubmit, [9, 2, 5]);
        assert_eq!(recovery.next_avail, Some(3));
        restarted.begin(1);
        restarted.publish(2, || Ok::<_, ()>(1)).unwrap();
        let mut again = InflightQueue::new(region, 0).unwrap();
        let recovery = again.recover(1, QUEUE_SIZE).unwrap();
        assert_eq!(recovery.resubmit, [9, 5, 1]);
        assert_eq!(recovery.next_avail, Some(4));
    }

    /// Contents a frontend could leave: a batch list with a cycle and a length beyond the queue,
    /// marks beyond the ring's size. Recovery stays bounded and resubmits only valid heads.
    #[test]
    fn a_corrupted_region_is_walked_within_bounds() {
        let (_file, region) = region(1);
        let mut tracker = InflightQueue::new(region, 0).unwrap();
        tracker.recover(0, QUEUE_SIZE).unwrap();
        for head in [2, 5, 9, 15] {
            tracker.begin(head);
        }
        tracker.next(2).store(5, Ordering::Relaxed);
        tracker.next(5).store(2, Ordering::Relaxed);
        tracker.last_batch_head().store(2, Ordering::Relaxed);
        // The ring claims 40000 elements more than recorded.
        let mut restarted = InflightQueue::new(tracker.region.clone(), 0).unwrap();
        let recovery = restarted.recover(40000, 8).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                resubmit: vec![],
                next_avail: Some(40000)
            },
            "2 and 5 settled by the batch, 9 and 15 beyond the 8-entry ring"
        );
        assert!(matches!(
            restarted.recover(0, 2 * QUEUE_SIZE),
            Err(InflightError::QueueTooLarge { .. })
        ));
    }

    /// A region another program initialised differently is started afresh, not trusted.
    #[test]
    fn a_region_of_another_version_starts_afresh() {
        let (_file, region) = region(1);
        let mut tracker = InflightQueue::new(region.clone(), 0).unwrap();
        tracker.recover(0, QUEUE_SIZE).unwrap();
        tracker.begin(4);
        tracker.version().store(2, Ordering::Relaxed);
        let mut restarted = InflightQueue::new(region, 0).unwrap();
        assert!(
            restarted
                .recover(7, QUEUE_SIZE)
                .unwrap()
                .resubmit
                .is_empty()
        );
        assert_eq!(restarted.version().load(Ordering::Relaxed), VERSION);
        assert_eq!(restarted.inflight(4).load(Ordering::Relaxed), 0);
        assert_eq!(restarted.used_idx().load(Ordering::Relaxed), 7);
    }

    /// Resubmitted chains are walked by virtio-queue like popped ones: direct and indirect
    /// chains, in the order given, with their buffers in guest memory.
    #[test]
    fn resubmitted_chains_are_the_drivers_chains() {
        let memory = TestMemory::new(0x10_0000);
        let mut queue = TestQueue::new(&memory, 0, QUEUE_SIZE, false);
        let direct = queue.add_chain(&[readable(0x8000, 16), writable(0x9000, 1)]);
        let indirect =
            queue.add_indirect_chain(0xa000, &[readable(0xb000, 16), writable(0xc000, 512)]);
        let desc_table = GuestAddress(queue.vring.get_ref().get_queue().desc_table());
        let mut resubmission =
            Resubmission::new(memory.mem, desc_table, QUEUE_SIZE, &[indirect, direct]).unwrap();
        let chains: Vec<Vec<(u64, u32, bool)>> = resubmission
            .chains()
            .map(|chain| {
                chain
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect()
            })
            .collect();
        assert_eq!(
            chains,
            [
                vec![(0xb000, 16, false), (0xc000, 512, true)],
                vec![(0x8000, 16, false), (0x9000, 1, true)],
            ]
        );
        assert!(
            !memory.mem.address_in_range(GuestAddress(0x10_0000)),
            "guest memory itself is left as it was"
        );
    }
}
