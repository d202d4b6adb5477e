//! A small virtio-mmio driver that plays a zone's guest over the [`Simulator`]: the probe and
//! initialisation sequence of virtio 1.2 section 4.2.3, split virtqueues, and virtio-blk
//! requests. Tests, benchmarks and `hvisor-vhost simulate` drive the daemon with it.

use std::time::Duration;

use hvisor_transport::config::VirtioConfig;
use hvisor_transport::mmio::{MAGIC_VALUE, VERSION, reg};
use virtio_guest_driver::blk::{self, Payload, RequestBuffers};
use virtio_guest_driver::{
    DriverError, DriverQueue, F_EVENT_IDX, F_VERSION_1, QueueLayout, STATUS_ACKNOWLEDGE,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{SimError, Simulator};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error("no virtio-mmio v2 device at {base:#x}: magic {magic:#x}, version {version}")]
    NoDevice { base: u64, magic: u32, version: u32 },
    #[error("the device refused features {0:#x} (FEATURES_OK did not stick)")]
    FeaturesRefused(u64),
    #[error("queue {index}: QueueNumMax is {max}, {wanted} entries wanted")]
    QueueTooSmall { index: u32, max: u32, wanted: u16 },
    #[error("queue {0} did not become ready (the device refused its setup)")]
    QueueRefused(u32),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(
        "blk round {round}: data read back differs (write status {written}, read status {read})"
    )]
    Mismatch { round: u32, written: u8, read: u8 },
}

/// One device window as seen by the guest vCPU `cpu` of `zone`.
pub struct MmioGuest<'a> {
    pub sim: &'a Simulator,
    pub zone: u32,
    pub base: u64,
    pub cpu: u32,
    pub timeout: Duration,
}

impl<'a> MmioGuest<'a> {
    pub fn new(sim: &'a Simulator, zone: u32, base: u64) -> Self {
        MmioGuest {
            sim,
            zone,
            base,
            cpu: 0,
            timeout: Duration::from_secs(5),
        }
    }

    pub fn read(&self, offset: u64) -> Result<u32, GuestError> {
        Ok(self.read_sized(offset, 4)? as u32)
    }

    pub fn read_sized(&self, offset: u64, size: u8) -> Result<u64, GuestError> {
        Ok(self.sim.access(
            self.cpu,
            self.zone,
            self.base + offset,
            size,
            None,
            self.timeout,
        )?)
    }

    pub fn write(&self, offset: u64, value: u32) -> Result<(), GuestError> {
        self.write_sized(offset, 4, u64::from(value))
    }

    pub fn write_sized(&self, offset: u64, size: u8, value: u64) -> Result<(), GuestError> {
        self.sim.access(
            self.cpu,
            self.zone,
            self.base + offset,
            size,
            Some(value),
            self.timeout,
        )?;
        Ok(())
    }

    /// Checks the magic and version; returns the device id.
    pub fn probe(&self) -> Result<u32, GuestError> {
        let magic = self.read(reg::MAGIC_VALUE)?;
        let version = self.read(reg::VERSION)?;
        if magic != MAGIC_VALUE || version != VERSION {
            return Err(GuestError::NoDevice {
                base: self.base,
                magic,
                version,
            });
        }
        self.read(reg::DEVICE_ID)
    }

