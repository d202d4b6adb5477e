//! A storage for the tests that fails on demand and counts flushes. It wraps a
//! [`FileStorage`] and each of its engines, so it sees every operation whichever engine runs it.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::engine::{Completion, Engine, FileEngine, Outcome, SyncEngine};
use crate::storage::{EngineOptions, FileStorage, IoBuffers, Storage};
use crate::uring::UringEngine;

/// What the tests switch and count, shared by the storage and its engines.
#[derive(Default)]
pub(crate) struct Faults {
    /// Every operation started from now on fails with EIO.
    pub fail: AtomicBool,
    /// Flushes started, through an engine or the storage itself.
    pub flushes: AtomicUsize,
}

impl Faults {
    fn check(&self) -> io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }

    fn count_flush(&self) -> io::Result<()> {
        self.check()?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

pub(crate) struct FaultyStorage {
    pub inner: FileStorage,
    pub faults: Arc<Faults>,
    /// Queues run io_uring engines whose writes take the ring, as on an O_DIRECT image;
    /// otherwise sync engines.
    pub ring: bool,
    /// With `ring`: the engines treat the disk as buffered (page-cache reads and writes are
    /// executed in the call).
    pub buffered: bool,
}

impl FaultyStorage {
    /// An in-memory disk of `size` bytes served by sync engines.
    pub fn new(size: u64) -> Self {
        FaultyStorage {
            inner: FileStorage::memory(size).unwrap(),
            faults: Arc::default(),
            ring: false,
            buffered: false,
        }
    }
}

impl Storage for FaultyStorage {
    type Engine = FaultyEngine;

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }

    fn physical_block_size(&self) -> u32 {
        self.inner.physical_block_size()
    }

    fn flush(&self) -> io::Result<()> {
        self.faults.count_flush()?;
        self.inner.flush()
    }

    fn engine(&self, options: &EngineOptions) -> FaultyEngine {
        let disk = self.inner.disk.clone();
        let inner = if self.ring {
            let engine =
                UringEngine::new(disk, self.buffered, options).expect("io_uring is unavailable");
            FileEngine::IoUring(Box::new(engine))
        } else {
            FileEngine::Sync(SyncEngine::new(disk))
        };
        FaultyEngine {
            inner,
            faults: self.faults.clone(),
        }
    }
}

pub(crate) struct FaultyEngine {
    pub inner: FileEngine,
    faults: Arc<Faults>,
}

impl Engine for FaultyEngine {
    fn read(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome {
        match self.faults.check() {
            Ok(()) => self.inner.read(offset, bufs, tag),
            Err(error) => Outcome::Executed(Err(error)),
        }
    }

    fn write(&mut self, offset: u64, bufs: IoBuffers<'_>, tag: u64) -> Outcome {
        match self.faults.check() {
            Ok(()) => self.inner.write(offset, bufs, tag),
            Err(error) => Outcome::Executed(Err(error)),
        }
    }

    fn flush(&mut self, tag: u64) -> Outcome {
        match self.faults.count_flush() {
            Ok(()) => self.inner.flush(tag),
            Err(error) => Outcome::Executed(Err(error)),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool, tag: u64) -> Outcome {
        match self.faults.check() {
            Ok(()) => self.inner.write_zeroes(offset, len, may_unmap, tag),
            Err(error) => Outcome::Executed(Err(error)),
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn submit(&mut self) -> io::Result<()> {
        self.inner.submit()
    }

    fn next_completed(&mut self) -> Option<Completion> {
        self.inner.next_completed()
    }

    fn has_completions(&mut self) -> bool {
        self.inner.has_completions()
    }

    fn calls_stay_off_the_disk(&self) -> bool {
        self.inner.calls_stay_off_the_disk()
    }

    fn wait(&mut self, kick: Option<RawFd>) -> io::Result<()> {
        self.inner.wait(kick)
    }

    fn begin_round(&mut self) {
        self.inner.begin_round();
    }

    fn stop(&mut self) -> io::Result<()> {
        self.inner.stop()
    }
}
