//! The io_uring engine of one queue.
//!
//! Every read, write, flush and zeroing started in one pass over the available ring is queued
//! as an SQE and the whole batch goes to the kernel in one `io_uring_enter`; the operations
//! then run concurrently (O_DIRECT reads and writes asynchronously in the block layer, zeroing
//! on io_uring's worker threads). Through the page cache, small reads whose data is cached and
//! all writes are executed on the queue's thread instead, which is cheaper than a trip through
//! the ring; reads that would wait for the disk still take it. Data moves straight between
//! guest memory and the file: the SQEs carry the guest buffers' iovecs.
//!
//! A slot per possible in-flight operation (one per queue entry) keeps each operation's iovecs
//! alive and stable until its completion; slots and their iovec lists are reused, so the data
//! path does not allocate once the lists have grown to the largest request seen.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use log::{debug, warn};

use crate::engine::{Completion, Engine, Outcome};
use crate::storage::{EngineOptions, FileDisk, IoBuffers, is_unsupported};

/// Linux refuses longer iovec lists in one READV/WRITEV; such transfers run on the queue's
/// thread.
const IOV_MAX: usize = 1024;

/// Marks the completions of the poll on the queue's kick descriptor (the low bits count the
/// polls armed, so that a cancelled one is told from its successor) and of its cancellation;
/// slot indexes stay far below.
const KICK_POLL: u64 = 1 << 62;
const KICK_CANCEL: u64 = 1 << 61;

/// From this size on, a page-cache read may be handed to io_uring's worker threads instead of
/// being copied on the queue thread, so that the copies of a batch of large reads run on every
/// core. Worth it only with cores to spare: with as many queue threads as cores the hop costs
/// more than it gains (1 MiB reads on 2 cores: 1 queue 23,866 -> 30,682 MiB/s with the
/// hand-off, 2 queues 39,457 -> 31,759 MiB/s). Buffered writes gain nothing from it: they
/// serialise on the inode lock.
const OFFLOAD_BYTES: usize = 128 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Read,
    Write,
    Flush,
    WriteZeroes { may_unmap: bool },
}

impl Operation {
    /// Whether a later flush must wait for it.
    fn changes_data(self) -> bool {
        matches!(self, Operation::Write | Operation::WriteZeroes { .. })
    }
}

/// One operation the kernel is working on.
struct Slot {
    /// Taken by an operation that has not completed yet.
    busy: bool,
    /// Order in which the operations were started, for flushes to wait for earlier writes.
    seq: u64,
    /// The caller's tag, returned with the completion.
    tag: u64,
    operation: Operation,
    offset: u64,
    /// Bytes to transfer or zero.
    len: u64,
    /// The guest buffers; the kernel may read this list until the operation completes.
    iovecs: Vec<libc::iovec>,
}

pub struct UringEngine {
    ring: IoUring,
    disk: Arc<FileDisk>,
    /// The file goes through the page cache. Buffered writes are then executed on the queue's
    /// thread: file systems without asynchronous buffered writes (ext4) hand each one to an
    /// io_uring worker thread, a hop that costs more than the copy, and parallel writers
    /// serialise on the inode lock anyway. O_DIRECT transfers are asynchronous in the block
    /// layer and take the ring.
    buffered: bool,
    /// The kernel and file system take `RWF_NOWAIT` reads (false once one was refused).
    nowait_reads: bool,
    /// Whether zeroings that may unmap (index 1) and that may not (index 0) take the ring:
    /// false once the kernel or file system refused that kind there, which the synchronous
    /// path then works around.
    ring_zeroing: [bool; 2],
    /// Page-cache reads from this size on go to io_uring's worker threads (see
    /// `OFFLOAD_BYTES`); `usize::MAX` when there are no cores to spare.
    offload_bytes: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    next_seq: u64,
    /// Operations that have ended, in the order their completions were collected.
    completed: VecDeque<Completion>,
    /// Flushes (slot, first later sequence number) waiting for the writes started before them.
    /// Ordering is done here rather than with IOSQE_IO_DRAIN, which would also wait for the
    /// kick poll (and so for the driver's next kick) and hold back every later operation.
    deferred_flushes: VecDeque<(usize, u64)>,
    /// The kick descriptor with a multishot poll armed on it (and that poll's tag), so that
    /// every kick ends a wait for completions. The kick stays unconsumed: the transport reads
    /// it (blocking, possibly from an event it collected already), so reading it here could
    /// leave the transport blocked. A multishot poll fires on each write to the eventfd rather
    /// than while it stays readable, so it can stay armed without draining it.
    kick_armed: Option<(RawFd, u64)>,
    kick_polls: u64,
    /// The kernel ended the multishot poll in this round (kernels before 5.13 only offer
    /// single-shot polls; a full completion queue also ends one). It is not re-armed before
    /// the next round: on the unconsumed kick it would fire at once forever.
    kick_poll_ended: bool,
}

