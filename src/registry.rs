//! The one place that knows every device: its settings, whether they come from the command
//! line (`cli.rs`) or from a `virtio_cfg.json` entry (`hvisor_transport::config`), the crate
//! whose backend serves it, and what the daemon does around that backend. Both transports take
//! their backends from here and know no device by name.
//!
//! Adding a device: its crate, an arm in each `match` of this file, its command-line
//! arguments and its JSON fields.
//!
//! A `virtio_cfg.json` entry served by a vhost-user backend in another process
//! (`DeviceKind::VhostUser`) has no device here: [`open_hvisor_devices`] connects to that
//! backend instead, and the hvisor transport is its vhost-user frontend.

use std::path::Path;
use std::sync::Arc;

use hvisor_transport::config::{DeviceConfig, DeviceKind};
use hvisor_transport::remote::RemoteBackend;
use hvisor_vhost_blk::{Backing, BlkBackend, BlkConfig, Storage};
use hvisor_vhost_console::{BackendConfig, ConsoleBackend, ConsoleConfig};
use hvisor_vhost_core::VirtioDevice;
use hvisor_vhost_net::{MacAddress, NetBackend, NetConfig};
use hvisor_vhost_rng::{DEFAULT_SOURCE, RateLimit, RngBackend, RngConfig};
use log::{info, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock};

/// A device's settings or its backend could not be made; the message names what is wrong.
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// Queue size offered to hvisor guests' blk devices; the C daemon offers 512.
const HVISOR_BLK_QUEUE_SIZE: u16 = 512;
/// No blk poll window over hvisor: the transport's worker raises the interrupt once
/// `handle_event` returns, so a window would delay every completion, and the driver's next
/// request comes through the request ring, after its interrupt, anyway.
const HVISOR_BLK_POLL_US: u32 = 0;

/// What every backend is to both transports.
pub trait Backend:
    VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Send + Sync + 'static
{
}

impl<T> Backend for T where
    T: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + VirtioDevice + Send + Sync + 'static
{
}

/// Something a transport does with a backend of whichever concrete type: transports are
/// generic over the backend, so the registry hands it over through this.
pub trait UseBackend {
    type Output;
    fn with<B: Backend>(self, backend: Arc<B>) -> Self::Output;
}

/// Validated settings of one device.
#[derive(Debug, Clone)]
pub enum DeviceSettings {
    Blk(BlkConfig),
    Net(NetConfig),
    Console(ConsoleConfig),
    Rng(RngConfig),
}

impl DeviceSettings {
    /// The settings of an entry of hvisor-tool's `virtio_cfg.json`.
    pub fn from_hvisor(device: &DeviceConfig) -> Result<Self, DeviceError> {
        Ok(match &device.kind {
            DeviceKind::Blk {
                img,
                readonly,
                serial,
            } => DeviceSettings::Blk(
                BlkConfig {
                    backing: Backing::Image(img.clone()),
                    readonly: *readonly,
                    serial: serial.clone(),
                    num_queues: 1,
                    queue_size: HVISOR_BLK_QUEUE_SIZE,
                    poll_us: HVISOR_BLK_POLL_US,
                    ..BlkConfig::image(img.clone())
                }
                .validate()?,
            ),
            DeviceKind::Net { tap, mac } => DeviceSettings::Net(
                NetConfig {
                    mac: Some(MacAddress(*mac)),
                    ..NetConfig::tap(tap.clone())
                }
                .validate()?,
            ),
            DeviceKind::Console { socket, log } => DeviceSettings::Console(
                ConsoleConfig {
                    backend: socket
                        .clone()
                        .map_or(BackendConfig::Pty, BackendConfig::UnixSocket),
                    output_log: log.clone(),
                }
                .validate()?,
            ),
            DeviceKind::Rng { source, rate_limit } => DeviceSettings::Rng(
                RngConfig {
                    source: source.clone().unwrap_or_else(|| DEFAULT_SOURCE.into()),
                    rate_limit: rate_limit.map(RateLimit::per_second),
                }
                .validate()?,
            ),
            DeviceKind::VhostUser(backend) => {
                return Err(format!(
                    "served by the vhost-user backend at {}, not by a device of this process",
                    backend.socket.display()
                )
                .into());
            }
        })
    }
}

