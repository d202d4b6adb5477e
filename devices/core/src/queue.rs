//! How every device's queue workers take chains from their rings and return them: the
//! notification loop, with and without VIRTIO_RING_F_EVENT_IDX, and [`Rings`], the one place
//! that checks what a driver published, so a broken ring is handled alike in every device.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use log::error;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::counters::QueueCounters;
use crate::log_limit::LogLimiter;

/// Heads beyond the descriptor table: a driver can publish them as fast as it likes.
static BAD_HEADS: LogLimiter = LogLimiter::new(module_path!(), Duration::from_secs(1));

/// Why a queue's ring cannot be served any more: the driver broke it, and only a reset or a
/// re-initialisation of the queue can repair it (virtio 1.2, 2.1.2).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingFault {
    #[error(
        "avail index {avail_idx} is {} entries ahead of the device's next avail index \
         {next_avail}, more than the ring's {size}",
        avail_idx.wrapping_sub(*next_avail)
    )]
    AvailIndexBeyondRing {
        avail_idx: u16,
        next_avail: u16,
        size: u16,
    },
    #[error("the available ring at {addr:#x} cannot be read: {reason}")]
    AvailRingUnreadable { addr: u64, reason: String },
    #[error("descriptor {head} cannot be returned in the used ring at {addr:#x}: {reason}")]
    UsedRingUnwritable {
        addr: u64,
        head: u16,
        reason: String,
    },
}

/// A queue the device stopped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueFault {
    /// The queue's index in the device (virtio numbering).
    pub queue: u16,
    pub fault: RingFault,
}

impl fmt::Display for QueueFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue {}: {}", self.queue, self.fault)
    }
}

/// What a transport does when a device stopped one of its queues (e.g. set
/// DEVICE_NEEDS_RESET); called on the queue's worker thread, once per fault.
pub type FaultHandler = Arc<dyn Fn(&QueueFault) + Send + Sync>;

/// Takes chains from a device's rings and returns them, for all its queues.
///
/// A ring the driver broke (an avail index more than the ring's size ahead, rings that cannot
/// be read or written) stops its queue: the queue is marked not ready, so every worker loop
/// leaves it, the fault is logged once, and the transport's [`FaultHandler`] is told. The
/// queue stays stopped until the transport readies it again (a device reset, or a vhost-user
/// frontend starting the ring anew). Read as an empty ring instead, such an index would make
/// the re-check after re-enabling notifications report buffers forever: a worker spinning
/// at full CPU and holding its device's locks.
///
/// A head beyond the descriptor table is skipped (it names no buffer that could be returned)
/// with a rate-limited warning, and the rest of the batch is served.
///
/// Once a transport installed [`QueueCounters`] ([`Rings::count_chains`]), every chain taken
/// and returned and every fault is counted on its queue's counters.
///
/// While the transport says the rings' connection is closing ([`Rings::set_closing`]), taking
/// a chain stops the queue instead, so that every worker loop ends its batch: a driver can lay
/// its rings out so that each completion publishes the next request, and such a queue never
/// runs dry on its own.
#[derive(Default)]
pub struct Rings {
    fault_handler: RwLock<Option<FaultHandler>>,
    closing: AtomicBool,
    /// Indexed by queue; a queue beyond the slice is not counted.
    counters: OnceLock<Arc<[QueueCounters]>>,
}

impl Rings {
    pub fn set_fault_handler(&self, handler: FaultHandler) {
        *self
            .fault_handler
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(handler);
    }

