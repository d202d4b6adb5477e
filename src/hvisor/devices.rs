//! Which device crate serves each JSON device type. Adding a device type means adding an arm
//! here (and its fields to `config`); the transport does not change.

use std::sync::Arc;

use hvisor_vhost_blk::{Backing, BlkBackend, BlkConfig};
use hvisor_vhost_console::{BackendConfig, ConsoleBackend, ConsoleConfig};
use hvisor_vhost_net::{MacAddress, NetBackend, NetConfig};
use hvisor_vhost_rng::{DEFAULT_SOURCE, RateLimit, RngBackend, RngConfig};
use log::info;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::config::{DeviceConfig, DeviceKind, VirtioConfig};
use super::interrupt::{Injector, InterruptLine};
use super::mmio::{MmioDevice, MmioRegisters};

/// Queue size offered to hvisor guests; the C daemon offers 512 for blk.
const BLK_QUEUE_SIZE: u16 = 512;

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

/// A started device: its registers, and its interrupt line, whose call eventfds the interrupt
/// thread watches.
pub struct Started {
    pub registers: Box<dyn MmioRegisters>,
    pub line: Arc<InterruptLine>,
}

pub fn kind_name(kind: &DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Blk { .. } => "blk",
        DeviceKind::Net { .. } => "net",
        DeviceKind::Console { .. } => "console",
        DeviceKind::Rng { .. } => "rng",
    }
}

/// A name for log lines: zone, type, position in the zone's list and base address.
pub fn device_name(zone: u32, device: &DeviceConfig) -> String {
    format!(
        "zone{zone}-{}{}@{:#x}",
        kind_name(&device.kind),
        device.index,
        device.addr
    )
}

/// A device whose host side is open (image, TAP, console, entropy source) but which has no
/// guest memory yet: everything that can fail on the host's side fails before the daemon
/// attaches to the hypervisor.
pub struct OpenDevice {
    pub zone: u32,
    pub config: DeviceConfig,
    pub name: String,
    backend: OpenBackend,
}

enum OpenBackend {
    Blk(BlkBackend),
    Net(NetBackend),
    Console(ConsoleBackend),
    Rng(RngBackend),
}

fn start<B>(
    name: String,
    backend: B,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    line: (u32, u32),
    injector: Arc<Injector>,
) -> Result<Started, DeviceError>
where
    B: vhost_user_backend::VhostUserBackend<Vring = vhost_user_backend::VringRwLock, Bitmap = ()>
        + hvisor_vhost_device::VirtioDevice
        + Clone
        + 'static,
{
    let device = MmioDevice::new(name.clone(), backend, memory, line, injector)
        .map_err(|source| DeviceError::Start { name, source })?;
    Ok(Started {
        line: device.line().clone(),
        registers: Box::new(device),
    })
}

impl OpenDevice {
    /// Opens the host side of `device` of `zone`.
    pub fn open(zone: u32, device: &DeviceConfig) -> Result<Self, DeviceError> {
        let name = device_name(zone, device);
        let backend_error =
            |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::Backend {
                name: name.clone(),
                source,
            };
        let backend = match &device.kind {
            DeviceKind::Blk {
                img,
                readonly,
                serial,
            } => {
                let config = BlkConfig {
                    backing: Backing::Image(img.clone()),
                    readonly: *readonly,
                    serial: serial.clone(),
                    num_queues: 1,
                    queue_size: BLK_QUEUE_SIZE,
                    ..BlkConfig::image(img.clone())
                }
                .validate()
                .map_err(|error| backend_error(error.into()))?;
                OpenBackend::Blk(
                    BlkBackend::new(&config).map_err(|error| backend_error(error.into()))?,
                )
            }
            DeviceKind::Net { tap, mac } => {
                let config = NetConfig {
                    mac: Some(MacAddress(*mac)),
                    ..NetConfig::tap(tap.clone())
                }
                .validate()
                .map_err(|error| backend_error(error.into()))?;
                OpenBackend::Net(
                    NetBackend::new(&config).map_err(|error| backend_error(error.into()))?,
                )
            }
            DeviceKind::Console { socket, log } => {
                let config = ConsoleConfig {
                    backend: socket
                        .clone()
                        .map_or(BackendConfig::Pty, BackendConfig::UnixSocket),
                    output_log: log.clone(),
                }
                .validate()
                .map_err(|error| backend_error(error.into()))?;
                let backend =
                    ConsoleBackend::new(&config).map_err(|error| backend_error(error.into()))?;
                if let Some(pty) = backend.pty_path() {
                    info!(
                        "{name}: console on {} (attach with `screen {}`)",
                        pty.display(),
                        pty.display()
                    );
                }
                OpenBackend::Console(backend)
            }
            DeviceKind::Rng { source, rate_limit } => {
                let config = RngConfig {
                    source: source.clone().unwrap_or_else(|| DEFAULT_SOURCE.into()),
                    rate_limit: rate_limit.map(RateLimit::per_second),
                }
                .validate()
                .map_err(|error| backend_error(error.into()))?;
                OpenBackend::Rng(
                    RngBackend::new(&config).map_err(|error| backend_error(error.into()))?,
                )
            }
        };
        Ok(OpenDevice {
            zone,
            config: device.clone(),
            name,
            backend,
        })
    }

    /// Puts virtio-mmio in front of the device, on the zone's `memory`, with interrupts
    /// through `injector`.
    pub fn start(
        self,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        injector: Arc<Injector>,
    ) -> Result<Started, DeviceError> {
        let (name, line) = (self.name, (self.zone, self.config.irq));
        match self.backend {
            OpenBackend::Blk(backend) => start(name, Arc::new(backend), memory, line, injector),
            OpenBackend::Net(backend) => start(name, Arc::new(backend), memory, line, injector),
            OpenBackend::Console(backend) => start(name, Arc::new(backend), memory, line, injector),
            OpenBackend::Rng(backend) => start(name, Arc::new(backend), memory, line, injector),
        }
    }
}

/// Opens every enabled device of the zones `config` serves, in file order.
pub fn open_all(config: &VirtioConfig) -> Result<Vec<OpenDevice>, DeviceError> {
    config
        .served_zones()
        .flat_map(|zone| zone.devices.iter().map(|device| (zone.id, device)))
        .map(|(zone, device)| OpenDevice::open(zone, device))
        .collect()
}
