//! The device side of a backend in this process: any `VhostUserBackend` of the device crates.
//!
//! It builds one `VringRwLock` per queue from the register values and runs the backend's
//! `handle_event` on worker threads the way vhost-user-backend does (one thread per
//! `queues_per_thread` mask). QueueNotify is offered to the device first, to serve on the
//! request loop's thread (see [`LocalDevice::kick`]); what the device leaves goes to the queue's
//! worker through its kick eventfd. The backend's signal on the call eventfd becomes INT_VRING
//! and an interrupt, raised by the thread that completed the buffers (see [`super::interrupt`]).
//!
//! A queue the device stopped because the driver broke its ring (an avail index more than the
//! ring's size ahead) sets DEVICE_NEEDS_RESET.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use hvisor_vhost_core::queue::{FaultHandler, QueueFault};
use hvisor_vhost_core::{EventRegistry, InlineKick, VirtioDevice};

use super::counters::DeviceCounters;
use super::interrupt::{CallReader, Injector, InterruptLine};
use super::mmio::{DeviceSide, NeedsReset, QueueRegisters};

/// Raises DEVICE_NEEDS_RESET on the first fault since the last reset.
///
/// Runs on the queue's worker, inside its batch: a reset waits for that batch (`stop_vring`)
/// before it clears the bit and drains the signal with the line's others, so no stale
/// configuration-change interrupt follows the reset.
fn needs_reset_on_fault(name: String, needs_reset: Arc<NeedsReset>) -> FaultHandler {
    Arc::new(move |fault: &QueueFault| {
        needs_reset.raise(&name, format_args!("{fault}"));
    })
}

/// An inline round that takes longer than this (the request loop was preempted, or the copies
/// were large) keeps the loop from other vCPUs' accesses for too long: kicks go to the
/// workers for [`INLINE_PAUSE`] then.
const INLINE_ROUND_LIMIT: Duration = Duration::from_micros(250);
const INLINE_PAUSE: Duration = Duration::from_millis(10);

/// A backend of this process behind virtio-mmio.
pub struct LocalDevice<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    name: String,
    backend: B,
    vrings: Vec<VringRwLock>,
    kicks: Vec<Arc<EventFd>>,
    line: Arc<InterruptLine>,
    workers: Vec<(EventFd, JoinHandle<()>)>,
    /// Set from a worker thread by [`needs_reset_on_fault`].
    needs_reset: Arc<NeedsReset>,
    counters: Arc<DeviceCounters>,
    /// Until when kicks skip inline service (see [`INLINE_ROUND_LIMIT`]).
    inline_paused_until: Option<Instant>,
}

impl<B> LocalDevice<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    /// Sets up the queues, their interrupt line (`irq` of `zone`) and the worker threads.
    pub fn new(
        name: String,
        backend: B,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        (zone, irq): (u32, u32),
        injector: Arc<Injector>,
    ) -> std::io::Result<Self> {
        backend.update_memory(memory.clone())?;
        let num_queues = backend.num_queues();
        let max_size = u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX);
        let mut vrings = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..num_queues {
            let vring =
                VringRwLock::new(memory.clone(), max_size).map_err(std::io::Error::other)?;
            let call = EventFd::new(EFD_NONBLOCK)?;
            // SAFETY: the descriptor is a fresh duplicate that the File alone owns.
            let call_for_vring =
                unsafe { std::fs::File::from_raw_fd(call.try_clone()?.into_raw_fd()) };
            vring.set_call(Some(call_for_vring));
            vrings.push(vring);
            kicks.push(Arc::new(EventFd::new(EFD_NONBLOCK)?));
            calls.push(call);
        }
        let counters = Arc::new(DeviceCounters::new(
            num_queues,
            backend.queues_per_thread().len(),
        ));
        backend.count_chains(counters.queues.clone())?;
        let config_change = EventFd::new(EFD_NONBLOCK)?;
        let needs_reset = Arc::new(NeedsReset::new(config_change.try_clone()?));
        backend.set_fault_handler(needs_reset_on_fault(name.clone(), needs_reset.clone()));
        let line = Arc::new(InterruptLine::new(
            zone,
            irq,
            injector,
            calls,
            CallReader::QueueWorkers,
            config_change,
            counters.clone(),
        )?);
        let mut device = LocalDevice {
            name,
            backend,
            vrings,
            kicks,
            line,
            workers: Vec::new(),
            needs_reset,
            counters,
            inline_paused_until: None,
        };
        device.start_workers()?;
        Ok(device)
    }

    /// One thread per `queues_per_thread` mask, each waiting on the kicks of its queues.
    fn start_workers(&mut self) -> std::io::Result<()> {
        for (thread_id, mask) in self.backend.queues_per_thread().into_iter().enumerate() {
            let queues: Vec<usize> = (0..self.vrings.len())
                .filter(|&queue| mask >> queue & 1 == 1)
                .collect();
            let exit = EventFd::new(EFD_NONBLOCK)?;
            let registry = Arc::new(WorkerRegistry {
                epoll: Epoll::new()?,
                num_queues: self.vrings.len() as u64,
            });
            let worker = QueueWorker {
                name: self.name.clone(),
                backend: self.backend.clone(),
                thread_id,
                vrings: queues
                    .iter()
                    .map(|&queue| self.vrings[queue].clone())
                    .collect(),
                kicks: queues
                    .iter()
                    .map(|&queue| self.kicks[queue].clone())
                    .collect(),
                line: self.line.clone(),
                queues,
                exit: exit.try_clone()?,
                registry: registry.clone(),
                counters: self.counters.clone(),
            };
            self.backend.attach_event_registry(thread_id, registry)?;
            let handle = std::thread::Builder::new()
                .name(format!("{}-q{thread_id}", self.name))
                .spawn(move || worker.run())?;
            self.workers.push((exit, handle));
        }
        Ok(())
    }

    /// Hands queue `index` to its worker through the queue's kick eventfd.
    fn wake_worker(&self, index: usize) {
        if let Err(error) = self.kicks[index].write(1) {
            error!("{}: kicking queue {index}: {error}", self.name);
        }
    }
}