    /// Counts chains and faults of queue `n` on `counters[n]` from now on. Once only: the
    /// workers read the counters without a lock, so they cannot be replaced.
    pub fn count_chains(&self, counters: Arc<[QueueCounters]>) -> io::Result<()> {
        self.counters.set(counters).map_err(|_| {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the device's chains are counted already",
            )
        })
    }

    /// Whether taking a chain stops its queue instead: set by the transport once the frontend
    /// that owns the rings is gone, before it waits for the queue workers, and cleared after.
    pub fn set_closing(&self, closing: bool) {
        // Relaxed: the flag orders nothing else; a worker sees it within its next few chains,
        // and the transport clears it only after joining every worker.
        self.closing.store(closing, Ordering::Relaxed);
    }

    fn counters(&self, queue: u16) -> Option<&QueueCounters> {
        self.counters.get()?.get(usize::from(queue))
    }

    /// The next chain the driver made available on `queue`, or `None` when there is none (or
    /// the queue is stopped, or was stopped just now because its ring is broken).
    pub fn pop<'m>(
        &self,
        vring: &VringRwLock,
        queue: u16,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        if self.closing.load(Ordering::Relaxed) {
            vring.set_queue_ready(false);
            return None;
        }
        // A statement of its own, so the ring's lock is released before a fault is handled.
        let popped = take_chain(vring.get_mut().get_queue_mut(), queue, mem);
        let chain = popped.unwrap_or_else(|fault| {
            self.stop(vring, QueueFault { queue, fault });
            None
        })?;
        if let Some(counters) = self.counters(queue) {
            // A second walk of the descriptors, paid only where they are counted; one the
            // device will find broken counts what could be read of it.
            let readable = chain.clone().readable().map(|desc| u64::from(desc.len()));
            counters.chain_taken(readable.sum());
        }
        Some(chain)
    }

    /// Puts `head` in the used ring of `queue` with `len` bytes written; false when the used
    /// ring cannot be written, which stops the queue.
    pub fn add_used(&self, vring: &VringRwLock, queue: u16, head: u16, len: u32) -> bool {
        let Err(error) = vring.add_used(head, len) else {
            if let Some(counters) = self.counters(queue) {
                counters.chain_used(len);
            }
            return true;
        };
        let addr = vring.get_ref().get_queue().used_ring();
        let fault = RingFault::UsedRingUnwritable {
            addr,
            head,
            reason: error.to_string(),
        };
        self.stop(vring, QueueFault { queue, fault });
        false
    }

    fn stop(&self, vring: &VringRwLock, fault: QueueFault) {
        vring.set_queue_ready(false);
        if let Some(counters) = self.counters(fault.queue) {
            counters.faults.increment();
        }
        error!("{fault}; queue stopped until the driver resets or re-initialises it");
        let handler = self
            .fault_handler
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some(handler) = handler {
            handler(&fault);
        }
    }
}

/// The next chain of a ready `queue` whose head is inside the descriptor table.
fn take_chain<'m>(
    queue: &mut Queue,
    index: u16,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, RingFault> {
    if !queue.ready() {
        return Ok(None);
    }
    let size = queue.size();
    let unreadable = |queue: &Queue, reason: &dyn fmt::Display| RingFault::AvailRingUnreadable {
        addr: queue.avail_ring(),
        reason: reason.to_string(),
    };
    loop {
        let next_avail = queue.next_avail();
        // Acquire: the ring entries and descriptors the driver wrote before the index are
        // read after it (virtio-queue's iterator loads it the same way).
        let avail_idx = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|error| unreadable(queue, &error))?
            .0;
        let pending = avail_idx.wrapping_sub(next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > size {
            return Err(RingFault::AvailIndexBeyondRing {
                avail_idx,
                next_avail,
                size,
            });
        }
        // The iterator loads the index again: a driver that moved it since is judged by the
        // new value, so the bound above always holds for what is taken.
        let chain = match queue.iter(mem) {
            Ok(mut available) => available.next(),
            Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                return Err(RingFault::AvailIndexBeyondRing {
                    avail_idx: queue
                        .avail_idx(mem, Ordering::Relaxed)
                        .map_or(avail_idx, |idx| idx.0),
                    next_avail,
                    size,
                });
            }
            Err(error) => return Err(unreadable(queue, &error)),
        };
        let Some(chain) = chain else {
            // Nothing taken although entries were published: the entry at `next_avail` cannot
            // be read (unless the driver took its entries back meanwhile).
            let still_published = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_or(true, |idx| idx.0 != next_avail);
            if still_published {
                return Err(unreadable(queue, &format_args!("entry {next_avail}")));
            }
            return Ok(None);
        };
        let head = chain.head_index();
        if head < size {
            return Ok(Some(chain));
        }
        BAD_HEADS.warn(format_args!(
            "queue {index}: avail entry {next_avail} names descriptor {head}, beyond the \
             {size}-entry table; skipped"
        ));
    }
}

