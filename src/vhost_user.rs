//! The vhost-user transport: serve any device backend to one frontend at a time, on one socket,
//! across frontend reconnects, until a stop is requested; and the termination-signal handling
//! both transports share, which bounds how long a stop may take.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use crate::frontend_relay;
use hvisor_vhost_device::queue::QueueFault;
use hvisor_vhost_device::{EventRegistry, VirtioDevice};
use log::{debug, error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on socket {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot register the device's own events: {0}")]
    Events(io::Error),
    #[error("waiting for a frontend on {path}: {source}")]
    Poll { path: PathBuf, source: io::Error },
}

/// How long a stop may take once a termination signal asked for it: long enough to finish
/// in-flight requests and flush a disk, short enough that a stuck worker cannot keep the
/// process (and its socket, its TAP, its images) alive.
pub const STOP_BOUND: Duration = Duration::from_secs(5);
/// Exit status of a process whose stop did not finish within [`STOP_BOUND`] (EX_SOFTWARE).
pub const STOP_TIMED_OUT_STATUS: i32 = 70;
/// How long the report of an unfinished stop may take to be logged before the process exits
/// without it (a stderr nobody drains blocks the logger).
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// Asks a serving loop to stop: wakes it while it waits for a frontend, and closes the
/// connection of the frontend it serves.
pub struct StopSignal {
    requested: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
    /// The step the serving code is in, for the report of a stop that does not finish.
    waiting_for: Mutex<&'static str>,
}

impl StopSignal {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(StopSignal {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            connection: Mutex::new(None),
            waiting_for: Mutex::new("the serving loop to notice the stop"),
        }))
    }

    /// Records what a stop would wait for from now on (e.g. "the queue workers to finish
    /// their batches").
    pub fn set_waiting_for(&self, what: &'static str) {
        *self
            .waiting_for
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = what;
    }

    /// What the stop waits for; never blocks (the lock is only held for an assignment).
    fn waiting_for(&self) -> &'static str {
        match self.waiting_for.try_lock() {
            Ok(what) => *what,
            Err(TryLockError::Poisoned(poisoned)) => *poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => "(being updated)",
        }
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(error) = self.wake.write(1) {
            warn!("cannot wake the serving loop: {error}");
        }
        if let Some(connection) = self.lock_connection().as_ref() {
            connection.shutdown();
        }
    }

    /// Readable once a stop was requested.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the live connection; closes it at once if a stop came first.
    fn set_connection(&self, connection: Option<ShutdownHandle>) {
        let mut slot = self.lock_connection();
        *slot = connection;
        // Checked under the lock: `request` either sees this handle or has already set the
        // flag we read here.
        if self.is_requested() {
            if let Some(connection) = slot.as_ref() {
                connection.shutdown();
            }
        }
    }
}

/// Stops `stop` on the first SIGINT or SIGTERM, and bounds the stop: a process still running
/// [`STOP_BOUND`] later, or when a second signal comes, logs what the stop waits for and
/// exits with [`STOP_TIMED_OUT_STATUS`] whatever its threads are doing.
///
/// No final flush is attempted then: writes the device completed are in the page cache and
/// survive the process, every flush a driver asked for was answered only once done, and a
/// worker that does not finish is most likely stuck on the storage itself, where a flush from
/// here would block the exit this bound guarantees.
pub fn stop_on_termination_signals(stop: Arc<StopSignal>) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            let Some(signal) = signals.next() else {
                return;
            };
            info!("signal {signal} received: finishing in-flight requests and stopping");
            stop.request();
            let watchdog = {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("stop-watchdog".into())
                    .spawn(move || {
                        std::thread::sleep(STOP_BOUND);
                        exit_unfinished(&stop, &format!("not stopped within {STOP_BOUND:?}"));
                    })
            };
            if let Err(error) = watchdog {
                warn!("the stop is not bounded: cannot start its watchdog: {error}");
            }
            if let Some(signal) = signals.next() {
                exit_unfinished(&stop, &format!("signal {signal} received again"));
            }
        })?;
    Ok(())
}

