//! virtio-mmio version 2 (virtio 1.2, section 4.2.2): the register file, in front of whatever
//! serves the device (a [`DeviceSide`]): a backend in this process ([`super::local`]) or a
//! vhost-user backend in another one ([`super::remote`]).
//!
//! The register file runs on the request-loop thread. It keeps the registers, checks what the
//! driver writes, and tells the device side only what passed: features at FEATURES_OK, a
//! queue whose rings lie in zone RAM at QueueReady, DRIVER_OK, notifies, config accesses and
//! resets.
//!
//! Compared with hvisor-tool's C daemon: feature words are assigned and cleared on reset,
//! QueueSel is bounds checked, queue sizes are validated, address halves are stored without
//! OR-ing stale bits, config accesses are bounded and masked to their size, and config
//! writes reach the device.
//!
//! A device that can no longer serve (a queue whose ring the driver broke, a vhost-user
//! backend that failed) sets DEVICE_NEEDS_RESET in Status with one configuration-change
//! interrupt (virtio 1.2, 2.1.2) through its [`NeedsReset`]; the bit stays set until the
//! driver resets the device.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{debug, error, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_ADMIN_VQ, VIRTIO_F_NOTIF_CONFIG_DATA,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use hvisor_vhost_core::log_limit::LogLimiter;

use super::counters::DeviceCounters;
use super::interrupt::InterruptLine;

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

/// Feature bits never offered to the driver, whatever the device side offers: vhost-user's own
/// bits, and virtio features this register file does not implement (no IOMMU, split rings
/// only, QueueNotify carries only the queue index, no queue reset registers, no admin or SR-IOV
/// functions).
pub const NOT_OFFERED: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | VhostUserVirtioFeatures::LOG_ALL.bits()
    | 1 << VIRTIO_F_ACCESS_PLATFORM
    | 1 << VIRTIO_F_RING_PACKED
    | 1 << VIRTIO_F_SR_IOV
    | 1 << VIRTIO_F_NOTIFICATION_DATA
    | 1 << VIRTIO_F_NOTIF_CONFIG_DATA
    | 1 << VIRTIO_F_RING_RESET
    | 1 << VIRTIO_F_ADMIN_VQ;

/// A device's registers, as the request loop sees them (type-erased over the device side).
pub trait MmioRegisters: Send {
    /// Reads `size` bytes at `offset` into the window; the value is masked to `size`.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    fn write(&mut self, offset: u64, size: u8, value: u64);
    /// Stops the device's threads after their current batch.
    fn shutdown(&mut self);
}

