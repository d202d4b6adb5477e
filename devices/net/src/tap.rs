//! The TAP interface frames leave and enter through.
//!
//! The device only needs a descriptor it can `read`/`writev` whole frames on (each prefixed by
//! the virtio-net header) plus three controls, so tests put a socket pair behind
//! [`TapQueue`] and run the same device code without `/dev/net/tun`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use log::info;

/// One queue of a TAP: frames are read and written on its descriptor, which is non-blocking.
pub trait TapQueue: AsFd + Send + Sync {
    /// Length of the virtio-net header the TAP prepends on read and expects on write.
    fn set_vnet_header_len(&self, len: usize) -> io::Result<()>;
    /// Which offloads (`TUN_F_*`) the TAP may leave to the reader.
    fn set_offloads(&self, offloads: u32) -> io::Result<()>;
    /// Lets the kernel steer frames to this queue, or stops it (multiqueue TAPs only).
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error(
        "tap {name:?} does not exist; create it first (ip tuntap add dev {name} mode tap{}) \
         or let the device create it",
        if *.multi_queue { " multi_queue" } else { "" }
    )]
    Missing { name: String, multi_queue: bool },
    #[error("cannot attach to tap {name:?}: {source}{}", attach_hint(.source))]
    Attach { name: String, source: io::Error },
    #[error("tap {name:?}: {operation} failed: {source}")]
    Control {
        name: String,
        operation: &'static str,
        source: io::Error,
    },
}

fn attach_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EINVAL) => {
            " (is it a TUN rather than a TAP, or was it created with another multi_queue \
             setting than the number of queue pairs asks for?)"
        }
        Some(libc::EBUSY) => " (another process holds its only queue)",
        Some(libc::EPERM) => " (needs CAP_NET_ADMIN or the TAP's owner)",
        _ => "",
    }
}

/// One queue of a kernel TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens `queues` queues of the TAP `name`, creating the interface if it is missing and
    /// `create` allows it. More than one queue needs a multiqueue TAP.
    pub fn open_queues(name: &str, queues: u16, create: bool) -> Result<Vec<Tap>, TapError> {
        let multi_queue = queues > 1;
        if !create && !interface_exists(name) {
            return Err(TapError::Missing {
                name: name.to_owned(),
                multi_queue,
            });
        }
        let taps = (0..queues)
            .map(|_| Tap::open(name, multi_queue))
            .collect::<Result<Vec<_>, _>>()?;
        info!("attached to tap {name} ({queues} queue(s))");
        Ok(taps)
    }

    fn open(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // The kernel prepends and expects a virtio-net header (IFF_VNET_HDR), so frames move
        // between TAP and guest with their offload metadata and no translation.
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut request = interface_request(name, flags);
        // TUNSETIFF = _IOW('T', 202, int); it reads and updates a `struct ifreq`.
        // SAFETY: `request` is a valid ifreq that outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn control_error(&self, operation: &'static str) -> io::Error {
        let source = io::Error::last_os_error();
        let kind = source.kind();
        io::Error::new(
            kind,
            TapError::Control {
                name: self.name.clone(),
                operation,
                source,
            },
        )
    }
}

fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

fn interface_request(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (byte arrays, integers, raw pointers in a union) for which
    // all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // Names are validated to at most 15 bytes, so the terminating NUL stays in place.
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = flags as libc::c_short;
    request
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl TapQueue for Tap {
    fn set_vnet_header_len(&self, len: usize) -> io::Result<()> {
        let len = len as libc::c_int;
        // TUNSETVNETHDRSZ = _IOW('T', 216, int); it reads one int.
        // SAFETY: the pointer is to `len`, which outlives the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
        if ret < 0 {
            return Err(self.control_error("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        // TUNSETOFFLOAD = _IOW('T', 208, unsigned int); the flags are passed by value.
        // SAFETY: no memory is passed to the kernel.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        };
        if ret < 0 {
            return Err(self.control_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        let flags = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut request = interface_request("", flags);
        // TUNSETQUEUE = _IOW('T', 217, int); it reads the flags of a `struct ifreq`.
        // SAFETY: `request` is a valid ifreq that outlives the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut request) };
        if ret < 0 {
            return Err(self.control_error("TUNSETQUEUE"));
        }
        Ok(())
    }
}
