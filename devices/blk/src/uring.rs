//! The io_uring data path of one queue worker.
//!
//! Every read, write and flush popped in one pass over the available ring is queued as an SQE
//! and the whole batch goes to the kernel in one `io_uring_enter`; the requests then run
//! concurrently (O_DIRECT reads and writes asynchronously in the block layer). Through the page
//! cache, small reads whose data is cached and all writes are served on the worker thread
//! instead, which is cheaper than a trip through the ring; reads that would wait for the disk
//! still take it. Data moves straight between guest memory and the file: the SQEs carry the
//! guest buffers' iovecs.
//!
//! A slot per possible in-flight request (one per queue entry) keeps each request's iovecs
//! alive and stable until its completion; slots and their iovec lists are reused, so the data
//! path does not allocate once the lists have grown to the largest request seen.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};
use log::{debug, warn};

use crate::device::{BlockDevice, Status};
use crate::request::{DataPath, Reply};
use crate::storage::{IoBuffers, Storage};

/// Linux refuses longer iovec lists in one READV/WRITEV; such requests are served inline.
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
}

/// One request the kernel is working on.
struct Slot {
    /// Taken by a request that has not completed yet.
    busy: bool,
    /// Order in which the requests were started, for flushes to wait for earlier writes.
    seq: u64,
    reply: Reply,
    operation: Operation,
    sector: u64,
    offset: u64,
    len: usize,
    /// The guest buffers; the kernel may read this list until the request completes.
    iovecs: Vec<libc::iovec>,
}

/// A request that has finished: the answer to write back to the guest.
pub struct Finished {
    pub reply: Reply,
    pub status: Status,
    pub written: u32,
}

