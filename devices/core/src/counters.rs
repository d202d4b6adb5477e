//! Counters a transport reports: [`Counter`], and what a queue's chains amounted to, counted
//! where every device takes and returns them ([`crate::queue::Rings`]) for a transport that
//! asked for it (see [`crate::VirtioDevice::count_chains`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// An event count: cheap to bump from the thread that sees the event, readable from any.
///
/// Relaxed: a count orders nothing; a reader sees each counter on its own, as of some moment
/// since it last looked.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn increment(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One queue's counts. Written by the queue's worker thread, read by whoever reports them.
/// Each queue's counts fill cache lines of their own (128 bytes: the line pair x86's
/// adjacent-line prefetcher fetches together, and the line size of some arm64 cores), so the
/// workers of different queues never write to the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueCounters {
    /// Chains taken from the available ring.
    pub taken: Counter,
    /// Entries put in the used ring.
    pub used: Counter,
    /// Lengths of the device-readable buffers of the chains taken (what the driver sent:
    /// request headers and data to write, frames to transmit, console output).
    pub bytes_to_device: Counter,
    /// Used lengths of the entries put in the used ring (what the device wrote into the
    /// driver's buffers: data read and status bytes, received frames, console input, entropy).
    pub bytes_to_driver: Counter,
    /// Times the queue was stopped because the driver broke its ring.
    pub faults: Counter,
}

impl QueueCounters {
    pub(crate) fn chain_taken(&self, readable_bytes: u64) {
        self.taken.increment();
        self.bytes_to_device.add(readable_bytes);
    }

    pub(crate) fn chain_used(&self, len: u32) {
        self.used.increment();
        self.bytes_to_driver.add(u64::from(len));
    }
}
