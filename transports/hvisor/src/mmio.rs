//! virtio-mmio version 2 (virtio 1.2, section 4.2.2) in front of any `VhostUserBackend`.
//!
//! The register file runs on the request-loop thread. It builds one `VringRwLock` per queue
//! from the register values, negotiates features through the backend, and runs the backend's
//! `handle_event` on worker threads the way vhost-user-backend does (one thread per
//! `queues_per_thread` mask). QueueNotify writes the queue's kick eventfd; the backend's
//! signal on the call eventfd becomes INT_VRING and an interrupt (see [`super::interrupt`]).
//!
//! Compared with hvisor-tool's C daemon: feature words are assigned and cleared on reset,
//! QueueSel is bounds checked, queue sizes are validated, address halves are stored without
//! OR-ing stale bits, config accesses are bounded and masked to their size, and config
//! writes reach the device.
//!
//! A queue the device stopped because the driver broke its ring (an avail index more than the
//! ring's size ahead) sets DEVICE_NEEDS_RESET in Status with one configuration-change
//! interrupt (virtio 1.2, 2.1.2); the bit stays set until the driver resets the device.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use hvisor_vhost_core::log_limit::LogLimiter;
use hvisor_vhost_core::queue::{FaultHandler, QueueFault};
use hvisor_vhost_core::{EventRegistry, VirtioDevice};

use super::counters::DeviceCounters;
use super::interrupt::{Injector, InterruptLine};

pub const MAGIC_VALUE: u32 = 0x7472_6976;
pub const VERSION: u32 = 2;
/// "HVIS", as hvisor-tool reports.
pub const VENDOR_ID: u32 = 0x4856_4953;

/// Register offsets (virtio 1.2, 4.2.2).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Feature bits that belong to vhost-user, not to virtio, and are never offered here.
const TRANSPORT_ONLY_FEATURES: u64 =
    VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | 1 << VIRTIO_F_ACCESS_PLATFORM;

