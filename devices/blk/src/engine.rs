//! The I/O engine of one queue: how a storage carries out the operations of the requests.
//!
//! A [`Storage`](crate::storage::Storage) hands every queue an engine of its own, so whatever
//! sits between the requests and the disk (a wrapper that injects faults, say) sees every
//! operation whichever engine does the work. An operation either ends within the call
//! ([`Outcome::Executed`]) or runs on ([`Outcome::Submitted`]) and is reported later by
//! [`Engine::next_completed`] under the tag the caller gave it.
//!
//! Two engines serve files: [`SyncEngine`] (`--io-engine=sync`) runs each operation on the
//! queue's thread, and [`UringEngine`] (`--io-engine=io-uring`) runs a kick's operations
//! concurrently through one io_uring per queue. [`FileEngine`] is the one a
//! [`FileStorage`](crate::storage::FileStorage) picked.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::storage::{FileDisk, IoBuffers};
use crate::uring::UringEngine;

/// What an engine did with an operation.
#[derive(Debug)]
pub enum Outcome {
    /// The operation is over, with this result.
    Executed(io::Result<()>),
    /// The operation runs on; [`Engine::next_completed`] reports it.
    Submitted,
}

/// An operation that ended after its call returned [`Outcome::Submitted`].
#[derive(Debug)]
pub struct Completion {
    /// The tag the operation was started with.
    pub tag: u64,
    pub result: io::Result<()>,
}

/// The operations one queue needs from a disk, and the waiting for the ones that run on.
///
/// Offsets and lengths are in bytes and lie inside the disk: the caller has checked them.
/// An engine that submits a read or write keeps pointers to its guest buffers past the call:
/// the caller keeps that guest memory mapped until [`Engine::in_flight`] is back to zero.
pub trait Engine: Send {
    /// Fills every buffer from `offset`.
    fn read(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome;
    /// Writes every buffer at `offset`.
    fn write(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome;
    /// Makes the writes completed so far durable; never completes before a write, discard
    /// or zeroing started earlier on this engine.
    fn flush(&mut self, tag: u64) -> Outcome;
    /// Leaves zeroes in the range; with `may_unmap` the space may be deallocated as well
    /// (a discard is a zeroing that may unmap).
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool, tag: u64) -> Outcome;

    /// Operations submitted and not yet returned by `next_completed`.
    fn in_flight(&self) -> usize {
        0
    }
    /// Hands the operations queued so far to the kernel.
    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The next operation that has ended, if any has; never waits.
    fn next_completed(&mut self) -> Option<Completion> {
        None
    }
    /// Whether `next_completed` has something to return.
    fn has_completions(&mut self) -> bool {
        false
    }
    /// Sleeps until an operation ends or, with `kick`, until the driver kicks the queue.
    /// Only called while operations are in flight.
    fn wait(&mut self, kick: Option<RawFd>) -> io::Result<()> {
        let _ = kick;
        Ok(())
    }
    /// A round of serving the queue begins (the transport consumed a kick); nothing is in
    /// flight between rounds.
    fn begin_round(&mut self) {}
    /// The queue stops: lets go of the kick descriptor, which the transport is about to replace.
    fn stop(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Whether the operations a call executes stay in the page cache (reads that hit it,
    /// buffered writes) and the rest is submitted, so that a thread that must not wait for the
    /// disk may start operations and leave what was submitted to the queue's worker.
    fn calls_stay_off_the_disk(&self) -> bool {
        false
    }
}

/// Runs every operation on the queue's thread with `preadv`/`pwritev`/`fdatasync`/`fallocate`.
pub struct SyncEngine {
    disk: Arc<FileDisk>,
}

impl SyncEngine {
    pub(crate) fn new(disk: Arc<FileDisk>) -> Self {
        SyncEngine { disk }
    }
}

impl Engine for SyncEngine {
    fn read(&mut self, offset: u64, mut bufs: IoBuffers<'_>, _: u64) -> Outcome {
        Outcome::Executed(self.disk.read_at(&mut bufs, offset))
    }

    fn write(&mut self, offset: u64, mut bufs: IoBuffers<'_>, _: u64) -> Outcome {
        Outcome::Executed(self.disk.write_at(&mut bufs, offset))
    }

    fn flush(&mut self, _: u64) -> Outcome {
        Outcome::Executed(self.disk.flush())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool, _: u64) -> Outcome {
        Outcome::Executed(self.disk.write_zeroes(offset, len, may_unmap))
    }
}

/// The engine of a file, block device or in-memory disk, as the config chose it (the sync
/// one when the kernel offers no io_uring).
pub enum FileEngine {
    Sync(SyncEngine),
    IoUring(Box<UringEngine>),
}

impl FileEngine {
    fn inner(&self) -> &dyn Engine {
        match self {
            FileEngine::Sync(engine) => engine,
            FileEngine::IoUring(engine) => engine.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Engine {
        match self {
            FileEngine::Sync(engine) => engine,
            FileEngine::IoUring(engine) => engine.as_mut(),
        }
    }
}

impl Engine for FileEngine {
    fn read(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome {
        self.inner_mut().read(offset, bufs, tag)
    }

    fn write(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome {
        self.inner_mut().write(offset, bufs, tag)
    }

    fn flush(&mut self, tag: u64) -> Outcome {
        self.inner_mut().flush(tag)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool, tag: u64) -> Outcome {
        self.inner_mut().write_zeroes(offset, len, may_unmap, tag)
    }

    fn in_flight(&self) -> usize {
        self.inner().in_flight()
    }

    fn submit(&mut self) -> io::Result<()> {
        self.inner_mut().submit()
    }

    fn next_completed(&mut self) -> Option<Completion> {
        self.inner_mut().next_completed()
    }

    fn has_completions(&mut self) -> bool {
        self.inner_mut().has_completions()
    }

    fn wait(&mut self, kick: Option<RawFd>) -> io::Result<()> {
        self.inner_mut().wait(kick)
    }

    fn begin_round(&mut self) {
        self.inner_mut().begin_round();
    }

    fn stop(&mut self) -> io::Result<()> {
        self.inner_mut().stop()
    }

    fn calls_stay_off_the_disk(&self) -> bool {
        self.inner().calls_stay_off_the_disk()
    }
}