/// Ends the process with [`STOP_TIMED_OUT_STATUS`], after logging `why`, what the stop waits
/// for and the state of every thread. Takes no lock a stuck thread may hold: a timer ends the
/// process anyway if logging blocks.
fn exit_unfinished(stop: &StopSignal, why: &str) -> ! {
    let timer = std::thread::Builder::new()
        .name("exit-timer".into())
        .spawn(|| {
            std::thread::sleep(REPORT_GRACE);
            exit_now()
        });
    // Without the timer, a blocked logger would hold the exit: the report is left out.
    if timer.is_ok() {
        error!(
            "{why}: exiting with status {STOP_TIMED_OUT_STATUS}; the stop waits for {}; \
             threads: {}",
            stop.waiting_for(),
            thread_states()
        );
    }
    exit_now()
}

fn exit_now() -> ! {
    // SAFETY: _exit has no preconditions; it ends the process without running destructors or
    // atexit handlers, which could wait for locks the stuck threads hold.
    unsafe { libc::_exit(STOP_TIMED_OUT_STATUS) }
}

/// Every thread of this process as `name[tid] state wait-channel`, from /proc (no lock of ours
/// is taken): shows which worker is stuck and where.
fn thread_states() -> String {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return "(unreadable)".into();
    };
    let read = |task: &Path, file: &str| {
        std::fs::read_to_string(task.join(file)).unwrap_or_else(|_| "?".into())
    };
    let mut states: Vec<String> = tasks
        .flatten()
        .map(|task| {
            let path = task.path();
            let stat = read(&path, "stat");
            // The state follows the parenthesised name, which may itself hold spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?")
                .to_owned();
            format!(
                "{}[{}] {state} {}",
                read(&path, "comm").trim_end(),
                task.file_name().to_string_lossy(),
                read(&path, "wchan").trim_end()
            )
        })
        .collect();
    states.sort();
    states.join(", ")
}

/// A vhost-user-backend worker's epoll set, offered to the device.
struct HandlerRegistry<B: VhostUserBackend<Bitmap = ()>>(Arc<VringEpollHandler<B>>);

impl<B> EventRegistry for HandlerRegistry<B>
where
    B: VhostUserBackend<Bitmap = ()> + Send + Sync,
    B::Vring: Send + Sync,
{
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.0.register_listener(fd, events, data)
    }

    fn unregister(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.0.unregister_listener(fd, events, data)
    }
}

/// A listener in the abstract socket namespace (no file to clean up), private to this
/// process, where vhost-user-backend accepts the relayed connections.
fn relay_listener() -> io::Result<(SocketAddr, Listener)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "hvisor-vhost-relay-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let address = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&address)?;
    Ok((address, Listener::from(listener)))
}

/// Accepts the waiting frontend and starts relaying it to a connection on `relay_address`,
/// which the daemon then accepts. `None` when the frontend left before it was accepted.
fn accept_and_relay(
    listener: &Listener,
    relay_address: &SocketAddr,
) -> io::Result<Option<std::thread::JoinHandle<()>>> {
    let Some(frontend) = listener.accept().map_err(io::Error::other)? else {
        return Ok(None);
    };
    let backend = UnixStream::connect_addr(relay_address)?;
    let relay = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            if let Err(error) = frontend_relay::relay(frontend, backend) {
                debug!("vhost-user relay ended: {error}");
            }
        })?;
    Ok(Some(relay))
}

enum Wakeup {
    Frontend,
    Stop,
}

fn wait_for_frontend(listener: &Listener, stop: &StopSignal) -> io::Result<Wakeup> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if stop.is_requested() {
            return Ok(Wakeup::Stop);
        }
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if fds[1].revents != 0 {
            return Ok(Wakeup::Stop);
        }
        if fds[0].revents != 0 {
            return Ok(Wakeup::Frontend);
        }
    }
}