impl<B> DeviceSide for LocalDevice<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    fn device_id(&self) -> u32 {
        self.backend.device_type()
    }

    fn features(&self) -> u64 {
        self.backend.features()
    }

    fn num_queues(&self) -> usize {
        self.vrings.len()
    }

    fn max_queue_size(&self) -> u16 {
        u16::try_from(self.backend.max_queue_size()).unwrap_or(u16::MAX)
    }

    fn line(&self) -> &Arc<InterruptLine> {
        &self.line
    }

    fn needs_reset(&self) -> &NeedsReset {
        &self.needs_reset
    }

    fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    fn read_config(&mut self, offset: u32, size: u8) -> Result<u64, String> {
        let bytes = self.backend.get_config(offset, u32::from(size));
        let mut value = [0u8; 8];
        let len = bytes.len().min(usize::from(size));
        value[..len].copy_from_slice(&bytes[..len]);
        Ok(u64::from_le_bytes(value))
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        self.backend
            .set_config(offset, data)
            .map_err(|error| error.to_string())
    }

    fn accept_features(&mut self, features: u64) {
        self.backend.acked_features(features);
        self.backend
            .set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
    }

    fn enable_queue(
        &mut self,
        index: usize,
        queue: QueueRegisters,
        driver_features: u64,
        live: bool,
    ) -> Result<(), String> {
        let vring = &self.vrings[index];
        vring.set_queue_size(queue.num);
        vring
            .set_queue_info(queue.desc, queue.avail, queue.used)
            .map_err(|error| format!("{error:?}"))?;
        vring.set_queue_event_idx(driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        vring.set_queue_next_avail(0);
        vring.set_queue_next_used(0);
        vring.set_queue_ready(true);
        // Live only from DRIVER_OK on; until then neither kicks nor the device's own events
        // (input on a console or TAP) use the queue.
        vring.set_enabled(live);
        Ok(())
    }

    fn disable_queue(&mut self, index: usize, was_ready: bool) {
        let vring = &self.vrings[index];
        vring.set_enabled(false);
        vring.set_queue_ready(false);
        if let Err(error) = self.backend.stop_vring(index as u32) {
            warn!("{}: stopping queue {index}: {error}", self.name);
        }
        // Stopping a live queue may have returned buffers (the console's pending transmit
        // chain) and signalled them here rather than on the queue's worker.
        if was_ready {
            self.line.request_recheck();
        }
    }

    fn start_queue(&mut self, index: usize) {
        self.vrings[index].set_enabled(true);
        self.wake_worker(index);
    }

    /// Offers the kick to the device to serve right here: the request loop is awake, the
    /// queue's worker most likely asleep, and waking it costs more than a page-cache request
    /// (ring-bench --pin, 64 KiB write + read-back: 88 -> 40 us per request). What the device
    /// leaves, the worker serves.
    fn kick(&mut self, index: usize) {
        log::trace!("{}: kick queue {index}", self.name);
        let paused = self
            .inline_paused_until
            .is_some_and(|until| Instant::now() < until);
        let outcome = if paused {
            InlineKick::Unserved
        } else {
            let started = Instant::now();
            let outcome = self.backend.serve_kick_inline(index, &self.vrings[index]);
            if started.elapsed() > INLINE_ROUND_LIMIT {
                self.counters.registers.inline_pauses.increment();
                self.inline_paused_until = Some(Instant::now() + INLINE_PAUSE);
            }
            outcome
        };
        let registers = &self.counters.registers;
        match outcome {
            InlineKick::Served => registers.inline_kicks.increment(),
            InlineKick::WorkerBusy => registers.busy_worker_kicks.increment(),
            InlineKick::HandedOver | InlineKick::Unserved => {}
        }
        if matches!(outcome, InlineKick::Served | InlineKick::HandedOver) {
            self.line.queue_signalled(index);
        }
        if outcome != InlineKick::Served {
            self.wake_worker(index);
        }
    }

    fn reset(&mut self) {
        self.backend.reset_device();
        // After the queues stopped: their workers, the only ones to set it, are done.
        self.needs_reset.clear();
    }

    fn shutdown(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        // A worker ends its batch at its next chain then, even on rings the driver laid out so
        // that each completion publishes another request.
        for vring in &self.vrings {
            vring.set_queue_ready(false);
        }
        for (exit, handle) in self.workers.drain(..) {
            if let Err(error) = exit.write(1) {
                error!("{}: cannot stop a queue worker: {error}", self.name);
                continue;
            }
            if handle.join().is_err() {
                error!("{}: a queue worker panicked", self.name);
            }
        }
        // A worker may have exited before it took an inline round's hand-over: its requests
        // end here, before the zone's memory is unmapped under them.
        for index in 0..self.vrings.len() {
            if let Err(error) = self.backend.stop_vring(index as u32) {
                warn!("{}: stopping queue {index}: {error}", self.name);
            }
        }
        info!("{}: stopped", self.name);
    }
}

