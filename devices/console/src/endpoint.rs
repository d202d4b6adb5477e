//! The host side of the console. Every descriptor is non-blocking: the queue worker never waits
//! on it, it registers for readiness instead.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use hvisor_vhost_core::socket::{ListenError, listen_at};
use log::info;

/// What a PTY reports before anyone sets its size; the size hvisor-tool's daemon announces.
const DEFAULT_COLS: u16 = 80;
const DEFAULT_ROWS: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot create a pseudo-terminal ({step}): {source}")]
    Pty {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("console socket: {0}")]
    Listen(#[from] ListenError),
    #[error("cannot make console socket {path} non-blocking: {source}")]
    NonBlocking {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up stdin/stdout: {0}")]
    Stdio(io::Error),
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Reads into `buf` without blocking.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; a bad `fd` only makes the call fail.
    let read = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if read < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(read as usize)
    }
}

/// Writes from `data` without blocking (SIGPIPE is ignored by Rust programs, so a closed peer
/// is an EPIPE error).
pub fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length; a bad `fd` only makes the call fail.
    let written = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if written < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(written as usize)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a descriptor with integer arguments touches no memory.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(flags)
}

fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; zeroes are a valid value to be overwritten.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `termios` is a valid, writable termios.
    check(unsafe { libc::tcgetattr(fd, &raw mut termios) })?;
    Ok(termios)
}

fn set_termios(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: `termios` is a valid termios read by the call.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, termios) }).map(drop)
}

/// The terminal size of `fd`, if it is a terminal with a size set.
fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; zeroes are a valid value to be overwritten.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the valid pointer.
    let result = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_col > 0 && size.ws_row > 0).then_some((size.ws_col, size.ws_row))
}

/// A pseudo-terminal whose slave side users attach to.
pub struct Pty {
    master: OwnedFd,
    /// Held open so the master never sees EIO/HUP while nobody is attached.
    _slave: File,
    path: PathBuf,
}

