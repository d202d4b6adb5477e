//! The hypervisor port: the few things the daemon needs from hvisor's side, behind one trait,
//! with the real implementation (`/dev/hvisor`) and one that attaches to a hypervisor played
//! by another process over a Unix socket (docs/hypervisor-socket.md).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use log::info;
use vm_memory::FileOffset;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::abi::{
    BRIDGE_MAP_SIZE, HVISOR_FINISH_REQ, HVISOR_INIT_VIRTIO, HVISOR_SET_EVENTFD, VirtioBridge,
};
use super::config::{MemoryRegion, VirtioConfig};
use super::handoff::{self, DaemonReply, Handoff, HandoffError, HypervisorHello};

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("cannot open {path}: {source} (is hvisor.ko loaded?)")]
    OpenDevice { path: PathBuf, source: io::Error },
    #[error("{what} on /dev/hvisor failed: {source}")]
    Ioctl {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot map the virtio bridge page: {0}")]
    MapBridge(io::Error),
    #[error("cannot create the wake-up eventfd: {0}")]
    EventFd(io::Error),
    #[error("hypervisor socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hypervisor socket {path}: {source}")]
    Handoff { path: PathBuf, source: HandoffError },
    #[error(
        "hypervisor socket offers no RAM window for zone {zone} at zone0_ipa {zone0_ipa:#x} of at least {size:#x} bytes"
    )]
    NoWindow {
        zone: u32,
        zone0_ipa: u64,
        size: u64,
    },
}

/// What the daemon needs from the hypervisor.
pub trait HypervisorPort: Send + Sync {
    /// The shared `virtio_bridge` page.
    fn bridge(&self) -> &VirtioBridge;
    /// Where a zone RAM window can be mapped from (file and offset, shared mapping).
    fn zone_ram(&self, zone: u32, region: &MemoryRegion) -> Result<FileOffset, PortError>;
    /// Readable when the hypervisor asks the daemon to wake up.
    fn wakeup(&self) -> &EventFd;
    /// Readable (or hung up) when the hypervisor side is gone and the daemon should stop.
    fn hangup(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Tells the hypervisor that the result ring has new interrupts (FINISH_REQ).
    fn finish_request(&self) -> io::Result<()>;
    /// Lowers a zone's level-triggered interrupt line once the guest acknowledged it.
    fn deassert_irq(&self, zone: u32, irq: u32) -> io::Result<()> {
        let _ = (zone, irq);
        Ok(())
    }
}

/// A shared mapping of the bridge page.
pub struct BridgeMapping {
    base: NonNull<VirtioBridge>,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for BridgeMapping {}
// SAFETY: as above; `&VirtioBridge` is `Sync` because every field is atomic.
unsafe impl Sync for BridgeMapping {}

impl BridgeMapping {
    /// Maps the first page of `file` (the `/dev/hvisor` bridge, or a memfd standing in for it).
    pub fn map(file: &File) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping that aliases nothing in this process; the result is
        // checked below.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BRIDGE_MAP_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(address.cast()).ok_or_else(|| io::Error::other("mmap returned 0"))?;
        Ok(BridgeMapping { base })
    }

    pub fn bridge(&self) -> &VirtioBridge {
        // SAFETY: the mapping is page aligned, BRIDGE_MAP_SIZE bytes long (larger than
        // `VirtioBridge`, checked at compile time), lives as long as `self`, and every bit
        // pattern is a valid value of its integer atomics.
        unsafe { self.base.as_ref() }
    }
}

impl Drop for BridgeMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), BRIDGE_MAP_SIZE) };
    }
}

fn ioctl_no_arg(file: &File, request: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: these hvisor ioctls take no pointer (or an integer by value).
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) };
        if ret >= 0 {
            return Ok(ret);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The real port: `/dev/hvisor` of hvisor-tool's kernel module.
pub struct DevHvisor {
    device: File,
    bridge: BridgeMapping,
    wakeup: EventFd,
}

impl DevHvisor {
    pub const PATH: &'static str = "/dev/hvisor";

    pub fn open() -> Result<Self, PortError> {
        Self::open_at(Path::new(Self::PATH))
    }

    pub fn open_at(path: &Path) -> Result<Self, PortError> {
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PortError::OpenDevice {
                path: path.to_owned(),
                source,
            })?;
        let ioctl_error = |what| move |source| PortError::Ioctl { what, source };
        // INIT_VIRTIO returns a positive errno when the module knows no wake-up IRQ.
        let init =
            ioctl_no_arg(&device, HVISOR_INIT_VIRTIO, 0).map_err(ioctl_error("INIT_VIRTIO"))?;
        if init != 0 {
            return Err(PortError::Ioctl {
                what: "INIT_VIRTIO",
                source: io::Error::from_raw_os_error(init),
            });
        }
        let wakeup = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(PortError::EventFd)?;
        ioctl_no_arg(
            &device,
            HVISOR_SET_EVENTFD,
            wakeup.as_raw_fd() as libc::c_ulong,
        )
        .map_err(ioctl_error("SET_EVENTFD"))?;
        let bridge = BridgeMapping::map(&device).map_err(PortError::MapBridge)?;
        info!("attached to hvisor through {}", path.display());
        Ok(DevHvisor {
            device,
            bridge,
            wakeup,
        })
    }
}