/// One queue's registers as the driver wrote them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegisters {
    pub num: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueRegisters {
    /// The guest-physical range of each ring of a split queue of `num` entries: descriptor
    /// table, available ring (with used_event) and used ring (with avail_event).
    pub fn ring_ranges(&self) -> [(GuestAddress, usize); 3] {
        let num = usize::from(self.num);
        [
            (GuestAddress(self.desc), 16 * num),
            (GuestAddress(self.avail), 6 + 2 * num),
            (GuestAddress(self.used), 6 + 8 * num),
        ]
    }
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

/// A device's DEVICE_NEEDS_RESET bit and the configuration-change signal that tells the driver
/// (INT_CONFIG, through the interrupt thread, so whoever raises it never waits for room in the
/// result ring).
pub struct NeedsReset {
    set: AtomicBool,
    config_change: EventFd,
}

impl NeedsReset {
    /// `config_change` is (a duplicate of) the device's interrupt line's
    /// configuration-change eventfd.
    pub fn new(config_change: EventFd) -> Self {
        NeedsReset {
            set: AtomicBool::new(false),
            config_change,
        }
    }

    /// Sets the bit and signals the configuration change, once until the next reset; logs
    /// `why` for `name` the first time. Returns whether this call set it.
    pub fn raise(&self, name: &str, why: std::fmt::Arguments) -> bool {
        // Relaxed: the driver learns of the bit through INT_CONFIG, which the interrupt thread
        // raises only after reading the eventfd written below (the kernel orders the two), and
        // the line's lock orders INT_CONFIG before the driver's Status read.
        if self.set.swap(true, Ordering::Relaxed) {
            return false;
        }
        warn!("{name}: {why}: DEVICE_NEEDS_RESET set, configuration-change interrupt sent");
        if let Err(error) = self.config_change.write(1) {
            error!("{name}: cannot signal the configuration change: {error}");
        }
        true
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    /// Device reset, once nothing that raises the bit runs any more; the interrupt line's reset
    /// that follows drops a configuration-change signal still pending.
    pub fn clear(&self) {
        self.set.store(false, Ordering::Relaxed);
    }
}

/// What serves a device behind the register file. Everything here runs on the request-loop
/// thread, so a call must not wait long: a vCPU spins until its access is answered.
pub trait DeviceSide: Send {
    /// The virtio device id in the DeviceID register.
    fn device_id(&self) -> u32;
    /// The features the device offers; [`NOT_OFFERED`] is removed before the driver sees them.
    fn features(&self) -> u64;
    fn num_queues(&self) -> usize;
    /// QueueNumMax of every queue.
    fn max_queue_size(&self) -> u16;
    /// The device's interrupt line, whose InterruptStatus the registers show.
    fn line(&self) -> &Arc<InterruptLine>;
    fn needs_reset(&self) -> &NeedsReset;
    fn counters(&self) -> &Arc<DeviceCounters>;
    /// `size` bytes of config space at `offset`, little endian; an error is answered 0.
    fn read_config(&mut self, offset: u32, size: u8) -> Result<u64, String>;
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String>;
    /// FEATURES_OK with `features`, which are a subset of the offered ones and include
    /// VERSION_1.
    fn accept_features(&mut self, features: u64);
    /// QueueReady for `index`, whose rings lie in zone RAM, aligned, with a valid size.
    /// `driver_features` as written so far; `live`: DRIVER_OK is set, so the queue may be used
    /// at once. An error refuses the queue (QueueReady stays 0) and says why.
    fn enable_queue(
        &mut self,
        index: usize,
        queue: QueueRegisters,
        driver_features: u64,
        live: bool,
    ) -> Result<(), String>;
    /// Stops queue `index` (QueueReady 0, or a reset, which stops every queue); `was_ready`
    /// whether the driver had made it ready.
    fn disable_queue(&mut self, index: usize, was_ready: bool);
    /// DRIVER_OK: ready queue `index` goes live and serves what the driver made available.
    fn start_queue(&mut self, index: usize);
    /// QueueNotify for a live queue; on the request loop's thread.
    fn kick(&mut self, index: usize);
    /// Device reset, after every queue was stopped: the device forgets its features and state
    /// and clears DEVICE_NEEDS_RESET.
    fn reset(&mut self);
    /// Stops the device's threads after their current batch.
    fn shutdown(&mut self);
}

/// One virtio-mmio device: the registers in front of `side`.
pub struct MmioDevice<D: DeviceSide> {
    name: String,
    side: D,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    status: u32,
    config_generation: u32,
    mistakes: GuestMistakes,
}

/// Mistakes a driver can repeat at will: each kind is logged at most once a second per device.
struct GuestMistakes {
    early_notify: LogLimiter,
    notify: LogLimiter,
    status: LogLimiter,
    config: LogLimiter,
}

impl GuestMistakes {
    fn new() -> Self {
        let limiter = || LogLimiter::new(module_path!(), Duration::from_secs(1));
        GuestMistakes {
            early_notify: limiter(),
            notify: limiter(),
            status: limiter(),
            config: limiter(),
        }
    }
}

impl<D: DeviceSide> MmioDevice<D> {
    /// The registers of `side`, whose queues' rings must lie in `memory`.
    pub fn new(name: String, side: D, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        let num_queues = side.num_queues();
        MmioDevice {
            name,
            side,
            memory,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegisters::default(); num_queues],
            status: 0,
            config_generation: 0,
            mistakes: GuestMistakes::new(),
        }
    }

    /// The device's interrupt line, whose signals the interrupt thread watches.
    pub fn line(&self) -> &Arc<InterruptLine> {
        self.side.line()
    }

    pub fn counters(&self) -> &Arc<DeviceCounters> {
        self.side.counters()
    }

    /// Counts a register access refused or ignored as the driver's mistake (each logged).
    fn refused(&self) {
        self.side.counters().registers.refused.increment();
    }

    fn offered_features(&self) -> u64 {
        self.side.features() & !NOT_OFFERED
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = self.queue_sel as usize;
        (index < self.queues.len()).then_some(index)
    }

    fn config_read(&mut self, offset: u64, size: u8) -> u64 {
        let result = u32::try_from(offset)
            .map_err(|_| "offset out of range".to_owned())
            .and_then(|offset| self.side.read_config(offset, size));
        result.unwrap_or_else(|error| {
            self.refused();
            self.mistakes.config.warn(format_args!(
                "{}: config read of {size} bytes at {offset:#x} failed: {error}; answered 0",
                self.name
            ));
            0
        })
    }

    fn config_write(&mut self, offset: u64, size: u8, value: u64) {
        let bytes = value.to_le_bytes();
        let result = u32::try_from(offset)
            .map_err(|_| "offset out of range".to_owned())
            .and_then(|offset| self.side.write_config(offset, &bytes[..usize::from(size)]));
        match result {
            Ok(()) => self.config_generation = self.config_generation.wrapping_add(1),
            Err(error) => {
                self.refused();
                self.mistakes.config.warn(format_args!(
                    "{}: config write of {size} bytes at {offset:#x} refused: {error}",
                    self.name
                ));
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
                self.side.accept_features(self.driver_features);
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
            // The ready queues go live, so that buffers the driver made available before (and
            // any notify it sent too early) are served now.
            for index in 0..self.queues.len() {
                if self.queues[index].ready {
                    self.side.start_queue(index);
                }
            }
        }
    }

    /// DRIVER_OK after negotiated features: only then may the device use its queues (virtio
    /// 1.2, 2.1.2 and 3.1.1).
    fn driver_ok(&self) -> bool {
        let live = VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        self.status & live == live
    }

    fn features_locked(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Device reset (Status = 0): queues stopped and cleared (stopping a queue waits for the
    /// device's batch in flight), features forgotten, the device reset, and then the interrupt
    /// line cleaned: nothing the old driver caused reaches the guest after the reset.
    fn reset(&mut self) {
        for index in 0..self.queues.len() {
            self.disable_queue(index);
        }
        self.queues.fill(QueueRegisters::default());
        self.side.reset();
        self.side.line().reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        debug!("{}: reset", self.name);
    }

    fn disable_queue(&mut self, index: usize) {
        self.side.disable_queue(index, self.queues[index].ready);
        self.queues[index].ready = false;
    }

    /// Why the rings of `queue` cannot be used, if they cannot: a size that is not a power of
    /// two up to QueueNumMax, misaligned addresses, or rings outside zone RAM.
    fn check_rings(&self, queue: &QueueRegisters) -> Result<(), String> {
        let max = self.side.max_queue_size();
        let mut rings = Queue::new(max).map_err(|error| format!("{error:?}"))?;
        rings
            .try_set_size(queue.num)
            .map_err(|_| format!("QueueNum {} is not a power of two in 1..={max}", queue.num))?;
        rings
            .try_set_desc_table_address(GuestAddress(queue.desc))
            .and_then(|()| rings.try_set_avail_ring_address(GuestAddress(queue.avail)))
            .and_then(|()| rings.try_set_used_ring_address(GuestAddress(queue.used)))
            .map_err(|error| {
                format!(
                    "ring addresses desc {:#x} avail {:#x} used {:#x} are misaligned ({error:?})",
                    queue.desc, queue.avail, queue.used
                )
            })?;
        rings.set_ready(true);
        if !rings.is_valid(&*self.memory.memory()) {
            return Err(format!(
                "rings of {} entries at desc {:#x} avail {:#x} used {:#x} are not inside zone RAM",
                queue.num, queue.desc, queue.avail, queue.used
            ));
        }
        Ok(())
    }

    fn enable_queue(&mut self, index: usize) {
        let registers = self.queues[index];
        let enabled = self.check_rings(&registers).and_then(|()| {
            self.side
                .enable_queue(index, registers, self.driver_features, self.driver_ok())
        });
        if let Err(why) = enabled {
            self.refused();
            error!("{}: queue {index}: {why}; QueueReady refused", self.name);
            return;
        }
        self.queues[index].ready = true;
        debug!(
            "{}: queue {index} ready with {} entries",
            self.name, registers.num
        );
    }

    fn notify(&mut self, value: u64) {
        let index = usize::try_from(value).unwrap_or(usize::MAX);
        match self.queues.get(index) {
            Some(queue) if queue.ready && self.driver_ok() => {
                self.side.counters().registers.notifies.increment();
                self.side.kick(index);
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
            reg::DEVICE_ID => self.side.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => feature_word(self.offered_features(), self.device_features_sel),
            reg::DEVICE_FEATURES_SEL => self.device_features_sel,
            reg::DRIVER_FEATURES => feature_word(self.driver_features, self.driver_features_sel),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel,
            reg::QUEUE_SEL => self.queue_sel,
            reg::QUEUE_NUM_MAX => queue.map_or(0, |_| u32::from(self.side.max_queue_size())),
            reg::QUEUE_NUM => queue.map_or(0, |queue| u32::from(queue.num)),
            reg::QUEUE_READY => queue.map_or(0, |queue| u32::from(queue.ready)),
            reg::INTERRUPT_STATUS => self.side.line().status(),
            reg::STATUS if self.side.needs_reset().is_set() => {
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
            reg::INTERRUPT_ACK => self.side.line().acknowledge(value),
            reg::STATUS => self.set_status(value),
            reg::SHM_SEL => {}
            _ => return false,
        }
        true
    }
}

impl<D: DeviceSide> MmioRegisters for MmioDevice<D> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.side.counters().registers.reads.increment();
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
        self.side.counters().registers.writes.increment();
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
        self.side.shutdown();
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

    #[test]
    fn ring_ranges_follow_the_split_layout() {
        let queue = QueueRegisters {
            num: 64,
            ready: false,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        };
        assert_eq!(
            queue.ring_ranges(),
            [
                (GuestAddress(0x1000), 1024),
                (GuestAddress(0x2000), 134),
                (GuestAddress(0x3000), 518),
            ]
        );
    }
}