impl<B> Drop for LocalDevice<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One worker thread's wait set, which the device may extend with its own descriptors.
struct WorkerRegistry {
    epoll: Epoll,
    num_queues: u64,
}

impl WorkerRegistry {
    fn control(
        &self,
        operation: ControlOperation,
        fd: RawFd,
        events: EventSet,
        data: u64,
    ) -> std::io::Result<()> {
        // Lower values name queues and the exit event, as in vhost-user-backend.
        if data <= self.num_queues {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.epoll.ctl(operation, fd, EpollEvent::new(events, data))
    }
}

impl EventRegistry for WorkerRegistry {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> std::io::Result<()> {
        self.control(ControlOperation::Add, fd, events, data)
    }

    fn unregister(&self, fd: RawFd, events: EventSet, data: u64) -> std::io::Result<()> {
        self.control(ControlOperation::Delete, fd, events, data)
    }
}

/// A worker thread: waits on its queues' kicks and the device's own descriptors, and runs the
/// backend's `handle_event` for each.
struct QueueWorker<B> {
    name: String,
    backend: B,
    thread_id: usize,
    vrings: Vec<VringRwLock>,
    kicks: Vec<Arc<EventFd>>,
    /// The device's interrupt line, and the device's indices of this thread's queues.
    line: Arc<InterruptLine>,
    queues: Vec<usize>,
    exit: EventFd,
    registry: Arc<WorkerRegistry>,
    counters: Arc<DeviceCounters>,
}

impl<B> QueueWorker<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()>,
{
    fn run(self) {
        if let Err(error) = self.serve() {
            error!(
                "{}: queue worker {} failed: {error}",
                self.name, self.thread_id
            );
        }
    }

    fn serve(&self) -> std::io::Result<()> {
        let epoll = &self.registry.epoll;
        // Queue kicks use their position in this thread; the exit event uses `num_queues`,
        // which devices may not use; device descriptors use values above it.
        let exit_token = self.registry.num_queues;
        for (position, kick) in self.kicks.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, position as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, exit_token),
        )?;
        let mut events = vec![EpollEvent::default(); 32];
        let counters = &self.counters.workers[self.thread_id];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            counters.wakeups.increment();
            let mut exit = false;
            for event in &events[..ready] {
                let token = event.data();
                if token == exit_token {
                    exit = true;
                    break;
                }
                if let Some(kick) = self.kicks.get(token as usize) {
                    // Drained before serving, so a kick that arrives meanwhile wakes us again.
                    let _ = kick.read();
                    if !self.vrings[token as usize].get_ref().is_enabled() {
                        continue;
                    }
                }
                let Some(events) = EventSet::from_bits(event.events) else {
                    continue;
                };
                if let Err(error) =
                    self.backend
                        .handle_event(token as u16, events, &self.vrings, self.thread_id)
                {
                    counters.event_errors.increment();
                    error!("{}: event {token} failed: {error}", self.name);
                }
            }
            // The interrupt for what the device just completed, raised by this thread rather
            // than by waking another one.
            for &queue in &self.queues {
                self.line.queue_signalled(queue);
            }
            if exit {
                return Ok(());
            }
        }
    }
}
