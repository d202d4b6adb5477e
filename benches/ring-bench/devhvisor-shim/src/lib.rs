//! devhvisor-shim: an `LD_PRELOAD` library that makes `/dev/hvisor` of a program built for
//! hvisor (hvisor-tool's virtio daemon) come from a hand-off socket (docs/hypervisor-socket.md),
//! so the unmodified program runs against the simulator or any other hypervisor side.
//!
//! `HVISOR_SHIM_SOCKET` names the socket. Opening `/dev/hvisor` connects to it, receives the
//! hello, checks it, and replies with a FINISH eventfd; the descriptor returned is the
//! connection. On that descriptor:
//!
//! | call | hvisor.ko | here |
//! |---|---|---|
//! | `ioctl(HVISOR_INIT_VIRTIO)` | allocates and zeroes the bridge page | 0 (the hypervisor side zeroed it) |
//! | `ioctl(HVISOR_SET_EVENTFD, efd)` | signals `efd` on each wake-up IRQ | `efd` becomes the hello's wake-up eventfd (`dup3`): the hypervisor side writes it directly |
//! | `ioctl(HVISOR_FINISH_REQ)` | hypercall 1 | adds 1 to the FINISH eventfd |
//! | other ioctls | (zones, SCMI, images) | `ENOTTY`, with a line on standard error |
//! | `mmap(offset 0)` | the bridge page | the hello's bridge memfd |
//! | `mmap(offset zone0_ipa)` | the physical pages of zone RAM | the window with that `zone0_ipa`, at its offset |
//! | `close` | | closes the connection: the hypervisor side sees the daemon go |
//!
//! Every other descriptor and path goes to the C library untouched. The wake-up path costs no
//! extra thread or copy: the daemon reads the very eventfd the hypervisor side writes.
//!
//! `open` and `ioctl` are variadic in C; they are defined here with their optional argument
//! as a fixed one, which on the Linux ABIs of x86_64 and aarch64 arrives in the same register
//! (garbage when the caller passed none, and then unused).

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulong, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use hvisor_transport::abi::{HVISOR_FINISH_REQ, HVISOR_INIT_VIRTIO, HVISOR_SET_EVENTFD};
use hvisor_transport::handoff::{self, DaemonReply, Handoff, HypervisorHello};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// The environment variable naming the hand-off socket.
const SOCKET_VARIABLE: &str = "HVISOR_SHIM_SOCKET";
const DEVICE_PATH: &CStr = c"/dev/hvisor";

/// The descriptor returned for `/dev/hvisor`, or -1: checked first by every interposed call,
/// so other descriptors pay one load.
static DEVICE_FD: AtomicI32 = AtomicI32::new(-1);
static DEVICE: Mutex<Option<Device>> = Mutex::new(None);

/// What the hand-off gave, kept while `/dev/hvisor` is open.
struct Device {
    handoff: Handoff,
    finish: EventFd,
}

fn report(message: &str) {
    eprintln!("devhvisor-shim: {message}");
}

fn set_errno(errno: c_int) {
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's lifetime.
    unsafe { *libc::__errno_location() = errno };
}

/// The next definition of `name` after this library (the C library's), resolved once.
fn next_symbol(cache: &OnceLock<usize>, name: &CStr) -> usize {
    *cache.get_or_init(|| {
        // SAFETY: RTLD_NEXT with a NUL-terminated name; the result is checked below.
        let address = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        if address.is_null() {
            report(&format!("no {name:?} after this library"));
            std::process::abort();
        }
        address as usize
    })
}

macro_rules! real {
    ($name:literal, $type:ty) => {{
        static CACHE: OnceLock<usize> = OnceLock::new();
        let address = next_symbol(&CACHE, $name);
        // SAFETY: `address` is the C library's definition of this symbol, whose C prototype
        // `$type` spells out.
        unsafe { std::mem::transmute::<usize, $type>(address) }
    }};
}

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, i64) -> *mut c_void;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;

/// Connects to the socket of `HVISOR_SHIM_SOCKET`, takes the hello and replies: the
/// descriptor for `/dev/hvisor`.
fn open_device() -> io::Result<RawFd> {
    let path = std::env::var_os(SOCKET_VARIABLE).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{SOCKET_VARIABLE} is not set: no hand-off socket to stand in for /dev/hvisor"),
        )
    })?;
    let described = |error: &dyn std::fmt::Display| {
        io::Error::other(format!("{}: {error}", path.to_string_lossy()))
    };
    let connection = UnixStream::connect(&path).map_err(|error| described(&error))?;
    let (message, files): (serde_json::Value, Vec<Option<File>>) =
        handoff::receive(&connection).map_err(|error| described(&error))?;
    let hello = HypervisorHello::from_json(&message).map_err(|error| described(&error))?;
    // No configuration here: the daemon maps what it needs and each mapping is checked then.
    let handoff = Handoff::check(&hello, files, &[]).map_err(|error| described(&error))?;
    let finish = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
    handoff::send(&connection, &DaemonReply::new(0), &[finish.as_raw_fd()])
        .map_err(|error| described(&error))?;
    let fd = connection.into_raw_fd();
    *DEVICE.lock().unwrap_or_else(PoisonError::into_inner) = Some(Device { handoff, finish });
    DEVICE_FD.store(fd, Ordering::Release);
    Ok(fd)
}

fn open_or_forward(path: *const c_char, flags: c_int, mode: c_uint, forward: OpenFn) -> c_int {
    // SAFETY: the caller passes a NUL-terminated path, as open(2) requires.
    if !path.is_null() && unsafe { CStr::from_ptr(path) } == DEVICE_PATH {
        return match open_device() {
            Ok(fd) => fd,
            Err(error) => {
                report(&format!("opening /dev/hvisor: {error}"));
                set_errno(libc::ENODEV);
                -1
            }
        };
    }
    // SAFETY: the caller's arguments, passed on as it passed them.
    unsafe { forward(path, flags, mode) }
}

