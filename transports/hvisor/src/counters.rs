//! The daemon's counters: the request loop's, the result ring's and each device's, each
//! group bumped by the thread that sees its events, and read together as one [`Snapshot`]
//! (JSON of a stable shape, [`VERSION`]; README.md, "Counters", documents every field).
//!
//! Groups written by different threads never share a cache line (see [`QueueCounters`]).
//! Nothing here takes a lock: bumping a counter is one relaxed atomic add.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisor_vhost_core::counters::{Counter, QueueCounters};
use serde::{Deserialize, Serialize};

/// Version of the [`Snapshot`] shape: fields may be added within a version, never renamed,
/// retyped or removed.
pub const VERSION: u32 = 1;

/// The request loop's counts; written by the ring thread alone.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct RingCounters {
    pub(crate) requests: Counter,
    pub(crate) sync_answers: Counter,
    pub(crate) posted_notifies: Counter,
    pub(crate) errors: Counter,
    pub(crate) poll_hits: Counter,
    pub(crate) poll_misses: Counter,
    pub(crate) sleeps: Counter,
    pub(crate) wakeups: Counter,
    pub(crate) interrupt_wakeups: Counter,
}

/// The result ring's counts; written by whichever thread delivers an interrupt.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ResultRingCounters {
    pub(crate) full_waits: Counter,
    pub(crate) full_wait_us: Counter,
}

impl ResultRingCounters {
    /// An interrupt found the result ring full and waited `waited` for room (or gave up).
    pub(crate) fn waited(&self, waited: Duration) {
        self.full_waits.increment();
        self.full_wait_us
            .add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
    }
}

/// A device's register accesses; written by the ring thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct RegisterCounters {
    pub(crate) reads: Counter,
    pub(crate) writes: Counter,
    pub(crate) notifies: Counter,
    pub(crate) refused: Counter,
    /// QueueNotify served whole on the ring thread (see `LocalDevice::kick`).
    pub(crate) inline_kicks: Counter,
    /// QueueNotify handed to a worker that was still serving its queue.
    pub(crate) busy_worker_kicks: Counter,
    /// Inline rounds that took so long that inline service paused.
    pub(crate) inline_pauses: Counter,
}

/// A device's interrupt line; written by the thread that turns signals into interrupts.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct LineCounters {
    pub(crate) signals: Counter,
    pub(crate) config_signals: Counter,
    pub(crate) delivered: Counter,
    pub(crate) dropped: Counter,
}

/// One worker thread of a device; written by that thread.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    pub(crate) wakeups: Counter,
    pub(crate) event_errors: Counter,
}

/// Everything counted for one device.
#[derive(Debug)]
pub struct DeviceCounters {
    pub(crate) registers: RegisterCounters,
    pub(crate) line: LineCounters,
    /// One per worker thread.
    pub(crate) workers: Box<[WorkerCounters]>,
    /// One per queue, kept by the device's rings (see `VirtioDevice::count_chains`).
    pub(crate) queues: Arc<[QueueCounters]>,
}

impl DeviceCounters {
    pub fn new(queues: usize, workers: usize) -> Self {
        DeviceCounters {
            registers: RegisterCounters::default(),
            line: LineCounters::default(),
            workers: (0..workers).map(|_| WorkerCounters::default()).collect(),
            queues: (0..queues).map(|_| QueueCounters::default()).collect(),
        }
    }
}

/// Who a device is, for its entry in a [`Snapshot`].
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    pub name: String,
    pub kind: &'static str,
    pub zone: u32,
    pub addr: u64,
}

/// All the daemon's counters, from the moment the request loop was set up.
#[derive(Debug)]
pub struct Counters {
    since: Instant,
    pub(crate) ring: RingCounters,
    pub(crate) result_ring: Arc<ResultRingCounters>,
    pub(crate) devices: Vec<(DeviceIdentity, Arc<DeviceCounters>)>,
}

/// Why a snapshot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// SIGUSR1.
    Signal,
    /// The request loop ended and every thread of the daemon's has stopped.
    Exit,
}

