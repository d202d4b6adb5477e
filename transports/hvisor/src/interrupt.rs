//! Interrupt delivery to zones: each device's InterruptStatus and line state, and the one
//! path that puts interrupts into the result ring.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use super::abi::DeviceRes;
use super::counters::{DeviceCounters, ResultRingCounters};
use super::port::HypervisorPort;
use super::ring::push_result;

/// InterruptStatus bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Puts interrupts into the result ring and tells the hypervisor.
pub struct Injector {
    port: Arc<dyn HypervisorPort>,
    /// Serializes result-ring producers (the C daemon's RES_MUTEX).
    results: Mutex<()>,
    /// Set when the daemon stops: an interrupt still waiting for room is given up.
    stopping: AtomicBool,
    counters: Arc<ResultRingCounters>,
}

impl Injector {
    pub fn new(port: Arc<dyn HypervisorPort>) -> Self {
        Injector {
            port,
            results: Mutex::new(()),
            stopping: AtomicBool::new(false),
            counters: Arc::default(),
        }
    }

    /// The result ring's counters.
    pub fn counters(&self) -> &Arc<ResultRingCounters> {
        &self.counters
    }

    /// Makes `inject` give up instead of waiting for room, so the daemon can stop while the
    /// hypervisor side no longer drains the result ring.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Held while a result is pushed; a device reset takes it to wait out a push in progress.
    fn lock_results(&self) -> MutexGuard<'_, ()> {
        self.results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `irq` for `zone` and signals FINISH_REQ, unless `still_wanted` (asked with the
    /// result lock held, right before the push) says a reset has made the interrupt stale.
    /// When the result ring is full it backs off with the lock released, nudging the
    /// hypervisor to drain, so register answers of other devices never wait behind it.
    /// Returns whether the interrupt went into the ring.
    fn inject(&self, zone: u32, irq: u32, still_wanted: impl Fn() -> bool) -> bool {
        let result = DeviceRes {
            target_zone: zone,
            irq_id: irq,
        };
        let mut backoff = Duration::from_micros(1);
        let mut last_warning: Option<Instant> = None;
        // When the ring was first found full.
        let mut full_since: Option<Instant> = None;
        let waited = |full_since: Option<Instant>| {
            if let Some(since) = full_since {
                self.counters.waited(since.elapsed());
            }
        };
        loop {
            let pushed = {
                let _results = self.lock_results();
                if !still_wanted() {
                    log::debug!("irq {irq} of zone {zone}: dropped, its device was reset");
                    waited(full_since);
                    return false;
                }
                push_result(self.port.bridge(), result)
            };
            if let Err(error) = self.port.finish_request() {
                warn!("FINISH_REQ for irq {irq} of zone {zone} failed: {error}");
            }
            if pushed {
                waited(full_since);
                return true;
            }
            full_since.get_or_insert_with(Instant::now);
            if self.stopping.load(Ordering::Relaxed) {
                warn!("stopping: irq {irq} of zone {zone} dropped, the result ring stayed full");
                waited(full_since);
                return false;
            }
            if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                warn!("result ring full; irq {irq} of zone {zone} waits for the hypervisor");
                last_warning = Some(Instant::now());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(1));
        }
    }

    fn deassert(&self, zone: u32, irq: u32) {
        if let Err(error) = self.port.deassert_irq(zone, irq) {
            warn!("deasserting irq {irq} of zone {zone} failed: {error}");
        }
    }
}

#[derive(Default)]
struct LineState {
    status: u32,
    /// An interrupt was sent and the guest has not yet acknowledged everything: further
    /// events only set status bits (the hypervisor's per-CPU pending list is tiny).
    asserted: bool,
    /// Counts device resets: an interrupt decided before a reset is not sent after it.
    resets: u64,
}

