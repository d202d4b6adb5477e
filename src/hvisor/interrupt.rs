//! Interrupt delivery to zones: each device's InterruptStatus and line state, and the one
//! path that puts interrupts into the result ring.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;

use super::abi::DeviceRes;
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
}

impl Injector {
    pub fn new(port: Arc<dyn HypervisorPort>) -> Self {
        Injector {
            port,
            results: Mutex::new(()),
            stopping: AtomicBool::new(false),
        }
    }

    /// Makes `inject` give up instead of waiting for room, so the daemon can stop while the
    /// hypervisor side no longer drains the result ring.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn lock_results(&self) -> MutexGuard<'_, ()> {
        self.results
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `irq` for `zone` and signals FINISH_REQ. When the result ring is full it backs
    /// off with the lock released, nudging the hypervisor to drain, so register answers of
    /// other devices never wait behind it.
    pub fn inject(&self, zone: u32, irq: u32) {
        let result = DeviceRes {
            target_zone: zone,
            irq_id: irq,
        };
        let mut backoff = Duration::from_micros(1);
        let mut last_warning: Option<Instant> = None;
        loop {
            let pushed = {
                let _results = self.lock_results();
                push_result(self.port.bridge(), result)
            };
            if let Err(error) = self.port.finish_request() {
                warn!("FINISH_REQ for irq {irq} of zone {zone} failed: {error}");
            }
            if pushed {
                return;
            }
            if self.stopping.load(Ordering::Relaxed) {
                warn!("stopping: irq {irq} of zone {zone} dropped, the result ring stayed full");
                return;
            }
            if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                warn!("result ring full; irq {irq} of zone {zone} waits for the hypervisor");
                last_warning = Some(Instant::now());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(1));
        }
    }

    pub fn deassert(&self, zone: u32, irq: u32) {
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
}

/// One device's interrupt line into its zone.
pub struct InterruptLine {
    zone: u32,
    irq: u32,
    injector: Arc<Injector>,
    state: Mutex<LineState>,
}

impl InterruptLine {
    pub fn new(zone: u32, irq: u32, injector: Arc<Injector>) -> Self {
        InterruptLine {
            zone,
            irq,
            injector,
            state: Mutex::new(LineState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets `bits` in InterruptStatus and sends an interrupt unless one is outstanding.
    pub fn raise(&self, bits: u32) {
        let send = {
            let mut state = self.lock();
            state.status |= bits;
            !std::mem::replace(&mut state.asserted, true)
        };
        // Outside the lock: a full result ring must not stall the guest's status reads.
        log::trace!(
            "irq {} of zone {}: raise {bits:#x}, send {send}",
            self.irq,
            self.zone
        );
        if send {
            self.injector.inject(self.zone, self.irq);
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

    /// Device reset: no interrupt pending any more.
    pub fn reset(&self) {
        let mut state = self.lock();
        state.status = 0;
        if std::mem::take(&mut state.asserted) {
            self.injector.deassert(self.zone, self.irq);
        }
    }
}
