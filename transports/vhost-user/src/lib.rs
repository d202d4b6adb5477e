//! The vhost-user transport: serve any device backend to one frontend at a time, on one socket,
//! across frontend reconnects, until a stop is requested.
//!
//! - this file: the accept/serve loop, one `VhostUserDaemon` per connection;
//! - [`frontend_relay`]: every frontend message, checked (and refused) before
//!   vhost-user-backend sees it; [`inflight_relay`] answers the inflight-region requests the
//!   crate refuses itself;
//! - [`memory_backing`]: guest memory files, their size checks and SIGBUS recovery.

mod frontend_relay;
mod inflight_relay;
mod memory_backing;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::inflight_relay::InflightRelay;
use crate::memory_backing::FaultWatch;
use hvisor_vhost_core::exit::WorkerExitEvents;
use hvisor_vhost_core::queue::QueueFault;
use hvisor_vhost_core::socket::{ListenError, listen_at};
use hvisor_vhost_core::stop::{Closer, StopSignal};
use hvisor_vhost_core::{EventRegistry, VirtioDevice};
use log::{debug, error, info, warn};
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot register the device's own events: {0}")]
    Events(io::Error),
    #[error("waiting for a frontend on {path}: {source}")]
    Poll { path: PathBuf, source: io::Error },
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
/// process, where vhost-user-backend accepts one relayed connection. A fresh one per
/// connection: a connection that failed halfway leaves nothing in its backlog for the next.
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

enum Wakeup {
    Frontend,
    Stop,
}

fn wait_for_frontend(listener: &Listener, stop: &StopSignal) -> io::Result<Wakeup> {
    loop {
        if stop.is_requested() {
            return Ok(Wakeup::Stop);
        }
        let [frontend, stop_requested] = wait_readable([listener.as_raw_fd(), stop.wake_fd()])?;
        if stop_requested {
            return Ok(Wakeup::Stop);
        }
        if frontend {
            return Ok(Wakeup::Frontend);
        }
    }
}

/// Waits until one of `fds` is readable (or closed) and says which are. A negative
/// descriptor is skipped.
pub(crate) fn wait_readable(fds: [RawFd; 2]) -> io::Result<[bool; 2]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `polled` is a valid array of two pollfd for the duration of the call.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if ready >= 0 {
            return Ok(polled.map(|fd| fd.revents != 0));
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Why one frontend could not be served. The serving loop logs it and carries on.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot make the worker threads' exit events: {0}")]
    ExitEvents(io::Error),
    #[error("cannot create the connection's vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot create the relay socket: {0}")]
    RelaySocket(io::Error),
    #[error("cannot accept the frontend: {0}")]
    Accept(vhost::vhost_user::Error),
    #[error("cannot connect the frontend to its daemon: {0}")]
    Connect(io::Error),
    #[error("cannot start serving the frontend: {0}")]
    Start(vhost_user_backend::Error),
    #[error("cannot start the frontend relay: {0}")]
    Relay(io::Error),
}

/// One frontend's vhost-user-backend daemon, with the exit events the crate leaves to us and
/// the watch over the frontend's memory files.
struct ConnectionDaemon<B: VhostUserBackend> {
    // Declared first, dropped first: its drop joins the worker threads, which wait on
    // `_exit_events` and may touch guest memory until then.
    daemon: VhostUserDaemon<B>,
    _exit_events: WorkerExitEvents,
    faults: Arc<FaultWatch>,
}