// SAFETY: the raw pointers in the slots' iovec lists are only dereferenced by the kernel while an
// operation is in flight, and the worker that owns the engine does not let the guest-memory
// borrow go before every operation has completed (see `BlkBackend::process_queue`).
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// A ring on `disk` for a queue of `options.queue_size` requests; `buffered` when the
    /// file goes through the page cache.
    pub(crate) fn new(
        disk: Arc<FileDisk>,
        buffered: bool,
        options: &EngineOptions,
    ) -> io::Result<Self> {
        let depth = options.queue_size;
        // Room for every operation plus the kick poll and its cancellation.
        let entries = u32::from(depth) + 2;
        // Cooperative task running saves an inter-processor interrupt per completion; kernels
        // before 5.19 refuse the flag, and a plain ring works the same, a little slower.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let empty_slot = || Slot {
            busy: false,
            seq: 0,
            tag: 0,
            operation: Operation::Flush,
            offset: 0,
            len: 0,
            iovecs: Vec::new(),
        };
        Ok(UringEngine {
            ring,
            disk,
            buffered,
            nowait_reads: buffered,
            ring_zeroing: [true; 2],
            offload_bytes: if options.spare_cores {
                OFFLOAD_BYTES
            } else {
                usize::MAX
            },
            slots: (0..depth).map(|_| empty_slot()).collect(),
            free: (0..usize::from(depth)).rev().collect(),
            next_seq: 0,
            completed: VecDeque::with_capacity(usize::from(depth)),
            deferred_flushes: VecDeque::with_capacity(usize::from(depth)),
            kick_armed: None,
            kick_polls: 0,
            kick_poll_ended: false,
        })
    }

    /// Takes a free slot for a new operation.
    fn take_slot(
        &mut self,
        tag: u64,
        operation: Operation,
        offset: u64,
        len: u64,
    ) -> Option<usize> {
        let index = self.free.pop()?;
        let slot = &mut self.slots[index];
        slot.busy = true;
        slot.seq = self.next_seq;
        slot.tag = tag;
        slot.operation = operation;
        slot.offset = offset;
        slot.len = len;
        self.next_seq += 1;
        Some(index)
    }

    fn release_slot(&mut self, index: usize) {
        self.slots[index].busy = false;
        self.free.push(index);
    }

    /// Whether a write or zeroing started before sequence number `barrier` is still in flight.
    fn changes_before(&self, barrier: u64) -> bool {
        self.slots
            .iter()
            .any(|slot| slot.busy && slot.operation.changes_data() && slot.seq < barrier)
    }

    fn fsync_entry(&self) -> squeue::Entry {
        opcode::Fsync::new(types::Fd(self.disk.fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    }

    /// Queues `entry` for `slot`, or, when the kernel refuses it, executes the operation on
    /// this thread after all.
    fn push_or_execute(&mut self, slot: usize, entry: squeue::Entry) -> Outcome {
        match self.push_entry(entry.user_data(slot as u64)) {
            Ok(()) => Outcome::Submitted,
            Err(error) => {
                warn!("io_uring submission failed ({error}); executing on the queue's thread");
                let result = self.execute(slot);
                self.release_slot(slot);
                Outcome::Executed(result)
            }
        }
    }

    /// Runs the operation of `slot` on this thread.
    fn execute(&mut self, slot: usize) -> io::Result<()> {
        let slot = &mut self.slots[slot];
        match slot.operation {
            Operation::Flush => self.disk.flush(),
            Operation::WriteZeroes { may_unmap } => {
                self.disk.write_zeroes(slot.offset, slot.len, may_unmap)
            }
            Operation::Read | Operation::Write => {
                // SAFETY: the list was built by `IoBuffers::push` for this operation, whose
                // guest memory the worker keeps mapped until every operation has completed.
                let mut bufs = unsafe { IoBuffers::from_started(&mut slot.iovecs) };
                if slot.operation == Operation::Read {
                    self.disk.read_at(&mut bufs, slot.offset)
                } else {
                    self.disk.write_at(&mut bufs, slot.offset)
                }
            }
        }
    }

    /// Starts the deferred flushes whose earlier writes have all completed; a flush the ring
    /// cannot take is executed here.
    fn start_ready_flushes(&mut self) {
        while let Some(&(slot, barrier)) = self.deferred_flushes.front() {
            if self.changes_before(barrier) {
                return;
            }
            self.deferred_flushes.pop_front();
            let tag = self.slots[slot].tag;
            let entry = self.fsync_entry();
            if let Outcome::Executed(result) = self.push_or_execute(slot, entry) {
                self.completed.push_back(Completion { tag, result });
            }
        }
    }

    fn push_entry(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the buffers the entry names (the slot's iovec list and the guest memory it
            // points to) stay valid and untouched until the operation completes: the slot is
            // not reused before then, and the worker holds the guest-memory borrow until
            // `in_flight` is back to zero.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // The submission ring is full: hand the batch so far to the kernel.
            self.ring.submit()?;
        }
    }

    /// Starts a read or write of `bufs` through the ring, or executes it here when no slot is
    /// free or the list is too long for one SQE.
    fn start_transfer(
        &mut self,
        operation: Operation,
        offset: u64,
        mut bufs: IoBuffers<'_>,
        tag: u64,
    ) -> Outcome {
        let slot_index = if bufs.iovecs().len() <= IOV_MAX {
            self.take_slot(tag, operation, offset, bufs.len() as u64)
        } else {
            None
        };
        let Some(slot_index) = slot_index else {
            return Outcome::Executed(match operation {
                Operation::Read => self.disk.read_at(&mut bufs, offset),
                _ => self.disk.write_at(&mut bufs, offset),
            });
        };
        let fd = types::Fd(self.disk.fd());
        let slot = &mut self.slots[slot_index];
        bufs.swap_out(&mut slot.iovecs);
        let (iovecs, count) = (slot.iovecs.as_ptr(), slot.iovecs.len() as u32);
        let entry = match operation {
            Operation::Read => opcode::Readv::new(fd, iovecs, count).offset(offset).build(),
            _ => opcode::Writev::new(fd, iovecs, count)
                .offset(offset)
                .build(),
        };
        let offload =
            self.buffered && operation == Operation::Read && slot.len >= self.offload_bytes as u64;
        let entry = if offload {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        self.push_or_execute(slot_index, entry)
    }

    /// Reads `bufs` on this thread if the page cache holds every byte: a page-cache hit costs
    /// less here than through the ring (4 KiB reads at QD1: 65,000 IOPS through io_uring,
    /// 96,000 on the queue's thread). False when the read would wait for the disk, leaving it
    /// to the ring.
    fn read_cached(&mut self, bufs: &IoBuffers<'_>, offset: u64) -> bool {
        let Ok(file_offset) = libc::off_t::try_from(offset) else {
            return false;
        };
        let iovecs = bufs.iovecs();
        if !self.nowait_reads || iovecs.len() > IOV_MAX {
            return false;
        }
        // SAFETY: the list holds at most IOV_MAX entries, each built by `IoBuffers::push` from
        // a live guest-memory slice that `bufs` keeps borrowed.
        let done = unsafe {
            libc::preadv2(
                self.disk.fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
                file_offset,
                libc::RWF_NOWAIT,
            )
        };
        if done < 0 {
            let error = io::Error::last_os_error();
            if !matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                debug!("RWF_NOWAIT reads refused ({error}); page-cache reads take the ring");
                self.nowait_reads = false;
            }
            return false;
        }
        // A short read (part of the data cached) is redone whole by the ring.
        done as usize == bufs.len()
    }

    /// Polls `fd` through the ring. One poll stays armed across waits.
    fn arm_kick_poll(&mut self, fd: RawFd) -> io::Result<()> {
        if self.kick_armed.is_some_and(|(armed_fd, _)| armed_fd == fd) {
            return Ok(());
        }
        self.queue_kick_cancel()?;
        self.kick_polls += 1;
        let tag = KICK_POLL | (self.kick_polls & (KICK_CANCEL - 1));
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(tag);
        self.push_entry(poll)?;
        self.kick_armed = Some((fd, tag));
        Ok(())
    }

    fn queue_kick_cancel(&mut self) -> io::Result<()> {
        if let Some((_, tag)) = self.kick_armed.take() {
            let cancel = opcode::AsyncCancel::new(tag).build().user_data(KICK_CANCEL);
            self.push_entry(cancel)?;
        }
        Ok(())
    }

    /// Collects every completion the kernel has posted. A kick needs nothing more: the caller
    /// looks at the available ring after every wait.
    fn reap(&mut self) {
        loop {
            // One completion at a time: finishing one may need the engine whole.
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let tag = cqe.user_data();
            if tag & KICK_CANCEL != 0 {
                continue;
            }
            if tag & KICK_POLL != 0 {
                let ended = !io_uring::cqueue::more(cqe.flags());
                if ended
                    && self
                        .kick_armed
                        .is_some_and(|(_, armed_tag)| armed_tag == tag)
                {
                    self.kick_armed = None;
                    self.kick_poll_ended = true;
                }
                continue;
            }
            let slot_index = tag as usize;
            if !self.slots.get(slot_index).is_some_and(|slot| slot.busy) {
                warn!("io_uring completion for idle slot {slot_index}; ignored");
                continue;
            }
            let result = self.finish(slot_index, cqe.result());
            self.completed.push_back(Completion {
                tag: self.slots[slot_index].tag,
                result,
            });
            self.release_slot(slot_index);
        }
        self.start_ready_flushes();
    }

    /// The result of the operation of `slot`, which the kernel ended with `result`. Transfers
    /// the kernel left short or refused are redone on this thread, which also takes O_DIRECT's
    /// bounce-buffer fallback for unaligned guest buffers; a zeroing the ring cannot do is
    /// done here, with the fallbacks of the synchronous path.
    fn finish(&mut self, slot: usize, result: i32) -> io::Result<()> {
        let (operation, len) = (self.slots[slot].operation, self.slots[slot].len);
        match operation {
            Operation::Flush if result < 0 => Err(io::Error::from_raw_os_error(-result)),
            Operation::Flush => Ok(()),
            Operation::Read | Operation::Write => {
                if u64::try_from(result).is_ok_and(|done| done == len) {
                    Ok(())
                } else {
                    self.execute(slot)
                }
            }
            Operation::WriteZeroes { .. } if result >= 0 => Ok(()),
            Operation::WriteZeroes { may_unmap } => {
                let error = io::Error::from_raw_os_error(-result);
                if is_unsupported(&error) {
                    debug!(
                        "zeroing (may unmap: {may_unmap}) refused through io_uring ({error}); \
                         such zeroings run on the queue's thread"
                    );
                    self.ring_zeroing[usize::from(may_unmap)] = false;
                    self.execute(slot)
                } else {
                    Err(error)
                }
            }
        }
    }
}

fn retry_interrupted(mut call: impl FnMut() -> io::Result<usize>) -> io::Result<()> {
    loop {
        match call() {
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
}

impl Engine for UringEngine {
    fn read(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome {
        if bufs.len() < self.offload_bytes && self.read_cached(&bufs, offset) {
            return Outcome::Executed(Ok(()));
        }
        self.start_transfer(Operation::Read, offset, bufs, tag)
    }

    fn write(&mut self, offset: u64, mut bufs: IoBuffers<'_>, tag: u64) -> Outcome {
        // A write executed here is complete before any later flush is queued, so flush
        // ordering holds.
        if self.buffered {
            return Outcome::Executed(self.disk.write_at(&mut bufs, offset));
        }
        self.start_transfer(Operation::Write, offset, bufs, tag)
    }

    fn flush(&mut self, tag: u64) -> Outcome {
        let barrier = self.next_seq;
        let Some(slot) = self.take_slot(tag, Operation::Flush, 0, 0) else {
            return Outcome::Executed(self.disk.flush());
        };
        // The fdatasync must cover the writes the driver issued before the flush: it starts
        // once they have completed (writes executed on this thread have, already).
        if self.changes_before(barrier) {
            self.deferred_flushes.push_back((slot, barrier));
            return Outcome::Submitted;
        }
        let entry = self.fsync_entry();
        self.push_or_execute(slot, entry)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool, tag: u64) -> Outcome {
        let operation = Operation::WriteZeroes { may_unmap };
        let mode = self.disk.zeroing_mode(may_unmap);
        let slot = match mode {
            Some(_) if self.ring_zeroing[usize::from(may_unmap)] => {
                self.take_slot(tag, operation, offset, len)
            }
            _ => None,
        };
        let (Some(mode), Some(slot)) = (mode, slot) else {
            return Outcome::Executed(self.disk.write_zeroes(offset, len, may_unmap));
        };
        let entry = opcode::Fallocate::new(types::Fd(self.disk.fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.push_or_execute(slot, entry)
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.completed.len()
    }

    /// Hands the queued operations to the kernel; page-cache hits complete during the call.
    fn submit(&mut self) -> io::Result<()> {
        retry_interrupted(|| self.ring.submit())
    }

    fn next_completed(&mut self) -> Option<Completion> {
        if self.completed.is_empty() {
            self.reap();
        }
        self.completed.pop_front()
    }

    fn has_completions(&mut self) -> bool {
        !self.completed.is_empty() || !self.ring.completion().is_empty()
    }

    fn wait(&mut self, kick: Option<RawFd>) -> io::Result<()> {
        if let (Some(fd), false) = (kick, self.kick_poll_ended) {
            self.arm_kick_poll(fd)?;
        }
        retry_interrupted(|| self.ring.submit_and_wait(1))
    }

    /// Nothing is in flight between rounds, but the kick poll stays armed: the completions it
    /// posted for kicks that came meanwhile are dropped here, so that they cannot pile up in
    /// the completion queue (older kernels refuse submissions while it overflows).
    fn begin_round(&mut self) {
        self.reap();
        self.kick_poll_ended = false;
    }

    /// Cancels the kick poll: the poll holds the kick eventfd, which the transport is about to
    /// replace (often by a new one with the same number).
    fn stop(&mut self) -> io::Result<()> {
        if self.kick_armed.is_some() {
            self.queue_kick_cancel()?;
            self.submit()?;
        }
        Ok(())
    }

    /// Reads go through `RWF_NOWAIT` first and writes are buffered: only what the page cache
    /// holds is executed in the call. Flushes and zeroings are submitted (except in the
    /// fallbacks for kernels and file systems that refuse them on the ring).
    fn calls_stay_off_the_disk(&self) -> bool {
        self.buffered && self.nowait_reads
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::VolatileSlice;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::config::IoEngine;
    use crate::storage::FileStorage;

    const PAGE: usize = 4096;

    fn engine(storage: &FileStorage, buffered: bool) -> UringEngine {
        let options = EngineOptions {
            kind: IoEngine::IoUring,
            queue_size: 4,
            spare_cores: true,
        };
        UringEngine::new(storage.disk.clone(), buffered, &options).unwrap()
    }

    /// Waits for every operation in flight and returns their completions.
    fn drain(engine: &mut UringEngine) -> Vec<Completion> {
        let mut completions = Vec::new();
        engine.submit().unwrap();
        while engine.in_flight() > 0 {
            if !engine.has_completions() {
                engine.wait(None).unwrap();
            }
            completions.extend(std::iter::from_fn(|| engine.next_completed()));
        }
        completions
    }

    /// Whether the first page of `file` is in the page cache.
    fn first_page_cached(file: &std::fs::File) -> bool {
        // SAFETY: a fresh read-only shared mapping of one page of a file at least that long;
        // mincore only inspects it, and it is unmapped before returning.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            let mut resident = 0u8;
            assert_eq!(libc::mincore(map, PAGE, &raw mut resident), 0);
            libc::munmap(map, PAGE);
            resident & 1 != 0
        }
    }

    /// Through the page cache, a read of cached data is answered at once on the worker thread,
    /// and a read of data the cache does not hold goes through the ring.
    #[test]
    fn cached_reads_complete_inline_and_misses_take_the_ring() {
        use std::os::unix::fs::FileExt;
        let image = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        let pattern: Vec<u8> = (0..4 * PAGE).map(|i| (i % 251) as u8).collect();
        image.as_file().write_all_at(&pattern, 0).unwrap();
        image.as_file().sync_all().unwrap();
        let storage = FileStorage::open(image.path(), false, false).unwrap();
        let mut engine = engine(&storage, true);
        let mut guest = vec![0u8; PAGE];
        let mut iovecs = Vec::new();

        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut guest[..]));
        assert!(first_page_cached(image.as_file()), "just written");
        assert!(
            matches!(engine.read(0, bufs, 7), Outcome::Executed(Ok(()))),
            "a cache hit is answered at once"
        );
        assert_eq!(guest, pattern[..PAGE]);

        // SAFETY: advice on a valid descriptor; it only drops clean cached pages.
        let advised = unsafe {
            libc::posix_fadvise(image.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        if advised != 0 || first_page_cached(image.as_file()) {
            eprintln!("the page cache keeps /var/tmp files (tmpfs?): miss case not tested");
            return;
        }
        guest.fill(0);
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut guest[..]));
        assert!(
            matches!(engine.read(0, bufs, 7), Outcome::Submitted),
            "a miss takes the ring"
        );
        let completions = drain(&mut engine);
        assert_eq!(completions.len(), 1);
        assert_eq!(completions[0].tag, 7);
        assert!(completions[0].result.is_ok());
        assert_eq!(guest, pattern[..PAGE]);
    }

    /// Every kick ends a wait, also after the first one, and no kick is consumed: the
    /// transport reads them later.
    #[test]
    fn every_kick_ends_a_wait_and_stays_for_the_transport() {
        const KICKS: u64 = 3;
        let mut engine = engine(&FileStorage::memory(1 << 20).unwrap(), true);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick_fd = kick.as_raw_fd();
        let (woke, wakes) = mpsc::channel();
        // Detached: with a kick missed it would sleep in io_uring_enter for good.
        std::thread::spawn(move || {
            for _ in 0..KICKS {
                engine.wait(Some(kick_fd)).unwrap();
                assert!(engine.next_completed().is_none(), "a kick is no operation");
                woke.send(()).unwrap();
            }
        });
        for number in 1..=KICKS {
            kick.write(1).unwrap();
            wakes
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("kick {number} did not end the wait"));
        }
        assert_eq!(kick.read().unwrap(), KICKS);
    }

    /// Discards and zeroings of a file run through the ring, a flush waits for them, and a
    /// zeroing the file system cannot do in place still leaves zeroes.
    #[test]
    fn zeroing_takes_the_ring_and_flushes_wait_for_it() {
        use std::os::unix::fs::FileExt;
        let storage = FileStorage::memory(16 * PAGE as u64).unwrap();
        storage.file().write_all_at(&[0x5a; 16 * PAGE], 0).unwrap();
        // Buffered writes run on the queue's thread; O_DIRECT ones take the ring.
        let mut engine = engine(&storage, false);
        let discard = engine.write_zeroes(PAGE as u64, PAGE as u64, true, 1);
        assert!(matches!(discard, Outcome::Submitted), "{discard:?}");
        let zeroing = engine.write_zeroes(4 * PAGE as u64, 1024, false, 2);
        assert!(matches!(zeroing, Outcome::Submitted), "{zeroing:?}");
        assert!(
            matches!(engine.flush(3), Outcome::Submitted),
            "the flush waits for the zeroings"
        );
        let completions = drain(&mut engine);
        let tags: Vec<u64> = completions.iter().map(|done| done.tag).collect();
        assert_eq!(tags.len(), 3, "{tags:?}");
        assert_eq!(tags[2], 3, "the flush completed before a zeroing: {tags:?}");
        for done in &completions {
            assert!(
                done.result.is_ok(),
                "operation {}: {:?}",
                done.tag,
                done.result
            );
        }
        let mut back = vec![0u8; 16 * PAGE];
        storage.file().read_exact_at(&mut back, 0).unwrap();
        assert!(back[..PAGE].iter().all(|&b| b == 0x5a));
        assert!(back[PAGE..2 * PAGE].iter().all(|&b| b == 0));
        assert!(back[2 * PAGE..4 * PAGE].iter().all(|&b| b == 0x5a));
        assert!(back[4 * PAGE..4 * PAGE + 1024].iter().all(|&b| b == 0));
        assert!(back[4 * PAGE + 1024..].iter().all(|&b| b == 0x5a));
    }
}