/// Defines `open`-like entry points under each C library name (the names differ only in large
/// file support and `_FORTIFY_SOURCE`): with the mode argument, or without it for the checked
/// variants.
macro_rules! interpose_open {
    ($($name:ident => $real:literal),+) => {$(
        /// # Safety
        /// As open(2).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
            open_or_forward(path, flags, mode, real!($real, OpenFn))
        }
    )+};
    (checked: $($name:ident => $real:literal),+) => {$(
        /// # Safety
        /// As open(2).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int) -> c_int {
            open_or_forward(path, flags, 0, real!($real, OpenFn))
        }
    )+};
}

interpose_open!(open => c"open", open64 => c"open64");
interpose_open!(checked: __open_2 => c"open", __open64_2 => c"open64");

fn device_ioctl(request: c_ulong, arg: usize) -> c_int {
    let guard = DEVICE.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(device) = guard.as_ref() else {
        set_errno(libc::EBADF);
        return -1;
    };
    // The ioctl numbers fit 32 bits, so they are the same whatever the width of c_ulong.
    const INIT_VIRTIO: c_ulong = HVISOR_INIT_VIRTIO as c_ulong;
    const SET_EVENTFD: c_ulong = HVISOR_SET_EVENTFD as c_ulong;
    const FINISH_REQ: c_ulong = HVISOR_FINISH_REQ as c_ulong;
    let outcome = match request {
        INIT_VIRTIO => Ok(()),
        SET_EVENTFD => {
            // The argument is the eventfd itself, by value.
            let target = arg as c_int;
            // SAFETY: dup3 only changes the descriptor table; `target` is the daemon's own
            // eventfd, which it hands over to be signalled.
            let result =
                unsafe { libc::dup3(device.handoff.wakeup.as_raw_fd(), target, libc::O_CLOEXEC) };
            if result < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        FINISH_REQ => device.finish.write(1),
        other => {
            report(&format!(
                "ioctl {other:#x} on /dev/hvisor is not served from a hand-off socket"
            ));
            Err(io::Error::from_raw_os_error(libc::ENOTTY))
        }
    };
    match outcome {
        Ok(()) => 0,
        Err(error) => {
            set_errno(error.raw_os_error().unwrap_or(libc::EIO));
            -1
        }
    }
}

/// # Safety
/// As ioctl(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: usize) -> c_int {
    if fd >= 0 && fd == DEVICE_FD.load(Ordering::Acquire) {
        return device_ioctl(request, arg);
    }
    let forward = real!(c"ioctl", IoctlFn);
    // SAFETY: the caller's arguments, passed on as it passed them.
    unsafe { forward(fd, request, arg) }
}

/// Which file and offset stand for `offset` of `/dev/hvisor`, `len` bytes long.
fn device_backing(offset: i64, len: usize) -> Result<(RawFd, i64), String> {
    let guard = DEVICE.lock().unwrap_or_else(PoisonError::into_inner);
    let device = guard.as_ref().ok_or("/dev/hvisor is closed")?;
    if offset == 0 {
        return Ok((device.handoff.bridge.as_raw_fd(), 0));
    }
    let window = device
        .handoff
        .windows
        .iter()
        .find(|window| i64::try_from(window.zone0_ipa) == Ok(offset))
        .ok_or_else(|| format!("no RAM window at zone0_ipa {offset:#x}"))?;
    if len as u64 > window.size {
        return Err(format!(
            "{len:#x} bytes asked at zone0_ipa {offset:#x}; the window of zone {} has {:#x}",
            window.zone, window.size
        ));
    }
    let start = i64::try_from(window.offset).map_err(|_| "window offset beyond off_t")?;
    Ok((window.file.as_raw_fd(), start))
}

fn mmap_or_forward(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: i64,
    forward: MmapFn,
) -> *mut c_void {
    if fd >= 0 && fd == DEVICE_FD.load(Ordering::Acquire) {
        return match device_backing(offset, len) {
            // SAFETY: a mapping of a file the hand-off gave, as the caller asked it of
            // /dev/hvisor; the kernel checks the range.
            Ok((file, start)) => unsafe { forward(addr, len, prot, flags, file, start) },
            Err(message) => {
                report(&format!("mmap of /dev/hvisor: {message}"));
                set_errno(libc::EINVAL);
                libc::MAP_FAILED
            }
        };
    }
    // SAFETY: the caller's arguments, passed on as it passed them.
    unsafe { forward(addr, len, prot, flags, fd, offset) }
}

/// Defines `mmap` under each C library name (`mmap64` is the same call on 64-bit targets).
macro_rules! interpose_mmap {
    ($($name:ident => $real:literal),+) => {$(
        /// # Safety
        /// As mmap(2).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            addr: *mut c_void,
            len: usize,
            prot: c_int,
            flags: c_int,
            fd: c_int,
            offset: i64,
        ) -> *mut c_void {
            mmap_or_forward(addr, len, prot, flags, fd, offset, real!($real, MmapFn))
        }
    )+};
}

interpose_mmap!(mmap => c"mmap", mmap64 => c"mmap64");

/// # Safety
/// As close(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if fd >= 0
        && DEVICE_FD
            .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        // Closing the hand-off's files goes through `close` again, now as ordinary
        // descriptors: the lock is not held then.
        let device = DEVICE.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(device);
    }
    let forward = real!(c"close", CloseFn);
    // SAFETY: the caller's descriptor, passed on.
    unsafe { forward(fd) }
}