/// Where a batch of work on a queue stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    /// No buffer is left in the available ring.
    Drained,
    /// Buffers are left, but the device cannot take them now (no input, a full output, a rate
    /// limit); it resumes on an event of its own, not on a kick.
    Blocked,
}

/// Runs `serve_batch` until the queue is drained or blocked, signalling the driver after each
/// batch that completed buffers (when EVENT_IDX says it wants to hear).
///
/// With EVENT_IDX, notifications are suppressed while serving, then re-enabled and re-checked,
/// so a buffer the driver added meanwhile (without kicking) is not left behind. A blocked queue
/// returns at once: re-checking it would spin on buffers it cannot take. So does a queue that
/// was stopped meanwhile (device reset, GET_VRING_BASE, a broken ring [`Rings`] found): its
/// buffers may never be taken, and the re-check would report them forever.
pub fn serve_queue(
    vring: &VringRwLock,
    event_idx: bool,
    mut serve_batch: impl FnMut() -> io::Result<(usize, QueueState)>,
) -> io::Result<()> {
    loop {
        if !queue_is_live(vring) {
            return Ok(());
        }
        if event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        let (completed, state) = serve_batch()?;
        if completed > 0 && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        if !event_idx {
            return Ok(());
        }
        let more = vring.enable_notification().map_err(io::Error::other)?;
        if !more || state == QueueState::Blocked {
            return Ok(());
        }
    }
}