impl<B> ConnectionDaemon<B>
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    /// A daemon per connection: vhost-user-backend keeps ownership and ring state in its
    /// handler, so a second frontend on the same daemon would be refused at SET_OWNER.
    fn new(name: &str, backend: &B) -> Result<Self, ConnectionError> {
        let faults = Arc::new(FaultWatch::new());
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let (daemon, exit_events) =
            WorkerExitEvents::collect(backend.queues_per_thread().len(), || {
                VhostUserDaemon::new(name.to_owned(), backend.clone(), memory)
            })
            .map_err(ConnectionError::ExitEvents)?;
        // On failure `exit_events` stops the workers the daemon had already started.
        let daemon = daemon.map_err(ConnectionError::Daemon)?;
        for (thread_id, handler) in daemon.get_epoll_handlers().into_iter().enumerate() {
            if let Err(error) =
                backend.attach_event_registry(thread_id, Arc::new(HandlerRegistry(handler)))
            {
                warn!("{name}: device events of thread {thread_id} not registered: {error}");
            }
        }
        Ok(ConnectionDaemon {
            daemon,
            _exit_events: exit_events,
            faults,
        })
    }
}

/// Waits after a connection that could not be set up, longer each time in a row, so a
/// lasting shortage (no descriptors left, no memory) is neither a busy loop nor a flood of
/// log lines.
struct Backoff {
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const LONGEST: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Backoff { delay: Self::FIRST }
    }

    fn reset(&mut self) {
        self.delay = Self::FIRST;
    }

    /// Sleeps for the current delay, or less if a stop is requested, and doubles it.
    fn wait(&mut self, stop: &StopSignal) {
        let mut wake = libc::pollfd {
            fd: stop.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = libc::c_int::try_from(self.delay.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `wake` is a valid pollfd for the duration of the call. An early return
        // (a signal) only shortens the pause.
        unsafe { libc::poll(&raw mut wake, 1, timeout) };
        self.delay = (self.delay * 2).min(Self::LONGEST);
    }
}

/// Serves the frontend waiting on `listener` until it leaves or `stop` closes it. `Ok(false)`
/// when it left before it was accepted.
fn serve_one<B>(
    name: &str,
    backend: &B,
    listener: &Listener,
    stop: &StopSignal,
) -> Result<bool, ConnectionError>
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    // Set up before the frontend is accepted: one that cannot be served waits in the listen
    // queue meanwhile.
    let connection = ConnectionDaemon::new(name, backend)?;
    let relay = relay_listener().map_err(ConnectionError::RelaySocket)?;
    let Some(frontend) = listener.accept().map_err(ConnectionError::Accept)? else {
        return Ok(false);
    };
    serve_accepted(name, backend, connection, relay, frontend, stop)?;
    Ok(true)
}

/// Serves one frontend already connected on `frontend` until it leaves or `stop` closes it,
/// exactly as the serving loop serves each frontend it accepts (for in-process harnesses).
pub fn serve_frontend<B>(
    name: &str,
    backend: &B,
    frontend: UnixStream,
    stop: &StopSignal,
) -> Result<(), ConnectionError>
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    let connection = ConnectionDaemon::new(name, backend)?;
    let relay = relay_listener().map_err(ConnectionError::RelaySocket)?;
    serve_accepted(name, backend, connection, relay, frontend, stop)
}