/// The counters at one moment, as printed. Every count starts at 0 when the daemon starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub reason: Reason,
    /// Milliseconds since the request loop was set up.
    pub elapsed_ms: u64,
    pub ring: RingSnapshot,
    pub result_ring: ResultRingSnapshot,
    /// In the configuration's order.
    pub devices: Vec<DeviceSnapshot>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSnapshot {
    pub requests: u64,
    pub sync_answers: u64,
    pub posted_notifies: u64,
    pub errors: u64,
    pub poll_hits: u64,
    pub poll_misses: u64,
    pub sleeps: u64,
    pub wakeups: u64,
    /// Sleeps ended by an interrupt this daemon posted, not by the hypervisor's wake-up.
    #[serde(default)]
    pub interrupt_wakeups: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRingSnapshot {
    pub full_waits: u64,
    pub full_wait_us: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub zone: u32,
    pub addr: u64,
    pub reads: u64,
    pub writes: u64,
    pub notifies: u64,
    pub refused_accesses: u64,
    #[serde(default)]
    pub inline_kicks: u64,
    #[serde(default)]
    pub busy_worker_kicks: u64,
    #[serde(default)]
    pub inline_pauses: u64,
    pub worker_wakeups: u64,
    pub event_errors: u64,
    pub chains_taken: u64,
    pub chains_used: u64,
    pub bytes_to_device: u64,
    pub bytes_to_driver: u64,
    pub ring_faults: u64,
    pub signals: u64,
    pub config_signals: u64,
    pub interrupts: u64,
    pub interrupts_dropped: u64,
}

impl Counters {
    pub(crate) fn new(
        result_ring: Arc<ResultRingCounters>,
        devices: Vec<(DeviceIdentity, Arc<DeviceCounters>)>,
    ) -> Self {
        Counters {
            since: Instant::now(),
            ring: RingCounters::default(),
            result_ring,
            devices,
        }
    }

    /// Reads every counter (each on its own: taken while the daemon serves, the counts of
    /// requests in flight may be split across this snapshot and the next).
    pub fn snapshot(&self, reason: Reason) -> Snapshot {
        let ring = &self.ring;
        Snapshot {
            version: VERSION,
            reason,
            elapsed_ms: u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            ring: RingSnapshot {
                requests: ring.requests.get(),
                sync_answers: ring.sync_answers.get(),
                posted_notifies: ring.posted_notifies.get(),
                errors: ring.errors.get(),
                poll_hits: ring.poll_hits.get(),
                poll_misses: ring.poll_misses.get(),
                sleeps: ring.sleeps.get(),
                wakeups: ring.wakeups.get(),
                interrupt_wakeups: ring.interrupt_wakeups.get(),
            },
            result_ring: ResultRingSnapshot {
                full_waits: self.result_ring.full_waits.get(),
                full_wait_us: self.result_ring.full_wait_us.get(),
            },
            devices: self
                .devices
                .iter()
                .map(|(identity, counters)| device_snapshot(identity, counters))
                .collect(),
        }
    }
}

fn device_snapshot(identity: &DeviceIdentity, counters: &DeviceCounters) -> DeviceSnapshot {
    let workers = |counter: fn(&WorkerCounters) -> &Counter| -> u64 {
        counters.workers.iter().map(|w| counter(w).get()).sum()
    };
    let queues = |counter: fn(&QueueCounters) -> &Counter| -> u64 {
        counters.queues.iter().map(|q| counter(q).get()).sum()
    };
    let (registers, line) = (&counters.registers, &counters.line);
    DeviceSnapshot {
        name: identity.name.clone(),
        kind: identity.kind.to_owned(),
        zone: identity.zone,
        addr: identity.addr,
        reads: registers.reads.get(),
        writes: registers.writes.get(),
        notifies: registers.notifies.get(),
        refused_accesses: registers.refused.get(),
        inline_kicks: registers.inline_kicks.get(),
        busy_worker_kicks: registers.busy_worker_kicks.get(),
        inline_pauses: registers.inline_pauses.get(),
        worker_wakeups: workers(|w| &w.wakeups),
        event_errors: workers(|w| &w.event_errors),
        chains_taken: queues(|q| &q.taken),
        chains_used: queues(|q| &q.used),
        bytes_to_device: queues(|q| &q.bytes_to_device),
        bytes_to_driver: queues(|q| &q.bytes_to_driver),
        ring_faults: queues(|q| &q.faults),
        signals: line.signals.get(),
        config_signals: line.config_signals.get(),
        interrupts: line.delivered.get(),
        interrupts_dropped: line.dropped.get(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_written_by_different_threads_never_share_a_line() {
        fn line<T>(group: &T) -> usize {
            std::ptr::from_ref(group).addr() / 128
        }
        let counters = DeviceCounters::new(2, 2);
        let mut lines = vec![line(&counters.registers), line(&counters.line)];
        lines.extend(counters.workers.iter().map(line));
        lines.extend(counters.queues.iter().map(line));
        let count = lines.len();
        lines.sort_unstable();
        lines.dedup();
        assert_eq!(lines.len(), count, "two groups start on one 128-byte line");
        for size in [
            size_of::<RingCounters>(),
            size_of::<ResultRingCounters>(),
            size_of::<RegisterCounters>(),
            size_of::<LineCounters>(),
            size_of::<WorkerCounters>(),
            size_of::<QueueCounters>(),
        ] {
            assert_eq!(
                size % 128,
                0,
                "a group of {size} bytes shares its last line"
            );
        }
    }

    #[test]
    fn a_snapshot_sums_queues_and_workers_and_keeps_its_shape() {
        let device = Arc::new(DeviceCounters::new(2, 2));
        device.queues[0].taken.add(3);
        device.queues[1].taken.add(4);
        device.queues[1].bytes_to_driver.add(512);
        device.workers[0].wakeups.add(5);
        device.workers[1].wakeups.add(6);
        device.registers.notifies.add(7);
        device.line.delivered.add(2);
        let identity = DeviceIdentity {
            name: "zone1-blk0@0xa003c00".into(),
            kind: "blk",
            zone: 1,
            addr: 0xa00_3c00,
        };
        let counters = Counters::new(Arc::default(), vec![(identity, device)]);
        counters.ring.requests.add(9);
        counters.result_ring.waited(Duration::from_micros(1500));
        let snapshot = counters.snapshot(Reason::Signal);
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["reason"], "signal");
        assert_eq!(json["ring"]["requests"], 9);
        assert_eq!(json["result_ring"]["full_waits"], 1);
        assert_eq!(json["result_ring"]["full_wait_us"], 1500);
        let entry = &json["devices"][0];
        assert_eq!(entry["name"], "zone1-blk0@0xa003c00");
        assert_eq!(entry["type"], "blk");
        assert_eq!(entry["addr"], 0xa00_3c00);
        assert_eq!(entry["chains_taken"], 7);
        assert_eq!(entry["bytes_to_driver"], 512);
        assert_eq!(entry["worker_wakeups"], 11);
        assert_eq!(entry["notifies"], 7);
        assert_eq!(entry["interrupts"], 2);
        let back: Snapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, snapshot);
    }
}