/// Whether the driver set the queue up and the transport enabled it: only then may its ring be
/// read (a stopped queue's addresses may be stale).
pub fn queue_is_live(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Whether the driver has made buffers available that the device has not taken yet.
pub fn has_available_buffers(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|avail| avail.0 != queue.next_avail())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FaultRecorder, TestMemory, TestQueue, returns_within, writable};

    const MEMORY_SIZE: usize = 0x10_0000;

    fn rings_reporting_to(recorder: &FaultRecorder) -> Rings {
        let rings = Rings::default();
        rings.set_fault_handler(recorder.handler());
        rings
    }

    #[test]
    fn heads_beyond_the_table_are_skipped_and_the_batch_goes_on() {
        let memory = TestMemory::new(MEMORY_SIZE);
        let mut queue = TestQueue::new(&memory, 0, 16, false);
        queue.add_heads(&[16, u16::MAX]);
        let head = queue.add_chain(&[writable(0x8000, 16)]);
        let recorder = FaultRecorder::default();
        let rings = rings_reporting_to(&recorder);
        let chain = rings
            .pop(&queue.vring, 0, memory.mem)
            .expect("the valid chain");
        assert_eq!(chain.head_index(), head);
        assert!(rings.pop(&queue.vring, 0, memory.mem).is_none());
        assert!(recorder.faults().is_empty(), "a bad head is no ring fault");
        assert!(queue_is_live(&queue.vring));
    }

    #[test]
    fn closing_rings_stop_the_queue_at_its_next_chain() {
        let memory = TestMemory::new(MEMORY_SIZE);
        let mut queue = TestQueue::new(&memory, 0, 16, false);
        queue.add_chain(&[writable(0x8000, 16)]);
        queue.add_chain(&[writable(0x9000, 16)]);
        let recorder = FaultRecorder::default();
        let rings = rings_reporting_to(&recorder);
        assert!(rings.pop(&queue.vring, 0, memory.mem).is_some());
        rings.set_closing(true);
        assert!(rings.pop(&queue.vring, 0, memory.mem).is_none());
        assert!(!queue_is_live(&queue.vring), "the queue is not stopped");
        assert!(recorder.faults().is_empty(), "closing is no ring fault");
        rings.set_closing(false);
        queue.vring.set_queue_ready(true);
        assert!(rings.pop(&queue.vring, 0, memory.mem).is_some());
    }

    /// A driver that moves the avail index more than a ring ahead: read as an empty ring, the
    /// re-check after re-enabling notifications would see buffers forever.
    #[test]
    fn an_avail_index_beyond_the_ring_stops_the_queue_once() {
        let memory = TestMemory::new(MEMORY_SIZE);
        let mut queue = TestQueue::new(&memory, 0, 16, true);
        queue.add_chain(&[writable(0x8000, 16)]);
        queue.set_avail_idx(16 + 8);
        let recorder = FaultRecorder::default();
        let rings = Arc::new(rings_reporting_to(&recorder));
        let vring = queue.vring.clone();
        let mem = memory.mem;
        let serve = move || {
            serve_queue(&vring, true, || {
                let mut served = 0;
                while let Some(chain) = rings.pop(&vring, 3, mem) {
                    rings.add_used(&vring, 3, chain.head_index(), 0);
                    served += 1;
                }
                Ok((served, QueueState::Drained))
            })
        };
        let again = serve.clone();
        returns_within("serving a broken ring", Duration::from_secs(5), serve).unwrap();
        let expected = QueueFault {
            queue: 3,
            fault: RingFault::AvailIndexBeyondRing {
                avail_idx: 24,
                next_avail: 0,
                size: 16,
            },
        };
        assert_eq!(recorder.faults(), vec![expected]);
        assert!(!queue_is_live(&queue.vring), "the queue is stopped");
        assert_eq!(
            queue.used_idx(),
            0,
            "nothing was taken from the broken ring"
        );
        // Kicks on the stopped queue report nothing more.
        again().unwrap();
        assert_eq!(recorder.faults().len(), 1);
    }

    #[test]
    fn rings_outside_guest_memory_stop_the_queue() {
        let memory = TestMemory::new(MEMORY_SIZE);
        let mut queue = TestQueue::new(&memory, 0, 16, false);
        let head = queue.add_chain(&[writable(0x8000, 16)]);
        let (desc_table, avail_ring) = {
            let state = queue.vring.get_ref();
            (
                state.get_queue().desc_table(),
                state.get_queue().avail_ring(),
            )
        };
        let outside = MEMORY_SIZE as u64 + 0x1000;
        queue
            .vring
            .set_queue_info(desc_table, avail_ring, outside)
            .unwrap();
        let recorder = FaultRecorder::default();
        let rings = rings_reporting_to(&recorder);
        let chain = rings.pop(&queue.vring, 1, memory.mem).unwrap();
        assert!(!rings.add_used(&queue.vring, 1, chain.head_index(), 0));
        assert!(matches!(
            &recorder.faults()[..],
            [QueueFault { queue: 1, fault: RingFault::UsedRingUnwritable { addr, head: h, .. } }]
                if *addr == outside && *h == head
        ));
        assert!(!queue_is_live(&queue.vring));

        queue
            .vring
            .set_queue_info(desc_table, outside, avail_ring)
            .unwrap();
        queue.vring.set_queue_ready(true);
        assert!(rings.pop(&queue.vring, 1, memory.mem).is_none());
        assert!(matches!(
            &recorder.faults()[1..],
            [QueueFault { queue: 1, fault: RingFault::AvailRingUnreadable { addr, .. } }]
                if *addr == outside
        ));
        assert!(!queue_is_live(&queue.vring));
    }

    #[test]
    fn counted_rings_count_chains_bytes_and_faults_on_their_queue() {
        use crate::testing::readable;
        let memory = TestMemory::new(MEMORY_SIZE);
        let mut queue = TestQueue::new(&memory, 0, 16, false);
        let rings = Rings::default();
        let counters: Arc<[QueueCounters]> = (0..2).map(|_| QueueCounters::default()).collect();
        rings.count_chains(counters.clone()).unwrap();
        assert!(
            rings.count_chains(counters.clone()).is_err(),
            "counters cannot be replaced under the workers"
        );
        let first = queue.add_chain(&[readable(0x8000, 16), readable(0x9000, 4096)]);
        let second = queue.add_indirect_chain(
            0xa000,
            &[
                readable(0xb000, 100),
                writable(0xc000, 512),
                writable(0xd000, 1),
            ],
        );
        for (head, used_len) in [(first, 0), (second, 513)] {
            let chain = rings.pop(&queue.vring, 1, memory.mem).unwrap();
            assert_eq!(chain.head_index(), head);
            assert!(rings.add_used(&queue.vring, 1, head, used_len));
        }
        let counted = &counters[1];
        assert_eq!(counted.taken.get(), 2);
        assert_eq!(counted.used.get(), 2);
        assert_eq!(counted.bytes_to_device.get(), 16 + 4096 + 100);
        assert_eq!(counted.bytes_to_driver.get(), 513);
        assert_eq!(counted.faults.get(), 0);
        assert_eq!(counters[0].taken.get(), 0, "only queue 1 served");

        // A queue beyond the counters is served, not counted.
        queue.add_chain(&[readable(0x8000, 16)]);
        assert!(rings.pop(&queue.vring, 7, memory.mem).is_some());
        assert_eq!(counted.taken.get(), 2);

        queue.set_avail_idx(queue.used_idx().wrapping_add(40));
        assert!(rings.pop(&queue.vring, 1, memory.mem).is_none());
        assert_eq!(counted.faults.get(), 1);
        assert_eq!(counted.taken.get(), 2);
    }

    /// The re-check after notifications are re-enabled: a buffer the driver publishes while the
    /// device is still serving (so it sends no kick: notifications are off) must be served by
    /// another pass, not left until some later kick.
    #[test]
    fn a_buffer_published_during_a_batch_gets_another_pass() {
        let memory = TestMemory::new(0x10_0000);
        let mut queue = TestQueue::new(&memory, 0, 16, true);
        queue.add_chain(&[writable(0x8000, 16)]);
        let mut passes = 0;
        let mut published_late = false;
        serve_queue(&queue.vring.clone(), true, || {
            passes += 1;
            let mut served = 0;
            loop {
                // A statement of its own, so the ring's lock is released before `add_used`.
                let chain = queue
                    .vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(memory.mem);
                let Some(chain) = chain else { break };
                queue.vring.add_used(chain.head_index(), 0).unwrap();
                served += 1;
            }
            if !published_late {
                // The driver adds a buffer after the device's last look at the ring.
                queue.add_chain(&[writable(0x9000, 16)]);
                published_late = true;
            }
            Ok((served, QueueState::Drained))
        })
        .unwrap();
        assert_eq!(passes, 2, "the late buffer needs exactly one more pass");
        assert_eq!(queue.used_idx(), 2, "both buffers were served");
    }

    #[test]
    fn a_stopped_queue_is_left_at_once() {
        let memory = TestMemory::new(0x10_0000);
        let mut queue = TestQueue::new(&memory, 0, 16, true);
        queue.add_chain(&[writable(0x8000, 16)]);
        queue.vring.set_queue_ready(false);
        let mut passes = 0;
        serve_queue(&queue.vring.clone(), true, || {
            passes += 1;
            Ok((0, QueueState::Drained))
        })
        .unwrap();
        assert_eq!(
            passes, 0,
            "a stopped queue must not be served or re-checked"
        );
    }
}