impl HypervisorPort for DevHvisor {
    fn bridge(&self) -> &VirtioBridge {
        self.bridge.bridge()
    }

    fn zone_ram(&self, _zone: u32, region: &MemoryRegion) -> Result<FileOffset, PortError> {
        // hvisor.ko maps physical address `offset` for any non-zero mmap offset.
        let device = self
            .device
            .try_clone()
            .map_err(|source| PortError::OpenDevice {
                path: PathBuf::from(Self::PATH),
                source,
            })?;
        Ok(FileOffset::new(device, region.zone0_ipa))
    }

    fn wakeup(&self) -> &EventFd {
        &self.wakeup
    }

    fn finish_request(&self) -> io::Result<()> {
        ioctl_no_arg(&self.device, HVISOR_FINISH_REQ, 0).map(drop)
    }

    // Only LoongArch's interrupt controller needs the line lowered by hand (hvisor-tool PR #111).
    #[cfg(target_arch = "loongarch64")]
    fn deassert_irq(&self, zone: u32, irq: u32) -> io::Result<()> {
        deassert_irq_ioctl(&self.device, zone, irq)
    }
}

/// `HVISOR_DEASSERT_IRQ`; compiled on every architecture so it is checked everywhere, called
/// only on LoongArch.
#[cfg_attr(not(target_arch = "loongarch64"), allow(dead_code))]
fn deassert_irq_ioctl(device: &File, zone: u32, irq: u32) -> io::Result<()> {
    #[repr(C)]
    struct IrqLine {
        zone_id: u32,
        irq_id: u32,
    }
    let line = IrqLine {
        zone_id: zone,
        irq_id: irq,
    };
    // SAFETY: DEASSERT_IRQ reads one `hvisor_irq_line_args` (two u32) from the pointer, which
    // points to `line`, alive for the call.
    let ret = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            super::abi::HVISOR_DEASSERT_IRQ as _,
            &raw const line,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A hypervisor played by another process (our simulator, the hvisor stand-in, or a test
/// tool), attached through the hand-off protocol of docs/hypervisor-socket.md.
pub struct SocketPort {
    connection: UnixStream,
    bridge: BridgeMapping,
    wakeup: EventFd,
    finish: EventFd,
    windows: Vec<handoff::Window>,
}

impl SocketPort {
    /// Connects to `path` and runs the hand-off for the RAM of `config`'s served zones.
    pub fn connect(path: &Path, config: &VirtioConfig) -> Result<Self, PortError> {
        let connection = UnixStream::connect(path).map_err(|source| PortError::Socket {
            path: path.to_owned(),
            source,
        })?;
        Self::attach(connection, path, config)
    }

    /// Runs the hand-off on an already connected stream; `path` names it in messages. Every
    /// descriptor is checked against the hello and `config` before the reply: a hypervisor side
    /// that gets a reply can count on the daemon to serve.
    pub fn attach(
        connection: UnixStream,
        path: &Path,
        config: &VirtioConfig,
    ) -> Result<Self, PortError> {
        let handoff_error = |source: HandoffError| PortError::Handoff {
            path: path.to_owned(),
            source,
        };
        let (message, files): (serde_json::Value, Vec<Option<File>>) =
            handoff::receive(&connection).map_err(|source| PortError::Socket {
                path: path.to_owned(),
                source,
            })?;
        let hello =
            HypervisorHello::from_json(&message).map_err(|error| handoff_error(error.into()))?;
        let regions: Vec<(u32, MemoryRegion)> = config
            .served_regions()
            .map(|(zone, region)| (zone, *region))
            .collect();
        let Handoff {
            bridge,
            wakeup,
            windows,
        } = Handoff::check(&hello, files, &regions).map_err(handoff_error)?;
        let bridge = BridgeMapping::map(&bridge).map_err(PortError::MapBridge)?;
        let finish = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(PortError::EventFd)?;
        handoff::send(&connection, &DaemonReply::new(0), &[finish.as_raw_fd()]).map_err(
            |source| PortError::Socket {
                path: path.to_owned(),
                source,
            },
        )?;
        info!(
            "attached to the hypervisor at {} ({} RAM window(s))",
            path.display(),
            windows.len()
        );
        Ok(SocketPort {
            connection,
            bridge,
            wakeup,
            finish,
            windows,
        })
    }
}

impl HypervisorPort for SocketPort {
    fn bridge(&self) -> &VirtioBridge {
        self.bridge.bridge()
    }

    fn zone_ram(&self, zone: u32, region: &MemoryRegion) -> Result<FileOffset, PortError> {
        let window = self
            .windows
            .iter()
            .find(|window| {
                window.zone == zone
                    && window.zone0_ipa == region.zone0_ipa
                    && window.size >= region.size
            })
            .ok_or(PortError::NoWindow {
                zone,
                zone0_ipa: region.zone0_ipa,
                size: region.size,
            })?;
        Ok(FileOffset::from_arc(window.file.clone(), window.offset))
    }

    fn wakeup(&self) -> &EventFd {
        &self.wakeup
    }

    fn hangup(&self) -> Option<BorrowedFd<'_>> {
        Some(self.connection.as_fd())
    }

    fn finish_request(&self) -> io::Result<()> {
        self.finish.write(1)
    }
}