    pub fn device_features(&self) -> Result<u64, GuestError> {
        self.write(reg::DEVICE_FEATURES_SEL, 0)?;
        let low = self.read(reg::DEVICE_FEATURES)?;
        self.write(reg::DEVICE_FEATURES_SEL, 1)?;
        let high = self.read(reg::DEVICE_FEATURES)?;
        Ok(u64::from(high) << 32 | u64::from(low))
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then the offered subset of `wanted` and FEATURES_OK.
    /// Returns the features in force.
    pub fn initialize(&self, wanted: u64) -> Result<u64, GuestError> {
        self.write(reg::STATUS, 0)?;
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE)?;
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
        let features = self.device_features()? & wanted;
        self.write(reg::DRIVER_FEATURES_SEL, 0)?;
        self.write(reg::DRIVER_FEATURES, features as u32)?;
        self.write(reg::DRIVER_FEATURES_SEL, 1)?;
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32)?;
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(reg::STATUS, status)?;
        if self.read(reg::STATUS)? & STATUS_FEATURES_OK == 0 {
            return Err(GuestError::FeaturesRefused(features));
        }
        Ok(features)
    }

    pub fn driver_ok(&self) -> Result<(), GuestError> {
        let status = self.read(reg::STATUS)?;
        self.write(reg::STATUS, status | STATUS_DRIVER_OK)
    }

    /// Lays out queue `index` with `size` entries at `at` in guest RAM, zeroed, and makes it
    /// ready.
    pub fn setup_queue(
        &self,
        index: u32,
        size: u16,
        at: GuestAddress,
    ) -> Result<DriverQueue, GuestError> {
        let memory = self
            .sim
            .memory(self.zone)
            .ok_or(GuestError::Sim(SimError::NoZone(self.zone)))?;
        let layout = QueueLayout::new(size, at);
        layout.clear(memory)?;
        self.write(reg::QUEUE_SEL, index)?;
        let max = self.read(reg::QUEUE_NUM_MAX)?;
        if max < u32::from(size) {
            return Err(GuestError::QueueTooSmall {
                index,
                max,
                wanted: size,
            });
        }
        let queue = DriverQueue::new(index, layout);
        self.write(reg::QUEUE_NUM, u32::from(size))?;
        for (low, address) in [
            (reg::QUEUE_DESC_LOW, queue.layout.desc),
            (reg::QUEUE_AVAIL_LOW, queue.layout.avail),
            (reg::QUEUE_USED_LOW, queue.layout.used),
        ] {
            self.write(low, address.0 as u32)?;
            self.write(low + 4, (address.0 >> 32) as u32)?;
        }
        self.write(reg::QUEUE_READY, 1)?;
        if self.read(reg::QUEUE_READY)? != 1 {
            return Err(GuestError::QueueRefused(index));
        }
        Ok(queue)
    }

    pub fn notify(&self, queue: u32) -> Result<(), GuestError> {
        self.write(reg::QUEUE_NOTIFY, queue)
    }

    /// Reads InterruptStatus and acknowledges it, as Linux's handler does; returns it.
    pub fn acknowledge_interrupt(&self) -> Result<u32, GuestError> {
        let status = self.read(reg::INTERRUPT_STATUS)?;
        self.write(reg::INTERRUPT_ACK, status)?;
        Ok(status)
    }
}

/// A virtio-blk driver over one device window: one queue, one request at a time.
pub struct BlkGuest<'a> {
    pub mmio: MmioGuest<'a>,
    pub queue: DriverQueue,
    pub features: u64,
    memory: &'a GuestMemoryMmap,
    buffers: RequestBuffers,
}

impl<'a> BlkGuest<'a> {
    /// Initializes the device at `base` of `zone`, using guest RAM from `scratch` on for the
    /// queue and buffers (`queue_size` entries, then `data_len` bytes of data buffer).
    pub fn start(
        sim: &'a Simulator,
        zone: u32,
        base: u64,
        scratch: GuestAddress,
        queue_size: u16,
        data_len: u32,
    ) -> Result<Self, GuestError> {
        let memory = sim
            .memory(zone)
            .ok_or(GuestError::Sim(SimError::NoZone(zone)))?;
        let mmio = MmioGuest::new(sim, zone, base);
        let device = mmio.probe()?;
        if device != blk::DEVICE_ID {
            return Err(GuestError::NoDevice {
                base,
                magic: MAGIC_VALUE,
                version: device,
            });
        }
        let features = mmio.initialize(F_VERSION_1 | F_EVENT_IDX | blk::F_FLUSH)?;
        let queue = mmio.setup_queue(0, queue_size, scratch)?;
        mmio.driver_ok()?;
        let buffers = RequestBuffers::at(queue.layout.end(), data_len);
        Ok(BlkGuest {
            mmio,
            queue,
            features,
            memory,
            buffers,
        })
    }