/// An open device backend, shared with the transport that serves it.
#[derive(Clone)]
pub enum Device {
    Blk(Arc<BlkBackend>),
    Net(Arc<NetBackend>),
    Console(Arc<ConsoleBackend>),
    Rng(Arc<RngBackend>),
}

impl Device {
    /// Opens the host side of a device (image, TAP, console, entropy source).
    pub fn open(settings: &DeviceSettings) -> Result<Self, DeviceError> {
        Ok(match settings {
            DeviceSettings::Blk(config) => Device::Blk(Arc::new(BlkBackend::new(config)?)),
            DeviceSettings::Net(config) => Device::Net(Arc::new(NetBackend::new(config)?)),
            DeviceSettings::Console(config) => {
                Device::Console(Arc::new(ConsoleBackend::new(config)?))
            }
            DeviceSettings::Rng(config) => Device::Rng(Arc::new(RngBackend::new(config)?)),
        })
    }

    /// The device's name, as in the command line and `virtio_cfg.json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Blk(_) => "blk",
            Device::Net(_) => "net",
            Device::Console(_) => "console",
            Device::Rng(_) => "rng",
        }
    }

    /// Hands the backend, as its concrete type, to `user`.
    pub fn serve_with<U: UseBackend>(self, user: U) -> U::Output {
        match self {
            Device::Blk(backend) => user.with(backend),
            Device::Net(backend) => user.with(backend),
            Device::Console(backend) => user.with(backend),
            Device::Rng(backend) => user.with(backend),
        }
    }

    /// What the start-up log says about the device once it is open; `None` if nothing.
    pub fn describe(&self, settings: &DeviceSettings) -> Option<String> {
        match (self, settings) {
            (Device::Blk(backend), DeviceSettings::Blk(config)) => {
                let device = backend.device();
                Some(format!(
                    "disk: {}, {} bytes, {}, {} queue(s) of up to {} entries",
                    config.backing,
                    device.storage().size(),
                    if device.readonly() {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    config.num_queues,
                    config.queue_size,
                ))
            }
            (Device::Net(backend), DeviceSettings::Net(config)) => {
                Some(format!("net: TAP {}, MAC {}", config.tap, backend.mac()))
            }
            _ => None,
        }
    }

    /// The PTY a console device created, which the user needs to attach to it.
    pub fn pty_path(&self) -> Option<&Path> {
        match self {
            Device::Console(backend) => backend.pty_path(),
            _ => None,
        }
    }

    /// Makes durable what the guest wrote (a blk device's disk flush); called when a frontend
    /// leaves and before the process exits.
    pub fn settle(&self) {
        if let Device::Blk(backend) = self {
            let device = backend.device();
            if !device.readonly() {
                if let Err(error) = device.storage().flush() {
                    warn!("flushing the disk failed: {error}");
                }
            }
        }
    }
}

/// Opens every enabled device of the zones `config` serves, in file order, for the hvisor
/// transport.
pub fn open_hvisor_devices(
    config: &hvisor_transport::config::VirtioConfig,
) -> Result<Vec<hvisor_transport::devices::OpenDevice>, hvisor_transport::devices::DeviceError> {
    hvisor_transport::devices::open_all(config, |name, device| {
        if let DeviceKind::VhostUser(backend) = &device.kind {
            let remote = RemoteBackend::connect(name, backend)?;
            info!("{name}: {}", remote.describe());
            return Ok(Box::new(remote));
        }
        let opened =
            DeviceSettings::from_hvisor(device).and_then(|settings| Device::open(&settings))?;
        if let Some(pty) = opened.pty_path() {
            info!(
                "{name}: console on {} (attach with `screen {}`)",
                pty.display(),
                pty.display()
            );
        }
        Ok(opened.serve_with(ForHvisor))
    })
}

/// Makes a backend startable behind the hvisor transport's virtio-mmio.
struct ForHvisor;

impl UseBackend for ForHvisor {
    type Output = Box<dyn hvisor_transport::devices::StartDevice>;

    fn with<B: Backend>(self, backend: Arc<B>) -> Self::Output {
        Box::new(backend)
    }
}
