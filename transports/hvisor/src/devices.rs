//! The devices the transport serves. The daemon's registry opens each configured device's
//! backend before the hand-off (everything that can fail on the host's side fails before the
//! daemon attaches to the hypervisor); [`OpenDevice::start`] puts virtio-mmio in front of it
//! once zone RAM is mapped. No device is known here by name.

use std::sync::Arc;

use hvisor_vhost_core::VirtioDevice;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::config::{DeviceConfig, VirtioConfig};
use super::counters::DeviceCounters;
use super::interrupt::{Injector, InterruptLine};
use super::local::LocalDevice;
use super::mmio::{DeviceSide, MmioDevice, MmioRegisters};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {name}: {source}")]
    Backend {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("device {name}: cannot start: {source}")]
    Start {
        name: String,
        source: std::io::Error,
    },
}

/// A started device: its registers, its interrupt line, whose call eventfds the interrupt
/// thread watches, and its counters.
pub struct Started {
    pub registers: Box<dyn MmioRegisters>,
    pub line: Arc<InterruptLine>,
    pub counters: Arc<DeviceCounters>,
}

impl Started {
    /// `side` behind virtio-mmio registers, its rings in `memory`.
    pub fn new<D: DeviceSide + 'static>(
        name: String,
        side: D,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Self {
        let device = MmioDevice::new(name, side, memory);
        Started {
            line: device.line().clone(),
            counters: device.counters().clone(),
            registers: Box::new(device),
        }
    }
}

/// A name for log lines: zone, type, position in the zone's list and base address.
pub fn device_name(zone: u32, device: &DeviceConfig) -> String {
    format!(
        "zone{zone}-{}{}@{:#x}",
        device.kind.name(),
        device.index,
        device.addr
    )
}

/// A backend whose host side is open, not yet started behind virtio-mmio.
pub trait StartDevice: Send {
    /// Puts virtio-mmio in front of the backend, on `memory`, raising `line` (zone, IRQ)
    /// through `injector`.
    fn start(
        self: Box<Self>,
        name: String,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        line: (u32, u32),
        injector: Arc<Injector>,
    ) -> Result<Started, DeviceError>;
}

impl<B> StartDevice for B
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Clone + Send + 'static,
{
    fn start(
        self: Box<Self>,
        name: String,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        line: (u32, u32),
        injector: Arc<Injector>,
    ) -> Result<Started, DeviceError> {
        let side = LocalDevice::new(name.clone(), *self, memory.clone(), line, injector).map_err(
            |source| DeviceError::Start {
                name: name.clone(),
                source,
            },
        )?;
        Ok(Started::new(name, side, memory))
    }
}

/// A device whose host side is open but which has no guest memory yet.
pub struct OpenDevice {
    pub zone: u32,
    pub config: DeviceConfig,
    pub name: String,
    backend: Box<dyn StartDevice>,
}

impl OpenDevice {
    /// Puts virtio-mmio in front of the device, on the zone's `memory`, with interrupts
    /// through `injector`.
    pub fn start(
        self,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        injector: Arc<Injector>,
    ) -> Result<Started, DeviceError> {
        let line = (self.zone, self.config.irq);
        self.backend.start(self.name, memory, line, injector)
    }
}

/// Opens every enabled device of the zones `config` serves, in file order, with `open`, which
/// gets each device's log name and configuration.
pub fn open_all(
    config: &VirtioConfig,
    mut open: impl FnMut(
        &str,
        &DeviceConfig,
    ) -> Result<Box<dyn StartDevice>, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Vec<OpenDevice>, DeviceError> {
    config
        .served_zones()
        .flat_map(|zone| zone.devices.iter().map(|device| (zone.id, device)))
        .map(|(zone, device)| {
            let name = device_name(zone, device);
            let backend = open(&name, device).map_err(|source| DeviceError::Backend {
                name: name.clone(),
                source,
            })?;
            Ok(OpenDevice {
                zone,
                config: device.clone(),
                name,
                backend,
            })
        })
        .collect()
}