    /// Sends one request and waits for its completion interrupt; returns the status byte and
    /// the used length.
    fn request(
        &mut self,
        request_type: u32,
        sector: u64,
        payload: Payload,
    ) -> Result<(u8, u32), GuestError> {
        let chain = self
            .buffers
            .chain(self.memory, request_type, sector, payload)?;
        let head = self.queue.add(self.memory, &chain)?;
        self.mmio.notify(self.queue.index)?;
        // As Linux does: take the interrupt, acknowledge it, then reap the used ring.
        let timeout = self.mmio.timeout;
        loop {
            if self.mmio.sim.wait_interrupt(timeout).is_none() {
                return Err(GuestError::Sim(SimError::NoInterrupt(timeout)));
            }
            self.mmio.acknowledge_interrupt()?;
            let mut completed = None;
            while let Some((used_head, len)) = self.queue.pop_used(self.memory)? {
                if used_head == head {
                    completed = Some(len);
                }
            }
            if let Some(len) = completed {
                return Ok((self.buffers.status(self.memory)?, len));
            }
        }
    }

    /// Writes `data` (at most the data buffer) at `sector`; returns the status.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8, GuestError> {
        let len = data.len().min(self.buffers.data_len as usize);
        Ok(self
            .request(blk::T_OUT, sector, Payload::Out(&data[..len]))?
            .0)
    }

    /// Reads `len` bytes (at most the data buffer) at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>), GuestError> {
        let len = len.min(self.buffers.data_len);
        let (status, _) = self.request(blk::T_IN, sector, Payload::In(len))?;
        Ok((status, self.buffers.data(self.memory, len)?))
    }

    pub fn flush(&mut self) -> Result<u8, GuestError> {
        Ok(self.request(blk::T_FLUSH, 0, Payload::None)?.0)
    }

    /// `rounds` rounds of writing a whole data buffer of a round-specific pattern and reading
    /// it back, each checked (status and data): the first 64 buffer-sized blocks, in turn.
    pub fn write_read_rounds(&mut self, rounds: u32) -> Result<(), GuestError> {
        let len = self.buffers.data_len;
        let mut pattern = vec![0u8; len as usize];
        for round in 0..rounds {
            for (i, byte) in pattern.iter_mut().enumerate() {
                *byte = (i as u32 ^ round.wrapping_mul(0x9e37_79b9)) as u8;
            }
            let sector = u64::from(round % 64) * u64::from(len / 512);
            let written = self.write(sector, &pattern)?;
            let (read, back) = self.read(sector, len)?;
            if written != blk::S_OK || read != blk::S_OK || back != pattern {
                return Err(GuestError::Mismatch {
                    round,
                    written,
                    read,
                });
            }
        }
        Ok(())
    }
}

/// Probes every configured device of every zone and runs `rounds` write/read/verify rounds on
/// each blk device, printing what it sees. What `hvisor-vhost simulate` does.
pub fn exercise_all(sim: &Simulator, config: &VirtioConfig, rounds: u32) -> Result<(), GuestError> {
    const SCRATCH_OFFSET: u64 = 0x10_0000;
    const DATA_LEN: u32 = 64 * 1024;
    for zone in &config.zones {
        let scratch = zone
            .memory_regions
            .iter()
            .find(|region| region.size >= SCRATCH_OFFSET + 2 * u64::from(DATA_LEN) + 0x10_0000)
            .map(|region| GuestAddress(region.zonex_ipa + SCRATCH_OFFSET));
        for device in &zone.devices {
            let mmio = MmioGuest::new(sim, zone.id, device.addr);
            let device_id = mmio.probe()?;
            println!(
                "zone {} device {} at {:#x}: virtio device id {device_id}, features {:#x}",
                zone.id,
                device.index,
                device.addr,
                mmio.device_features()?
            );
            // By the id the device shows: a blk served by an external backend is one too.
            let (blk::DEVICE_ID, Some(scratch)) = (device_id, scratch) else {
                continue;
            };
            let mut guest = BlkGuest::start(sim, zone.id, device.addr, scratch, 64, DATA_LEN)?;
            let started = std::time::Instant::now();
            guest.write_read_rounds(rounds)?;
            let elapsed = started.elapsed();
            println!(
                "  blk: {rounds} rounds of 64 KiB write + read verified in {elapsed:.2?} ({:.1} us per request)",
                elapsed.as_secs_f64() * 1e6 / f64::from(rounds.max(1) * 2)
            );
        }
    }
    Ok(())
}