pub struct UringPath {
    ring: IoUring,
    fd: RawFd,
    /// The file goes through the page cache. Buffered writes are then served inline: file
    /// systems without asynchronous buffered writes (ext4) hand each one to an io_uring worker
    /// thread, a hop that costs more than the copy, and parallel writers serialise on the inode
    /// lock anyway. O_DIRECT transfers are asynchronous in the block layer and take the ring.
    buffered: bool,
    /// The kernel and file system take `RWF_NOWAIT` reads (false once one was refused).
    nowait_reads: bool,
    /// Page-cache reads from this size on go to io_uring's worker threads (see
    /// `OFFLOAD_BYTES`); `usize::MAX` when there are no cores to spare.
    offload_bytes: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
    next_seq: u64,
    /// Flushes (slot, first later sequence number) waiting for the writes started before them.
    /// Ordering is done here rather than with IOSQE_IO_DRAIN, which would also wait for the
    /// kick poll (and so for the driver's next kick) and hold back every later request.
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

// SAFETY: the raw pointers in the slots' iovec lists are only dereferenced by the kernel while a
// request is in flight, and the worker that owns the engine does not let the guest-memory borrow
// go before every request has completed (see `BlkBackend::process_queue`).
unsafe impl Send for UringPath {}

impl UringPath {
    /// A ring for up to `depth` requests in flight on `fd`; `buffered` when `fd` goes through
    /// the page cache; `spare_cores` when the host has more cores than the device has queues.
    pub fn new(fd: RawFd, buffered: bool, spare_cores: bool, depth: u16) -> io::Result<Self> {
        // Room for every request plus the kick poll and its cancellation.
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
            reply: Reply {
                head: 0,
                status_addr: vm_memory::GuestAddress(0),
            },
            operation: Operation::Flush,
            sector: 0,
            offset: 0,
            len: 0,
            iovecs: Vec::new(),
        };
        Ok(UringPath {
            ring,
            fd,
            buffered,
            nowait_reads: buffered,
            offload_bytes: if spare_cores {
                OFFLOAD_BYTES
            } else {
                usize::MAX
            },
            slots: (0..depth).map(|_| empty_slot()).collect(),
            free: (0..usize::from(depth)).rev().collect(),
            in_flight: 0,
            next_seq: 0,
            deferred_flushes: VecDeque::with_capacity(usize::from(depth)),
            kick_armed: None,
            kick_polls: 0,
            kick_poll_ended: false,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Takes a free slot for a new request.
    fn take_slot(&mut self) -> Option<usize> {
        let index = self.free.pop()?;
        let slot = &mut self.slots[index];
        slot.busy = true;
        slot.seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight += 1;
        Some(index)
    }

    fn release_slot(&mut self, index: usize) {
        self.slots[index].busy = false;
        self.free.push(index);
        self.in_flight -= 1;
    }

    /// Whether a write started before sequence number `barrier` is still in flight.
    fn writes_before(&self, barrier: u64) -> bool {
        self.slots
            .iter()
            .any(|slot| slot.busy && slot.operation == Operation::Write && slot.seq < barrier)
    }

    /// Queues one SQE for `slot`.
    fn push(&mut self, slot: usize, entry: squeue::Entry) -> io::Result<()> {
        self.push_entry(entry.user_data(slot as u64))
    }

    fn push_fsync(&mut self, slot: usize) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.push(slot, entry)
    }

    /// Starts the deferred flushes whose earlier writes have all completed; a flush the ring
    /// cannot take is done inline.
    fn start_ready_flushes<S: Storage>(
        &mut self,
        device: &BlockDevice<S>,
        finished: &mut Vec<Finished>,
    ) {
        while let Some(&(slot, barrier)) = self.deferred_flushes.front() {
            if self.writes_before(barrier) {
                return;
            }
            self.deferred_flushes.pop_front();
            if let Err(error) = self.push_fsync(slot) {
                warn!("io_uring submission failed ({error}); flushing inline");
                finished.push(Finished {
                    reply: self.slots[slot].reply,
                    status: device.flush(),
                    written: 0,
                });
                self.release_slot(slot);
            }
        }
    }

    fn push_entry(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the buffers the entry names (the slot's iovec list and the guest memory it
            // points to) stay valid and untouched until the request completes: the slot is not
            // reused before then, and the worker holds the guest-memory borrow until
            // `in_flight` is back to zero.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // The submission ring is full: hand the batch so far to the kernel.
            self.ring.submit()?;
        }
    }

    /// Starts a read or write of `bufs`; the caller has checked that a slot is free and that
    /// the list is short enough for one SQE.
    fn start_transfer(
        &mut self,
        operation: Operation,
        sector: u64,
        offset: u64,
        bufs: IoBuffers<'_>,
        reply: Reply,
    ) -> Option<Status> {
        let Some(slot_index) = self.take_slot() else {
            return Some(Status::IoError);
        };
        let slot = &mut self.slots[slot_index];
        slot.reply = reply;
        slot.operation = operation;
        slot.sector = sector;
        slot.offset = offset;
        slot.len = bufs.len();
        bufs.swap_out(&mut slot.iovecs);
        let (iovecs, count) = (slot.iovecs.as_ptr(), slot.iovecs.len() as u32);
        let entry = match operation {
            Operation::Read => opcode::Readv::new(types::Fd(self.fd), iovecs, count)
                .offset(offset)
                .build(),
            _ => opcode::Writev::new(types::Fd(self.fd), iovecs, count)
                .offset(offset)
                .build(),
        };
        let entry =
            if self.buffered && operation == Operation::Read && slot.len >= self.offload_bytes {
                entry.flags(squeue::Flags::ASYNC)
            } else {
                entry
            };
        match self.push(slot_index, entry) {
            Ok(()) => None,
            Err(error) => {
                warn!("io_uring submission failed: {error}");
                self.release_slot(slot_index);
                Some(Status::IoError)
            }
        }
    }

    /// Reads `bufs` on this thread if the page cache holds every byte: a page-cache hit costs
    /// less inline than through the ring (4 KiB reads at QD1: 65,000 IOPS through io_uring,
    /// 96,000 inline). False when the read would wait for the disk, leaving it to the ring.
    fn read_cached(&mut self, bufs: &IoBuffers<'_>, offset: u64) -> bool {
        let Ok(file_offset) = libc::off_t::try_from(offset) else {
            return false;
        };
        if !self.nowait_reads {
            return false;
        }
        let iovecs = bufs.iovecs();
        // SAFETY: `can_take` bounded the list to IOV_MAX entries, each built by
        // `IoBuffers::push` from a live guest-memory slice that `bufs` keeps borrowed.
        let done = unsafe {
            libc::preadv2(
                self.fd,
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

    /// Whether a request with `bufs` can go through the ring rather than inline.
    fn can_take(&self, bufs: &IoBuffers<'_>) -> bool {
        bufs.iovecs().len() <= IOV_MAX && !self.free.is_empty()
    }

    /// Hands the queued requests to the kernel; page-cache hits complete during the call.
    pub fn submit(&mut self) -> io::Result<()> {
        retry_interrupted(|| self.ring.submit())
    }

    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Starts a round of serving the queue, after the transport consumed a kick. Nothing is in
    /// flight between rounds, but the kick poll stays armed: the completions it posted for kicks
    /// that came meanwhile are dropped here, so that they cannot pile up in the completion queue
    /// (older kernels refuse submissions while it overflows).
    pub fn new_round<S: Storage>(&mut self, device: &BlockDevice<S>, finished: &mut Vec<Finished>) {
        self.reap(device, finished);
        self.kick_poll_ended = false;
    }

    /// Sleeps until a request completes or, when `kick` is given, the driver kicks the queue.
    pub fn wait(&mut self, kick: Option<RawFd>) -> io::Result<()> {
        if let (Some(fd), false) = (kick, self.kick_poll_ended) {
            self.arm_kick_poll(fd)?;
        }
        retry_interrupted(|| self.ring.submit_and_wait(1))
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

    /// Cancels the kick poll when the queue stops: the poll holds the kick eventfd, which the
    /// transport is about to replace (often by a new one with the same number).
    pub fn disarm_kick(&mut self) -> io::Result<()> {
        if self.kick_armed.is_some() {
            self.queue_kick_cancel()?;
            self.submit()?;
        }
        Ok(())
    }

    /// Collects every completion available. A kick needs nothing more: the caller looks at the
    /// available ring after every wait.
    pub fn reap<S: Storage>(&mut self, device: &BlockDevice<S>, finished: &mut Vec<Finished>) {
        for cqe in self.ring.completion() {
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
            match self.slots.get_mut(slot_index) {
                Some(slot) if slot.busy => {
                    finished.push(finish(device, slot, cqe.result()));
                    // `release_slot`, spelled out: the completion queue borrows the ring.
                    slot.busy = false;
                    self.free.push(slot_index);
                    self.in_flight -= 1;
                }
                _ => warn!("io_uring completion for idle slot {slot_index}; ignored"),
            }
        }
        self.start_ready_flushes(device, finished);
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

/// The answer to a completed request; transfers the kernel left short or refused are redone
/// inline, which also takes O_DIRECT's bounce-buffer fallback for unaligned guest buffers.
fn finish<S: Storage>(device: &BlockDevice<S>, slot: &mut Slot, result: i32) -> Finished {
    let (status, written) = match slot.operation {
        Operation::Flush if result < 0 => {
            warn!("flush: {}", io::Error::from_raw_os_error(-result));
            (Status::IoError, 0)
        }
        Operation::Flush => (Status::Ok, 0),
        Operation::Read | Operation::Write => {
            let complete = usize::try_from(result).is_ok_and(|done| done == slot.len);
            let status = if complete {
                Status::Ok
            } else {
                // SAFETY: the list was built by `IoBuffers::push` for this request, whose guest
                // memory the worker keeps mapped until every request has completed.
                let mut bufs = unsafe { IoBuffers::from_started(&mut slot.iovecs) };
                let (what, redone) = if slot.operation == Operation::Read {
                    ("read", device.storage().read_at(&mut bufs, slot.offset))
                } else {
                    ("write", device.storage().write_at(&mut bufs, slot.offset))
                };
                device.transfer_status(what, slot.sector, slot.len, redone)
            };
            let written = if slot.operation == Operation::Read && status == Status::Ok {
                slot.len as u32
            } else {
                0
            };
            (status, written)
        }
    };
    Finished {
        reply: slot.reply,
        status,
        written,
    }
}

impl<S: Storage> DataPath<S> for UringPath {
    fn read(
        &mut self,
        device: &BlockDevice<S>,
        sector: u64,
        mut bufs: IoBuffers<'_>,
        reply: Reply,
    ) -> Option<Status> {
        let offset = match device.read_offset(sector, bufs.len()) {
            Ok(offset) => offset,
            Err(status) => return Some(status),
        };
        if !self.can_take(&bufs) {
            return Some(device.read(sector, &mut bufs));
        }
        if bufs.len() < self.offload_bytes && self.read_cached(&bufs, offset) {
            return Some(Status::Ok);
        }
        self.start_transfer(Operation::Read, sector, offset, bufs, reply)
    }

    fn write(
        &mut self,
        device: &BlockDevice<S>,
        sector: u64,
        mut bufs: IoBuffers<'_>,
        reply: Reply,
    ) -> Option<Status> {
        // Writethrough makes each write durable before it completes: the inline path writes
        // and flushes in one go, which this rare mode does not need to overlap. A write served
        // inline is complete before any later flush is queued, so flush ordering holds.
        if self.buffered || !device.writeback() || !self.can_take(&bufs) {
            return Some(device.write(sector, &mut bufs));
        }
        let offset = match device.write_offset(sector, bufs.len()) {
            Ok(offset) => offset,
            Err(status) => return Some(status),
        };
        self.start_transfer(Operation::Write, sector, offset, bufs, reply)
    }

    fn flush(&mut self, device: &BlockDevice<S>, reply: Reply) -> Option<Status> {
        if device.readonly() {
            return Some(device.flush());
        }
        let barrier = self.next_seq;
        let Some(slot_index) = self.take_slot() else {
            return Some(device.flush());
        };
        let slot = &mut self.slots[slot_index];
        slot.reply = reply;
        slot.operation = Operation::Flush;
        // The fdatasync must cover the writes the driver issued before the flush: it starts
        // once they have completed (writes served inline have, already).
        if self.writes_before(barrier) {
            self.deferred_flushes.push_back((slot_index, barrier));
            return None;
        }
        match self.push_fsync(slot_index) {
            Ok(()) => None,
            Err(error) => {
                warn!("io_uring submission failed ({error}); flushing inline");
                self.release_slot(slot_index);
                Some(device.flush())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{GuestAddress, VolatileSlice};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::storage::FileStorage;

    const PAGE: usize = 4096;

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
            assert_eq!(libc::mincore(map, PAGE, &mut resident), 0);
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
        let device = BlockDevice::new(storage, false, "");
        let mut path = UringPath::new(device.storage().async_fd().unwrap(), true, true, 4).unwrap();
        let reply = Reply {
            head: 0,
            status_addr: GuestAddress(0),
        };
        let mut guest = vec![0u8; PAGE];
        let mut iovecs = Vec::new();

        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut guest[..]));
        assert!(first_page_cached(image.as_file()), "just written");
        assert_eq!(
            path.read(&device, 0, bufs, reply),
            Some(Status::Ok),
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
        assert_eq!(
            path.read(&device, 0, bufs, reply),
            None,
            "a miss takes the ring"
        );
        let mut finished = Vec::new();
        while path.in_flight() > 0 {
            path.wait(None).unwrap();
            path.reap(&device, &mut finished);
        }
        assert_eq!(finished.len(), 1);
        assert_eq!(
            (finished[0].status, finished[0].written),
            (Status::Ok, PAGE as u32)
        );
        assert_eq!(guest, pattern[..PAGE]);
    }

    /// Every kick ends a wait, also after the first one, and no kick is consumed: the
    /// transport reads them later.
    #[test]
    fn every_kick_ends_a_wait_and_stays_for_the_transport() {
        const KICKS: u64 = 3;
        let device = BlockDevice::new(FileStorage::memory(1 << 20).unwrap(), false, "");
        let mut path = UringPath::new(device.storage().async_fd().unwrap(), true, true, 4).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick_fd = kick.as_raw_fd();
        let (woke, wakes) = mpsc::channel();
        // Detached: with a kick missed it would sleep in io_uring_enter for good.
        std::thread::spawn(move || {
            let mut finished = Vec::new();
            for _ in 0..KICKS {
                path.wait(Some(kick_fd)).unwrap();
                path.reap(&device, &mut finished);
                woke.send(()).unwrap();
            }
            assert!(finished.is_empty());
        });
        for number in 1..=KICKS {
            kick.write(1).unwrap();
            wakes
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("kick {number} did not end the wait"));
        }
        assert_eq!(kick.read().unwrap(), KICKS);
    }
}