fn serve_accepted<B>(
    name: &str,
    backend: &B,
    mut connection: ConnectionDaemon<B>,
    (relay_address, mut relay_listener): (SocketAddr, Listener),
    frontend: UnixStream,
    stop: &StopSignal,
) -> Result<(), ConnectionError>
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    let backend_end = UnixStream::connect_addr(&relay_address).map_err(ConnectionError::Connect)?;
    connection
        .daemon
        .start(&mut relay_listener)
        .map_err(ConnectionError::Start)?;
    let policy = frontend_relay::Policy {
        features: backend.features(),
        protocol_features: (backend.protocol_features() | VhostUserProtocolFeatures::REPLY_ACK)
            .bits(),
        max_queue_size: u32::try_from(backend.max_queue_size()).unwrap_or(u32::MAX),
    };
    let faults = connection.faults.clone();
    let inflight = tracks_inflight(backend).then(|| inflight_relay(backend));
    let relay = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let relayed = frontend_relay::relay(frontend, backend_end, policy, faults, inflight);
            if let Err(error) = relayed {
                debug!("vhost-user relay ended: {error}");
            }
        });
    let relay = match relay {
        Ok(relay) => relay,
        Err(error) => {
            connection.daemon.request_shutdown();
            let _ = connection.daemon.wait();
            return Err(ConnectionError::Relay(error));
        }
    };
    info!("{name}: frontend connected");
    stop.set_waiting_for("the frontend connection to end");
    let shutdown = connection.daemon.shutdown_handle();
    stop.set_closer(shutdown.map(|handle| Box::new(move || handle.shutdown()) as Closer));
    match connection.daemon.wait() {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => info!("{name}: frontend disconnected"),
        Err(error) => warn!("{name}: frontend connection ended: {error}"),
    }
    stop.set_closer(None);
    if relay.join().is_err() {
        warn!("{name}: the frontend relay panicked");
    }
    // Sends each worker its exit event and joins it once its current batch is complete. A
    // frontend that left without stopping its rings (GET_VRING_BASE) may have laid them out so
    // that a batch never ends: the device stops each queue where it would take the next chain.
    stop.set_waiting_for("the queue workers to finish their batches");
    backend.set_closing(true);
    drop(connection);
    backend.set_closing(false);
    // The device keeps the memory it was last given. Let it go, or the departed frontend's
    // guest RAM would stay allocated through our mapping until the next frontend's table.
    if let Err(error) = backend.update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new())) {
        warn!("{name}: cannot release the memory of the frontend that left: {error}");
    }
    // Only now, too: the answers to the requests still in flight when the frontend left were
    // recorded in the region, which the frontend hands to the next connection.
    if tracks_inflight(backend) {
        if let Err(error) = backend.set_inflight_region(None) {
            warn!("{name}: cannot drop the inflight region of the frontend that left: {error}");
        }
    }
    Ok(())
}

fn tracks_inflight<B: VhostUserBackend>(backend: &B) -> bool {
    backend
        .protocol_features()
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
}

/// The relay's inflight tracking for a connection to `backend`.
fn inflight_relay<B>(backend: &B) -> InflightRelay
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
{
    let clamp = |value: usize| u16::try_from(value).unwrap_or(u16::MAX);
    let device = backend.clone();
    InflightRelay::new(
        clamp(backend.num_queues()),
        clamp(backend.max_queue_size()),
        move |region| device.set_inflight_region(region),
    )
}

/// Serves `backend` on `socket_path` until `stop` is requested.
///
/// One listener is kept for the whole run, so a frontend that reconnects finds the socket
/// without an unlink/rebind window. `after_disconnect` runs after each frontend leaves (e.g.
/// to flush a disk). A frontend that cannot be served (no descriptors left, say) is logged
/// and the loop goes on, pausing longer after each failure in a row; one that cannot be
/// accepted waits in the listen queue meanwhile. On return the worker threads have finished
/// their in-flight requests and the socket file is removed.
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
    let listener = Listener::from(listen_at(socket_path)?);
    let fault_name = name.to_owned();
    backend.set_fault_handler(Arc::new(move |fault: &QueueFault| {
        warn!(
            "{fault_name}: queue {} stays stopped until the frontend starts it again; the \
             connection and the other queues go on",
            fault.queue
        );
    }));
    info!("{name}: listening on {}", socket_path.display());
    let mut backoff = Backoff::new();
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
        match serve_one(name, &backend, &listener, stop) {
            Ok(served) => {
                backoff.reset();
                if served {
                    stop.set_waiting_for("the clean-up after the frontend left (a disk flush)");
                    after_disconnect();
                    stop.set_waiting_for("the serving loop to notice the stop");
                }
            }
            Err(error) => {
                error!("{name}: {error}; still listening");
                backoff.wait(stop);
            }
        }
    };
    if let Err(error) = std::fs::remove_file(socket_path) {
        if error.kind() != io::ErrorKind::NotFound {
            error!("cannot remove socket {}: {error}", socket_path.display());
        }
    }
    result
}