/// A device's registers, as the request loop sees them (type-erased over the backend).
pub trait MmioRegisters: Send {
    /// Reads `size` bytes at `offset` into the window; the value is masked to `size`.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    fn write(&mut self, offset: u64, size: u8, value: u64);
    /// Stops the worker threads after their current batch.
    fn shutdown(&mut self);
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueRegisters {
    num: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn set_low(target: &mut u64, value: u32) {
    *target = (*target & !0xffff_ffff) | u64::from(value);
}

fn set_high(target: &mut u64, value: u32) {
    *target = (*target & 0xffff_ffff) | u64::from(value) << 32;
}

fn size_mask(size: u8) -> u64 {
    match size {
        8 => u64::MAX,
        size => (1u64 << (u32::from(size) * 8)) - 1,
    }
}

/// One virtio-mmio device serving `backend`.
pub struct MmioDevice<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    name: String,
    device_id: u32,
    backend: B,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    vrings: Vec<VringRwLock>,
    kicks: Vec<Arc<EventFd>>,
    line: Arc<InterruptLine>,
    workers: Vec<(EventFd, JoinHandle<()>)>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    status: u32,
    /// DEVICE_NEEDS_RESET, set from a worker thread by [`needs_reset_on_fault`].
    needs_reset: Arc<AtomicBool>,
    config_generation: u32,
    mistakes: GuestMistakes,
    counters: Arc<DeviceCounters>,
}

/// Mistakes a driver can repeat at will: each kind is logged at most once a second per device.
struct GuestMistakes {
    early_notify: LogLimiter,
    notify: LogLimiter,
    status: LogLimiter,
}

impl GuestMistakes {
    fn new() -> Self {
        let limiter = || LogLimiter::new(module_path!(), Duration::from_secs(1));
        GuestMistakes {
            early_notify: limiter(),
            notify: limiter(),
            status: limiter(),
        }
    }
}

/// Sets DEVICE_NEEDS_RESET and signals a configuration change (INT_CONFIG, through the
/// interrupt thread, so the worker never waits for room in the result ring) on the first fault
/// since the last reset.
///
/// Runs on the queue's worker, inside its batch: a reset waits for that batch (`stop_vring`)
/// before it clears the bit and drains the signal with the line's others, so no stale
/// configuration-change interrupt follows the reset.
fn needs_reset_on_fault(
    name: String,
    needs_reset: Arc<AtomicBool>,
    config_change: EventFd,
) -> FaultHandler {
    Arc::new(move |fault: &QueueFault| {
        // Relaxed: the driver learns of the bit through INT_CONFIG, which the interrupt thread
        // raises only after reading the eventfd written below (the kernel orders the two), and
        // the line's lock orders INT_CONFIG before the driver's Status read.
        if needs_reset.swap(true, Ordering::Relaxed) {
            return;
        }
        warn!("{name}: {fault}: DEVICE_NEEDS_RESET set, configuration-change interrupt sent");
        if let Err(error) = config_change.write(1) {
            error!("{name}: cannot signal the configuration change: {error}");
        }
    })
}

impl<B> MmioDevice<B>
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
        let needs_reset = Arc::new(AtomicBool::new(false));
        let config_change = EventFd::new(EFD_NONBLOCK)?;
        backend.set_fault_handler(needs_reset_on_fault(
            name.clone(),
            needs_reset.clone(),
            config_change.try_clone()?,
        ));
        let mut device = MmioDevice {
            name,
            device_id: backend.device_type(),
            backend,
            memory,
            vrings,
            kicks,
            line: Arc::new(InterruptLine::new(
                zone,
                irq,
                injector,
                calls,
                config_change,
                counters.clone(),
            )),
            workers: Vec::new(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegisters::default(); num_queues],
            status: 0,
            needs_reset,
            config_generation: 0,
            mistakes: GuestMistakes::new(),
            counters,
        };
        device.start_workers()?;
        Ok(device)
    }

    /// The device's interrupt line, whose call eventfds the interrupt thread watches.
    pub fn line(&self) -> &Arc<InterruptLine> {
        &self.line
    }

    pub fn counters(&self) -> &Arc<DeviceCounters> {
        &self.counters
    }

    /// Counts a register access refused or ignored as the driver's mistake (each logged).
    fn refused(&self) {
        self.counters.registers.refused.increment();
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

    fn offered_features(&self) -> u64 {
        self.backend.features() & !TRANSPORT_ONLY_FEATURES
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = self.queue_sel as usize;
        (index < self.queues.len()).then_some(index)
    }

    fn config_read(&self, offset: u64, size: u8) -> u64 {
        let Ok(offset) = u32::try_from(offset) else {
            return 0;
        };
        let bytes = self.backend.get_config(offset, u32::from(size));
        let mut value = [0u8; 8];
        let len = bytes.len().min(usize::from(size));
        value[..len].copy_from_slice(&bytes[..len]);
        u64::from_le_bytes(value)
    }

    fn config_write(&mut self, offset: u64, size: u8, value: u64) {
        let bytes = value.to_le_bytes();
        let result = u32::try_from(offset)
            .map_err(std::io::Error::other)
            .and_then(|offset| self.backend.set_config(offset, &bytes[..usize::from(size)]));
        match result {
            Ok(()) => self.config_generation = self.config_generation.wrapping_add(1),
            Err(error) => {
                self.refused();
                warn!(
                    "{}: config write of {size} bytes at {offset:#x} refused: {error}",
                    self.name
                );
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set (a driver writing back what it read).
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let cleared = self.status & !value;
        if cleared != 0 {
            self.refused();
            self.mistakes.status.warn(format_args!(
                "{}: Status {value:#x} would clear bits {cleared:#x}; only a reset (0) clears \
                 them, so they stay set",
                self.name
            ));
        }
        let mut status = self.status | value;
        let newly_features_ok = status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if newly_features_ok {
            let offered = self.offered_features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                self.refused();
                warn!(
                    "{}: driver features {:#x} refused (not offered: {unknown:#x}; VERSION_1 is \
                     required); FEATURES_OK stays clear",
                    self.name, self.driver_features
                );
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                self.backend.acked_features(self.driver_features);
                self.backend
                    .set_event_idx(self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
                debug!(
                    "{}: features {:#x} accepted",
                    self.name, self.driver_features
                );
            }
        }
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            self.refused();
            self.mistakes.status.warn(format_args!(
                "{}: DRIVER_OK without negotiated features (FEATURES_OK is clear); DRIVER_OK \
                 stays clear and the queues stay stopped",
                self.name
            ));
            status &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        let was_live = self.driver_ok();
        self.status = status;
        if !was_live && self.driver_ok() {
            self.start_queues();
        }
    }

    /// DRIVER_OK after negotiated features: only then may the device use its queues (virtio
    /// 1.2, 2.1.2 and 3.1.1).
    fn driver_ok(&self) -> bool {
        let live = VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        self.status & live == live
    }

    /// At DRIVER_OK: the ready queues go live, and each is kicked once, so that buffers the
    /// driver made available before (and any notify it sent too early) are served now.
    fn start_queues(&self) {
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready {
                self.vrings[index].set_enabled(true);
                self.kick(index);
            }
        }
    }

    fn kick(&self, index: usize) {
        log::trace!("{}: kick queue {index}", self.name);
        if let Err(error) = self.kicks[index].write(1) {
            error!("{}: kicking queue {index}: {error}", self.name);
        }
    }

    fn features_locked(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Device reset (Status = 0): queues stopped and cleared (stopping a queue waits for its
    /// worker's batch in flight), features forgotten, the backend reset, and then the interrupt
    /// line cleaned: nothing the old driver caused reaches the guest after the reset.
    fn reset(&mut self) {
        for index in 0..self.queues.len() {
            self.disable_queue(index);
        }
        self.queues.fill(QueueRegisters::default());
        self.backend.reset_device();
        // After the queues stopped: their workers, the only ones to set it, are done.
        self.needs_reset.store(false, Ordering::Relaxed);
        self.line.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        debug!("{}: reset", self.name);
    }

    fn disable_queue(&mut self, index: usize) {
        let vring = &self.vrings[index];
        vring.set_enabled(false);
        vring.set_queue_ready(false);
        if let Err(error) = self.backend.stop_vring(index as u32) {
            warn!("{}: stopping queue {index}: {error}", self.name);
        }
        self.queues[index].ready = false;
    }

    fn enable_queue(&mut self, index: usize) {
        let registers = self.queues[index];
        let max = self.backend.max_queue_size();
        if registers.num == 0
            || !registers.num.is_power_of_two()
            || usize::from(registers.num) > max
        {
            self.refused();
            error!(
                "{}: queue {index}: QueueNum {} is not a power of two in 1..={max}; QueueReady \
                 refused",
                self.name, registers.num
            );
            return;
        }
        let vring = &self.vrings[index];
        vring.set_queue_size(registers.num);
        if let Err(error) = vring.set_queue_info(registers.desc, registers.avail, registers.used) {
            self.refused();
            error!(
                "{}: queue {index}: ring addresses desc {:#x} avail {:#x} used {:#x} are \
                 misaligned ({error:?}); QueueReady refused",
                self.name, registers.desc, registers.avail, registers.used
            );
            return;
        }
        vring.set_queue_event_idx(self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        vring.set_queue_next_avail(0);
        vring.set_queue_next_used(0);
        vring.set_queue_ready(true);
        let valid = vring.get_ref().get_queue().is_valid(&*self.memory.memory());
        if !valid {
            vring.set_queue_ready(false);
            self.refused();
            error!(
                "{}: queue {index}: rings of {} entries at desc {:#x} avail {:#x} used {:#x} are \
                 not inside zone RAM; QueueReady refused",
                self.name, registers.num, registers.desc, registers.avail, registers.used
            );
            return;
        }
        // Live only from DRIVER_OK on; until then neither kicks nor the device's own events
        // (input on a console or TAP) use the queue.
        vring.set_enabled(self.driver_ok());
        self.queues[index].ready = true;
        debug!(
            "{}: queue {index} ready with {} entries",
            self.name, registers.num
        );
    }

    fn notify(&self, value: u64) {
        let index = usize::try_from(value).unwrap_or(usize::MAX);
        match self.queues.get(index) {
            Some(queue) if queue.ready && self.driver_ok() => {
                self.counters.registers.notifies.increment();
                self.kick(index);
            }
            Some(queue) if queue.ready => {
                self.refused();
                self.mistakes.early_notify.warn(format_args!(
                    "{}: QueueNotify for queue {value} before DRIVER_OK; its buffers are \
                     served once the driver sets DRIVER_OK",
                    self.name
                ));
            }
            _ => {
                self.refused();
                self.mistakes.notify.warn(format_args!(
                    "{}: QueueNotify for queue {value}, which is not ready",
                    self.name
                ));
            }
        }
    }

    fn queue_register(&mut self, offset: u64, value: u32) {
        let Some(index) = self.selected_queue() else {
            self.refused();
            warn!(
                "{}: write to queue register {offset:#x} with QueueSel {} out of range; ignored",
                self.name, self.queue_sel
            );
            return;
        };
        if offset == reg::QUEUE_READY {
            match (value != 0, self.queues[index].ready) {
                (true, false) => self.enable_queue(index),
                (false, true) => self.disable_queue(index),
                _ => {}
            }
            return;
        }
        if self.queues[index].ready {
            self.refused();
            warn!(
                "{}: queue {index}: register {offset:#x} written while the queue is ready; ignored",
                self.name
            );
            return;
        }
        let queue = &mut self.queues[index];
        match offset {
            reg::QUEUE_NUM => queue.num = u16::try_from(value).unwrap_or(0),
            reg::QUEUE_DESC_LOW => set_low(&mut queue.desc, value),
            reg::QUEUE_DESC_HIGH => set_high(&mut queue.desc, value),
            reg::QUEUE_AVAIL_LOW => set_low(&mut queue.avail, value),
            reg::QUEUE_AVAIL_HIGH => set_high(&mut queue.avail, value),
            reg::QUEUE_USED_LOW => set_low(&mut queue.used, value),
            reg::QUEUE_USED_HIGH => set_high(&mut queue.used, value),
            _ => unreachable!("only queue registers are routed here"),
        }
    }

    fn register_read(&self, offset: u64) -> Option<u32> {
        let queue = self.selected_queue().map(|index| self.queues[index]);
        let feature_word = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        Some(match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => feature_word(self.offered_features(), self.device_features_sel),
            reg::DEVICE_FEATURES_SEL => self.device_features_sel,
            reg::DRIVER_FEATURES => feature_word(self.driver_features, self.driver_features_sel),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel,
            reg::QUEUE_SEL => self.queue_sel,
            reg::QUEUE_NUM_MAX => queue.map_or(0, |_| self.backend.max_queue_size() as u32),
            reg::QUEUE_NUM => queue.map_or(0, |queue| u32::from(queue.num)),
            reg::QUEUE_READY => queue.map_or(0, |queue| u32::from(queue.ready)),
            reg::INTERRUPT_STATUS => self.line.status(),
            reg::STATUS if self.needs_reset.load(Ordering::Relaxed) => {
                self.status | VIRTIO_CONFIG_S_NEEDS_RESET
            }
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW => queue.map_or(0, |queue| queue.desc as u32),
            reg::QUEUE_DESC_HIGH => queue.map_or(0, |queue| (queue.desc >> 32) as u32),
            reg::QUEUE_AVAIL_LOW => queue.map_or(0, |queue| queue.avail as u32),
            reg::QUEUE_AVAIL_HIGH => queue.map_or(0, |queue| (queue.avail >> 32) as u32),
            reg::QUEUE_USED_LOW => queue.map_or(0, |queue| queue.used as u32),
            reg::QUEUE_USED_HIGH => queue.map_or(0, |queue| (queue.used >> 32) as u32),
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => return None,
        })
    }

    fn register_write(&mut self, offset: u64, value: u32) -> bool {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.features_locked() => {
                self.refused();
                warn!(
                    "{}: DriverFeatures written after FEATURES_OK; ignored",
                    self.name
                );
            }
            reg::DRIVER_FEATURES => match self.driver_features_sel {
                0 => set_low(&mut self.driver_features, value),
                1 => set_high(&mut self.driver_features, value),
                select => {
                    self.refused();
                    warn!(
                        "{}: DriverFeatures word {select} does not exist; ignored",
                        self.name
                    );
                }
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.queue_register(offset, value),
            reg::QUEUE_NOTIFY => self.notify(u64::from(value)),
            reg::INTERRUPT_ACK => self.line.acknowledge(value),
            reg::STATUS => self.set_status(value),
            reg::SHM_SEL => {}
            _ => return false,
        }
        true
    }
}

impl<B> MmioRegisters for MmioDevice<B>
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.counters.registers.reads.increment();
        if offset >= reg::CONFIG {
            return self.config_read(offset - reg::CONFIG, size) & size_mask(size);
        }
        if size != 4 || offset % 4 != 0 {
            self.refused();
            warn!(
                "{}: {size}-byte read of register {offset:#x}: registers are 4-byte aligned \
                 words; answered 0",
                self.name
            );
            return 0;
        }
        self.register_read(offset).map_or_else(
            || {
                self.refused();
                warn!(
                    "{}: read of unknown or write-only register {offset:#x}; answered 0",
                    self.name
                );
                0
            },
            u64::from,
        )
    }

    fn write(&mut self, offset: u64, size: u8, value: u64) {
        self.counters.registers.writes.increment();
        if offset >= reg::CONFIG {
            self.config_write(offset - reg::CONFIG, size, value & size_mask(size));
            return;
        }
        if size != 4 || offset % 4 != 0 {
            self.refused();
            warn!(
                "{}: {size}-byte write of {value:#x} to register {offset:#x}: registers are \
                 4-byte aligned words; ignored",
                self.name
            );
            return;
        }
        if !self.register_write(offset, value as u32) {
            self.refused();
            warn!(
                "{}: write of {value:#x} to unknown or read-only register {offset:#x}; ignored",
                self.name
            );
        }
    }

    fn shutdown(&mut self) {
        if self.workers.is_empty() {
            return;
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
        info!("{}: stopped", self.name);
    }
}

impl<B> Drop for MmioDevice<B>
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
            for event in &events[..ready] {
                let token = event.data();
                if token == exit_token {
                    return Ok(());
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_halves_replace_only_their_half() {
        let mut address = 0xdead_beef_0000_0000;
        set_low(&mut address, 0x1000);
        assert_eq!(address, 0xdead_beef_0000_1000);
        set_high(&mut address, 0x2);
        assert_eq!(address, 0x2_0000_1000);
        set_low(&mut address, 0);
        assert_eq!(address, 0x2_0000_0000);
    }

    #[test]
    fn masks_follow_the_access_size() {
        assert_eq!(size_mask(1), 0xff);
        assert_eq!(size_mask(2), 0xffff);
        assert_eq!(size_mask(4), 0xffff_ffff);
        assert_eq!(size_mask(8), u64::MAX);
    }
}
