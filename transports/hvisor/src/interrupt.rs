//! Interrupt delivery to zones: each device's InterruptStatus and line state, and the one
//! path that puts interrupts into the result ring.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::abi::DeviceRes;
use super::counters::{DeviceCounters, ResultRingCounters};
use super::poll::InterruptCue;
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
    /// Told of every interrupt posted, so the request loop polls for the driver's answer.
    cue: Arc<InterruptCue>,
    /// Interrupts waiting for room in the result ring: while there are any, a queue's worker
    /// hands its interrupt to the interrupt thread, behind them.
    waiting: AtomicUsize,
}

/// What one attempt to put an interrupt into the result ring did.
enum Push {
    Pushed,
    /// A reset made the interrupt stale; it was not sent.
    Stale,
    Full,
}

impl Injector {
    pub fn new(port: Arc<dyn HypervisorPort>, cue: Arc<InterruptCue>) -> Self {
        Injector {
            port,
            results: Mutex::new(()),
            stopping: AtomicBool::new(false),
            counters: Arc::default(),
            cue,
            waiting: AtomicUsize::new(0),
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

    /// Queues `irq` for `zone` and signals FINISH_REQ (also when the ring is full: a nudge to
    /// drain it), unless `still_wanted` (asked with the result lock held, right before the
    /// push) says a reset has made the interrupt stale.
    fn push(&self, zone: u32, irq: u32, still_wanted: &impl Fn() -> bool) -> Push {
        let pushed = {
            let _results = self.lock_results();
            if !still_wanted() {
                log::debug!("irq {irq} of zone {zone}: dropped, its device was reset");
                return Push::Stale;
            }
            push_result(
                self.port.bridge(),
                DeviceRes {
                    target_zone: zone,
                    irq_id: irq,
                },
            )
        };
        if let Err(error) = self.port.finish_request() {
            warn!("FINISH_REQ for irq {irq} of zone {zone} failed: {error}");
        }
        if !pushed {
            return Push::Full;
        }
        self.cue.interrupt_posted();
        Push::Pushed
    }

    /// [`Self::inject`] for a queue's worker, which must not wait: `None` when the result ring
    /// is full or other interrupts wait for room, so the interrupt is to be sent by the
    /// interrupt thread, after those.
    fn try_inject(&self, zone: u32, irq: u32, still_wanted: impl Fn() -> bool) -> Option<bool> {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match self.push(zone, irq, &still_wanted) {
            Push::Pushed => Some(true),
            Push::Stale => Some(false),
            Push::Full => None,
        }
    }

    /// Puts the interrupt into the result ring as [`Self::push`] does. When the ring is full it
    /// backs off with the lock released, nudging the hypervisor to drain, so register answers
    /// of other devices never wait behind it. Returns whether the interrupt went into the ring.
    fn inject(&self, zone: u32, irq: u32, still_wanted: impl Fn() -> bool) -> bool {
        let mut backoff = Duration::from_micros(1);
        let mut last_warning: Option<Instant> = None;
        // When the ring was first found full.
        let mut full_since: Option<Instant> = None;
        let delivered = loop {
            match self.push(zone, irq, &still_wanted) {
                Push::Pushed => break true,
                Push::Stale => break false,
                Push::Full => {}
            }
            if full_since.is_none() {
                full_since = Some(Instant::now());
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
            if self.stopping.load(Ordering::Relaxed) {
                warn!("stopping: irq {irq} of zone {zone} dropped, the result ring stayed full");
                break false;
            }
            if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                warn!("result ring full; irq {irq} of zone {zone} waits for the hypervisor");
                last_warning = Some(Instant::now());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(1));
        };
        if let Some(since) = full_since {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.counters.waited(since.elapsed());
        }
        delivered
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
    /// An interrupt a queue's worker decided (with `resets` as it was) but found no room for:
    /// the interrupt thread sends it.
    deferred: Option<u64>,
}

impl LineState {
    /// Sets `bits`; returns `Some(resets)` if an interrupt must be sent, `None` if one is
    /// outstanding.
    fn raise(&mut self, bits: u32) -> Option<u64> {
        self.status |= bits;
        (!std::mem::replace(&mut self.asserted, true)).then_some(self.resets)
    }
}

/// Who reads a line's call eventfds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallReader {
    /// The worker of each queue, right after the device's `handle_event` returns
    /// ([`InterruptLine::queue_signalled`]): a device in this process.
    QueueWorkers,
    /// The interrupt thread, which waits on them: a device in another process signals them.
    InterruptThread,
}

/// One device's interrupt line into its zone, with the eventfds that ask for its interrupts.
///
/// For a device in this process, a queue's call eventfd is read by the queue's worker right
/// after the device's `handle_event` returns ([`Self::queue_signalled`]), so a completion
/// becomes an interrupt on the thread that completed it, without waking another thread. The
/// interrupt thread watches what comes from elsewhere: the configuration-change eventfd,
/// `recheck`, and the call eventfds of a device in another process ([`CallReader`]).
pub struct InterruptLine {
    zone: u32,
    irq: u32,
    injector: Arc<Injector>,
    /// Each with the InterruptStatus bit it sets: one call eventfd per queue (INT_VRING),
    /// written by the device when it used buffers, then the configuration-change eventfd
    /// (INT_CONFIG). Read only under `state`.
    signals: Vec<(EventFd, u32)>,
    /// Written when a queue may have been signalled outside its worker (a device returns
    /// buffers when the driver stops a queue): the interrupt thread then reads every queue's
    /// call eventfd.
    recheck: EventFd,
    calls_read_by: CallReader,
    state: Mutex<LineState>,
    counters: Arc<DeviceCounters>,
}

impl InterruptLine {
    pub fn new(
        zone: u32,
        irq: u32,
        injector: Arc<Injector>,
        calls: Vec<EventFd>,
        calls_read_by: CallReader,
        config_change: EventFd,
        counters: Arc<DeviceCounters>,
    ) -> std::io::Result<Self> {
        let signals = calls
            .into_iter()
            .map(|call| (call, INT_VRING))
            .chain(std::iter::once((config_change, INT_CONFIG)))
            .collect();
        Ok(InterruptLine {
            zone,
            irq,
            injector,
            signals,
            recheck: EventFd::new(EFD_NONBLOCK)?,
            calls_read_by,
            state: Mutex::new(LineState::default()),
            counters,
        })
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The eventfds the interrupt thread waits on: the configuration-change one, `recheck`,
    /// then, if it reads them, each queue's call eventfd, in that order.
    pub fn interrupt_thread_signals(&self) -> Vec<RawFd> {
        let (config_change, calls) = self
            .signals
            .split_last()
            .expect("a line has its configuration-change signal");
        let mut signals = vec![config_change.0.as_raw_fd(), self.recheck.as_raw_fd()];
        if self.calls_read_by == CallReader::InterruptThread {
            signals.extend(calls.iter().map(|(call, _)| call.as_raw_fd()));
        }
        signals
    }

    /// The interrupt thread saw signal `index` of [`Self::interrupt_thread_signals`].
    pub fn interrupt_thread_signalled(&self, index: usize) {
        let queues = self.signals.len() - 1;
        match index {
            0 => return self.signalled(queues),
            1 => {}
            call => return self.signalled(call - 2),
        }
        // Drained first: a recheck asked for meanwhile comes round again.
        let _ = self.recheck.read();
        let deferred = self.lock().deferred.take();
        self.send(deferred);
        for queue in 0..queues {
            self.signalled(queue);
        }
    }

    /// After the device ran outside the queues' workers in a way that may have signalled a
    /// queue: lets the interrupt thread take those signals, so this thread does not wait for
    /// room in the result ring.
    pub fn request_recheck(&self) {
        if let Err(error) = self.recheck.write(1) {
            warn!(
                "irq {} of zone {}: cannot ask for a recheck of the queues' signals: {error}",
                self.irq, self.zone
            );
        }
    }

    /// Called by the worker of `queue` once the device has handled its events: the queue's
    /// used buffers become an interrupt here if the device signalled them. A worker never
    /// waits for room in the result ring (its device's data path, and a reset, would wait
    /// with it): a full ring hands the interrupt to the interrupt thread.
    pub fn queue_signalled(&self, queue: usize) {
        if queue + 1 >= self.signals.len() {
            return;
        }
        let Some(resets) = self.take_signal(queue) else {
            return;
        };
        let still_wanted = || self.lock().resets == resets;
        match self.injector.try_inject(self.zone, self.irq, still_wanted) {
            Some(delivered) => self.count_sent(delivered),
            None => {
                self.lock().deferred = Some(resets);
                self.request_recheck();
            }
        }
    }

    /// Signal `index` of `signals` fired, or may have: sends its interrupt, waiting for room
    /// in the result ring if need be.
    fn signalled(&self, index: usize) {
        let decided = self.take_signal(index);
        self.send(decided);
    }

    /// Takes signal `index` if it is pending (a read that finds nothing costs one system call)
    /// and sets its InterruptStatus bit; `Some(resets)` when an interrupt must be sent.
    /// Reading it under the lock is what lets a reset drop signals from before it.
    fn take_signal(&self, index: usize) -> Option<u64> {
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
    }

    fn count_sent(&self, delivered: bool) {
        let counters = &self.counters.line;
        if delivered {
            counters.delivered.increment();
        } else {
            counters.dropped.increment();
        }
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
            self.count_sent(delivered);
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
        if state.deferred.take().is_some() {
            self.counters.line.dropped.increment();
        }
        if std::mem::take(&mut state.asserted) {
            self.injector.deassert(self.zone, self.irq);
        }
    }
}