impl LineState {
    /// Sets `bits`; returns `Some(resets)` if an interrupt must be sent, `None` if one is
    /// outstanding.
    fn raise(&mut self, bits: u32) -> Option<u64> {
        self.status |= bits;
        (!std::mem::replace(&mut self.asserted, true)).then_some(self.resets)
    }
}

/// One device's interrupt line into its zone, with the eventfds that ask for its interrupts.
pub struct InterruptLine {
    zone: u32,
    irq: u32,
    injector: Arc<Injector>,
    /// Each with the InterruptStatus bit it sets: one call eventfd per queue (INT_VRING),
    /// written by the device when it used buffers, then the configuration-change eventfd
    /// (INT_CONFIG). Read only under `state`.
    signals: Vec<(EventFd, u32)>,
    state: Mutex<LineState>,
    counters: Arc<DeviceCounters>,
}

impl InterruptLine {
    pub fn new(
        zone: u32,
        irq: u32,
        injector: Arc<Injector>,
        calls: Vec<EventFd>,
        config_change: EventFd,
        counters: Arc<DeviceCounters>,
    ) -> Self {
        let signals = calls
            .into_iter()
            .map(|call| (call, INT_VRING))
            .chain(std::iter::once((config_change, INT_CONFIG)))
            .collect();
        InterruptLine {
            zone,
            irq,
            injector,
            signals,
            state: Mutex::new(LineState::default()),
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The eventfds that ask for interrupts (each queue's call, then the configuration-change
    /// one), for the thread that waits on them.
    pub fn signals(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.signals.iter().map(|(signal, _)| signal.as_raw_fd())
    }

    /// Signal `index` of [`Self::signals`] fired: its InterruptStatus bit, if the signal is
    /// still pending. Reading it under the lock is what lets a reset drop signals from before
    /// it.
    pub fn signalled(&self, index: usize) {
        let send = {
            let mut state = self.lock();
            match self.signals.get(index) {
                Some((signal, bit)) if signal.read().is_ok() => {
                    let counters = &self.counters.line;
                    if *bit == INT_CONFIG {
                        counters.config_signals.increment();
                    } else {
                        counters.signals.increment();
                    }
                    state.raise(*bit)
                }
                // Drained by a reset in the meantime.
                _ => None,
            }
        };
        self.send(send);
    }

    /// Outside the state lock: a full result ring must not stall the guest's status reads.
    fn send(&self, decided: Option<u64>) {
        log::trace!(
            "irq {} of zone {}: send {}",
            self.irq,
            self.zone,
            decided.is_some()
        );
        if let Some(resets) = decided {
            let delivered = self
                .injector
                .inject(self.zone, self.irq, || self.lock().resets == resets);
            let counters = &self.counters.line;
            if delivered {
                counters.delivered.increment();
            } else {
                counters.dropped.increment();
            }
        }
    }

    pub fn status(&self) -> u32 {
        self.lock().status
    }

    /// InterruptAck: clears the acknowledged bits; the line drops once none is left.
    pub fn acknowledge(&self, bits: u32) {
        let mut state = self.lock();
        state.status &= !(bits & (INT_VRING | INT_CONFIG));
        if state.status == 0 && std::mem::take(&mut state.asserted) {
            self.injector.deassert(self.zone, self.irq);
        }
    }

    /// Device reset, once the device's queues are stopped (nothing signals any more): signals
    /// not yet turned into an interrupt are dropped, an interrupt decided but not yet in the
    /// result ring is not sent, and the line is clean for the next driver (virtio 1.2 2.4.1:
    /// no notification after the reset).
    pub fn reset(&self) {
        // Waits out a push in progress, which then is in the ring before the reset completes.
        let _results = self.injector.lock_results();
        let mut state = self.lock();
        for (signal, _) in &self.signals {
            // EAGAIN: nothing pending.
            let _ = signal.read();
        }
        state.status = 0;
        state.resets += 1;
        if std::mem::take(&mut state.asserted) {
            self.injector.deassert(self.zone, self.irq);
        }
    }
}