impl Pty {
    pub fn open() -> Result<Self, EndpointError> {
        let step = |step| move |source| EndpointError::Pty { step, source };
        // SAFETY: plain syscall; the result is checked.
        let fd =
            check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })
                .map_err(step("posix_openpt"))?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: grantpt/unlockpt only take the descriptor.
        check(unsafe { libc::grantpt(master.as_raw_fd()) }).map_err(step("grantpt"))?;
        // SAFETY: as above.
        check(unsafe { libc::unlockpt(master.as_raw_fd()) }).map_err(step("unlockpt"))?;
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is writable for its whole length, which is passed along.
        let result = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if result != 0 {
            return Err(step("ptsname_r")(io::Error::from_raw_os_error(result)));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let path = PathBuf::from(
            unsafe { CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .map_err(step("opening the slave"))?;
        // Raw mode with NL -> CRNL on output, as hvisor-tool's daemon sets it up.
        let mut termios = get_termios(slave.as_raw_fd()).map_err(step("tcgetattr"))?;
        // SAFETY: `termios` is a valid termios to modify in place.
        unsafe { libc::cfmakeraw(&raw mut termios) };
        termios.c_oflag |= libc::OPOST | libc::ONLCR;
        set_termios(slave.as_raw_fd(), &termios).map_err(step("tcsetattr"))?;
        set_nonblocking(master.as_raw_fd()).map_err(step("O_NONBLOCK"))?;
        if window_size(master.as_raw_fd()).is_none() {
            let size = libc::winsize {
                ws_row: DEFAULT_ROWS,
                ws_col: DEFAULT_COLS,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
            check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) })
                .map_err(step("TIOCSWINSZ"))?;
        }
        info!(
            "console on {} (attach with e.g. `screen {0}`)",
            path.display()
        );
        Ok(Pty {
            master,
            _slave: slave,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A listening socket and at most one client.
pub struct SocketServer {
    listener: UnixListener,
    client: Option<UnixStream>,
    path: PathBuf,
}

impl SocketServer {
    /// Listens on `path`, replacing a stale socket file but never any other file.
    pub fn bind(path: &Path) -> Result<Self, EndpointError> {
        let listener = listen_at(path)?;
        listener
            .set_nonblocking(true)
            .map_err(|source| EndpointError::NonBlocking {
                path: path.to_owned(),
                source,
            })?;
        info!("console on socket {}", path.display());
        Ok(SocketServer {
            listener,
            client: None,
            path: path.to_owned(),
        })
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A pair of already-open streams; `restore` puts a terminal back as it was found.
pub struct Streams {
    input: OwnedFd,
    output: OwnedFd,
    restore: Vec<(RawFd, libc::c_int, Option<libc::termios>)>,
}

impl Streams {
    /// Uses `input` and `output` as they are, made non-blocking.
    pub fn new(input: OwnedFd, output: OwnedFd) -> io::Result<Self> {
        set_nonblocking(input.as_raw_fd())?;
        set_nonblocking(output.as_raw_fd())?;
        Ok(Streams {
            input,
            output,
            restore: Vec::new(),
        })
    }

    /// This process's stdin and stdout. A terminal on stdin stops echoing and line editing
    /// (signal keys keep working, so Ctrl-C still stops the daemon); both are restored on drop.
    pub fn stdio() -> Result<Self, EndpointError> {
        let dup = |fd| {
            // SAFETY: dup on a descriptor; the result is checked and then owned.
            check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
                // SAFETY: the fresh duplicate is owned by nothing else.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let input = dup(libc::STDIN_FILENO).map_err(EndpointError::Stdio)?;
        let output = dup(libc::STDOUT_FILENO).map_err(EndpointError::Stdio)?;
        let mut restore = Vec::new();
        for fd in [input.as_raw_fd(), output.as_raw_fd()] {
            let flags = set_nonblocking(fd).map_err(EndpointError::Stdio)?;
            restore.push((fd, flags, get_termios(fd).ok()));
        }
        if let Ok(mut termios) = get_termios(input.as_raw_fd()) {
            termios.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
            termios.c_iflag &= !(libc::ICRNL | libc::IXON);
            termios.c_cc[libc::VMIN] = 1;
            termios.c_cc[libc::VTIME] = 0;
            set_termios(input.as_raw_fd(), &termios).map_err(EndpointError::Stdio)?;
        }
        Ok(Streams {
            input,
            output,
            restore,
        })
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for (fd, flags, termios) in &self.restore {
            if let Some(termios) = termios {
                let _ = set_termios(*fd, termios);
            }
            // SAFETY: fcntl with integer arguments on a descriptor we still own.
            unsafe { libc::fcntl(*fd, libc::F_SETFL, *flags) };
        }
    }
}

/// The host side the console talks to.
pub enum Endpoint {
    Pty(Pty),
    Socket(SocketServer),
    Streams(Streams),
}

impl Endpoint {
    /// Where guest input comes from, while there is a peer.
    pub fn input_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Pty(pty) => Some(pty.master.as_raw_fd()),
            Endpoint::Socket(server) => server.client.as_ref().map(AsRawFd::as_raw_fd),
            Endpoint::Streams(streams) => Some(streams.input.as_raw_fd()),
        }
    }

    /// Where guest output goes, while there is a peer.
    pub fn output_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Pty(pty) => Some(pty.master.as_raw_fd()),
            Endpoint::Socket(server) => server.client.as_ref().map(AsRawFd::as_raw_fd),
            Endpoint::Streams(streams) => Some(streams.output.as_raw_fd()),
        }
    }

    /// The listening socket, while it waits for a client.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Socket(server) if server.client.is_none() => {
                Some(server.listener.as_raw_fd())
            }
            _ => None,
        }
    }

    /// Whether the peer can go away and another come (so a failed peer is dropped, not
    /// written off).
    pub fn reconnects(&self) -> bool {
        matches!(self, Endpoint::Socket(_))
    }

    /// Accepts a waiting client; `Ok(false)` if none is waiting.
    pub fn accept(&mut self) -> io::Result<bool> {
        let Endpoint::Socket(server) = self else {
            return Ok(false);
        };
        if server.client.is_some() {
            return Ok(false);
        }
        match server.listener.accept() {
            Ok((client, _)) => {
                client.set_nonblocking(true)?;
                info!("console client connected on {}", server.path.display());
                server.client = Some(client);
                Ok(true)
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Drops the socket client; the next one may connect.
    pub fn disconnect(&mut self) {
        if let Endpoint::Socket(server) = self {
            if server.client.take().is_some() {
                info!("console client left {}", server.path.display());
            }
        }
    }

    /// Columns and rows, where the host side is a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        match self {
            Endpoint::Pty(pty) => window_size(pty.master.as_raw_fd()),
            Endpoint::Socket(_) => None,
            Endpoint::Streams(streams) => window_size(streams.output.as_raw_fd())
                .or_else(|| window_size(streams.input.as_raw_fd())),
        }
    }

    pub fn pty_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Pty(pty) => Some(pty.path()),
            _ => None,
        }
    }
}