/// Serves `backend` on `socket_path` until `stop` is requested.
///
/// One listener is kept for the whole run, so a frontend that reconnects finds the socket
/// without an unlink/rebind window. `after_disconnect` runs after each frontend leaves (e.g.
/// to flush a disk). On return the worker threads have finished their in-flight requests and
/// the socket file is removed.
///
/// A queue the device stopped because the frontend broke its ring stays stopped until the
/// frontend starts it again (GET_VRING_BASE, then SET_VRING_KICK or SET_VRING_CALL, as on a
/// device reset or a reconnect); the connection is kept. Dropping it would stop the device's
/// other queues too and tell the frontend nothing more (vhost-user has no DEVICE_NEEDS_RESET),
/// and a frontend that reconnects (QEMU's `reconnect`) resumes from the same ring state, so
/// it would find the same fault and loop through reconnects.
pub fn serve<B>(
    name: &str,
    backend: B,
    socket_path: &Path,
    stop: &StopSignal,
    mut after_disconnect: impl FnMut(),
) -> Result<(), ServeError>
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    let listener = Listener::new(socket_path, true).map_err(|source| ServeError::Listen {
        path: socket_path.to_owned(),
        source,
    })?;
    // vhost-user-backend accepts its connections here, from the relay of each frontend.
    let (relay_address, mut relay_listener) =
        relay_listener().map_err(|source| ServeError::Poll {
            path: socket_path.to_owned(),
            source,
        })?;
    let fault_name = name.to_owned();
    backend.set_fault_handler(Arc::new(move |fault: &QueueFault| {
        warn!(
            "{fault_name}: queue {} stays stopped until the frontend starts it again; the \
             connection and the other queues go on",
            fault.queue
        )
    }));
    info!("{name}: listening on {}", socket_path.display());
    let result = loop {
        match wait_for_frontend(&listener, stop) {
            Ok(Wakeup::Stop) => break Ok(()),
            Ok(Wakeup::Frontend) => {}
            Err(source) => {
                break Err(ServeError::Poll {
                    path: socket_path.to_owned(),
                    source,
                });
            }
        }
        // A daemon per connection: vhost-user-backend keeps ownership and ring state in its
        // handler, so a second frontend on the same daemon would be refused at SET_OWNER.
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.to_owned(), backend.clone(), memory) {
            Ok(daemon) => daemon,
            Err(error) => break Err(ServeError::Daemon(error)),
        };
        for (thread_id, handler) in daemon.get_epoll_handlers().into_iter().enumerate() {
            if let Err(error) =
                backend.attach_event_registry(thread_id, Arc::new(HandlerRegistry(handler)))
            {
                warn!("{name}: device events of thread {thread_id} not registered: {error}");
            }
        }
        let relay = match accept_and_relay(&listener, &relay_address) {
            Ok(Some(relay)) => relay,
            Ok(None) => continue,
            Err(error) => {
                warn!("{name}: could not accept a frontend: {error}");
                continue;
            }
        };
        if let Err(error) = daemon.start(&mut relay_listener) {
            warn!("{name}: could not start serving the frontend: {error}");
            continue;
        }
        info!("{name}: frontend connected");
        stop.set_waiting_for("the frontend connection to end");
        stop.set_connection(daemon.shutdown_handle());
        match daemon.wait() {
            Ok(()) => info!("{name}: frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("{name}: frontend disconnected"),
            Err(error) => warn!("{name}: frontend connection ended: {error}"),
        }
        stop.set_connection(None);
        if relay.join().is_err() {
            warn!("{name}: the frontend relay panicked");
        }
        // Sends each worker its exit event and joins it once its current batch is complete.
        stop.set_waiting_for("the queue workers to finish their batches");
        drop(daemon);
        stop.set_waiting_for("the clean-up after the frontend left (a disk flush)");
        after_disconnect();
        stop.set_waiting_for("the serving loop to notice the stop");
    };
    if let Err(error) = std::fs::remove_file(socket_path) {
        if error.kind() != io::ErrorKind::NotFound {
            error!("cannot remove socket {}: {error}", socket_path.display());
        }
    }
    result
}
