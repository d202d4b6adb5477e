//! What the request loop and a remote device's link thread share: the connection's state, what
//! the backend must be told again after a reconnection, and the link thread, which watches the
//! connection and reconnects.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use log::{error, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::link::{Failed, InflightFd, Link, Watchdog, lock};
use super::{RECONNECT_INTERVAL, RECONNECT_WINDOW, RemoteError};
use crate::config::ExternalBackend;
use crate::mmio::{NeedsReset, QueueRegisters};

/// The state of the connection to the backend.
pub(super) enum Connection {
    Up(Link),
    /// The connection failed or hung up; the link thread connects again.
    Reconnecting,
    /// The backend did not come back in time: DEVICE_NEEDS_RESET is set, and the driver's
    /// reset starts another reconnection.
    Gone,
}

/// A ready queue, as the backend must know it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ring {
    pub(super) registers: QueueRegisters,
    /// DRIVER_OK: the ring is enabled.
    pub(super) live: bool,
}

pub(super) struct State {
    pub(super) connection: Connection,
    /// Counts the links made after the first, so that the link thread knows whether the
    /// hang-up it saw is the current link's.
    pub(super) generation: u64,
    /// The driver's features, once accepted at FEATURES_OK.
    pub(super) features: Option<u64>,
    /// Each queue the driver made ready.
    pub(super) queues: Vec<Option<Ring>>,
}

/// Why a message did not take effect.
pub(super) enum Undelivered {
    /// No connection: the backend is being reconnected, or gone.
    NoLink,
    /// The backend answered that it failed (or the frontend refused to send it).
    Refused(&'static str, vhost::Error),
    /// The connection failed and was closed (logged); the link thread reconnects.
    Broken,
}

/// What the request loop (through [`super::RemoteDevice`]) and the link thread share about
/// one backend.
pub(super) struct Session {
    pub(super) name: String,
    pub(super) backend: ExternalBackend,
    pub(super) memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Written by QueueNotify, read by the backend.
    pub(super) kicks: Vec<EventFd>,
    /// Written by the backend, read by the interrupt thread (duplicates of the line's).
    pub(super) calls: Vec<EventFd>,
    pub(super) needs_reset: NeedsReset,
    pub(super) watchdog: Watchdog,
    /// QueueNumMax: the largest ring the inflight region must track.
    pub(super) queue_size: u16,
    pub(super) state: Mutex<State>,
    /// The inflight region of the device's lifetime, once a backend that tracks in-flight
    /// requests handed one out; dropped at the driver's reset. Locked with `state` held.
    pub(super) inflight: Mutex<Option<InflightFd>>,
    /// Wakes the link thread: the connection changed, or the daemon stops.
    pub(super) wake: EventFd,
    pub(super) stopping: AtomicBool,
}

impl Session {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn socket(&self) -> std::path::Display<'_> {
        self.backend.socket.display()
    }

    pub(super) fn wake_link_thread(&self) {
        if let Err(error) = self.wake.write(1) {
            error!("{}: cannot wake the link thread: {error}", self.name);
        }
    }

    /// Runs `request` on the link under the watchdog. A connection failure closes the link and
    /// has the link thread reconnect.
    pub(super) fn send<T>(
        &self,
        state: &mut State,
        request: impl FnOnce(&mut Link) -> Result<T, Failed>,
    ) -> Result<T, Undelivered> {
        let Connection::Up(link) = &mut state.connection else {
            return Err(Undelivered::NoLink);
        };
        match self.watchdog.guard(|| request(link)) {
            Ok(value) => Ok(value),
            Err(failed) if !failed.connection_lost() => {
                Err(Undelivered::Refused(failed.message, failed.error))
            }
            Err(Failed { message, error }) => {
                error!(
                    "{}: vhost-user backend at {}: {message} failed: {error}; reconnecting",
                    self.name,
                    self.socket()
                );
                state.connection = Connection::Reconnecting;
                self.wake_link_thread();
                Err(Undelivered::Broken)
            }
        }
    }

    /// A message that changes the device's state did not take effect: the device needs a reset
    /// if the backend refused it or is gone. While the backend reconnects, what the message
    /// would have set is replayed to the new one.
    pub(super) fn undelivered(&self, state: &State, why: Undelivered) {
        match why {
            Undelivered::Refused(message, error) => {
                self.needs_reset.raise(
                    &self.name,
                    format_args!(
                        "the vhost-user backend at {} refused {message} ({error})",
                        self.socket()
                    ),
                );
            }
            Undelivered::NoLink if matches!(state.connection, Connection::Gone) => {
                self.needs_reset.raise(
                    &self.name,
                    format_args!("the vhost-user backend at {} is gone", self.socket()),
                );
            }
            Undelivered::NoLink | Undelivered::Broken => {}
        }
    }

    /// Runs `request` for a message that changes the device's state (see [`Self::undelivered`]).
    pub(super) fn apply(
        &self,
        state: &mut State,
        request: impl FnOnce(&mut Link) -> Result<(), Failed>,
    ) {
        if let Err(why) = self.send(state, request) {
            self.undelivered(state, why);
        }
    }

    /// Sets up ring `index` on the backend, resuming at avail index `base`, and enables it if
    /// it is live.
    pub(super) fn start_ring(
        &self,
        link: &mut Link,
        index: usize,
        ring: &Ring,
        base: u16,
    ) -> Result<(), Failed> {
        self.give_inflight(link)?;
        link.start_ring(
            index,
            (&ring.registers, &self.memory.memory()),
            base,
            (&self.calls[index], &self.kicks[index]),
        )?;
        if ring.live {
            self.enable_ring(link, index)?;
        }
        Ok(())
    }

    /// Before the first ring a backend sets up (per connection, and again after a reset), as
    /// QEMU's vhost-user-blk does at each start: a backend that tracks in-flight requests gets
    /// the device's inflight region, asked for once per device lifetime (GET_INFLIGHT_FD, after
    /// SET_FEATURES, which tells the backend the ring format) and given to it and to every
    /// backend process after it (SET_INFLIGHT_FD). A restarted backend resubmits what the region
    /// marks in flight and reads the available ring on after it, whatever SET_VRING_BASE says
    /// (libvhost-user and our own backends alike).
    fn give_inflight(&self, link: &mut Link) -> Result<(), Failed> {
        if !link.needs_inflight() {
            return Ok(());
        }
        let mut region = lock(&self.inflight);
        if region.is_some() {
            info!(
                "{}: inflight region handed to the vhost-user backend at {}",
                self.name,
                self.socket()
            );
        } else {
            let queues = u16::try_from(self.kicks.len()).unwrap_or(u16::MAX);
            *region = link.get_inflight(queues, self.queue_size)?;
            match region.as_ref() {
                Some(region) => info!(
                    "{}: the vhost-user backend at {} tracks in-flight requests in a region of \
                     {} bytes ({queues} queue(s) of {} entries)",
                    self.name,
                    self.socket(),
                    region.size(),
                    self.queue_size
                ),
                None => warn!(
                    "{}: the vhost-user backend at {} offers INFLIGHT_SHMFD but gave no inflight \
                     region for {queues} queue(s) of {} entries: in-flight requests are not \
                     tracked",
                    self.name,
                    self.socket(),
                    self.queue_size
                ),
            }
        }
        link.give_inflight(region.as_ref())
    }

    /// Enables ring `index` and kicks it, so that what the driver made available is served.
    pub(super) fn enable_ring(&self, link: &mut Link, index: usize) -> Result<(), Failed> {
        link.enable_ring(index, true)?;
        self.kick(index);
        Ok(())
    }

    pub(super) fn kick(&self, index: usize) {
        if let Err(error) = self.kicks[index].write(1) {
            error!("{}: kicking queue {index}: {error}", self.name);
        }
    }

    /// Gives a new backend everything the old one had: the memory table, the features, the
    /// inflight region (see [`Self::give_inflight`]) and the ready rings, each with
    /// SET_VRING_BASE = its used index in guest memory, as QEMU sends after a backend it lost
    /// (a backend with the inflight region starts after what it resubmits instead). Returns
    /// the rings restored, and whether the backend got an inflight region.
    fn restore(&self, state: &State, link: &mut Link) -> Result<(usize, bool), RemoteError> {
        let socket = &self.backend.socket;
        if link.queues < state.queues.len() {
            return Err(RemoteError::TooFewQueues {
                socket: socket.clone(),
                reported: link.queues as u64,
                wanted: state.queues.len() as u16,
            });
        }
        link.share_memory(&self.memory.memory(), &self.watchdog, socket)?;
        if let Some(features) = state.features {
            let missing = features & !link.features;
            if missing != 0 {
                return Err(RemoteError::LostFeatures {
                    socket: socket.clone(),
                    features: link.features,
                    missing,
                });
            }
            self.watchdog
                .guard(|| link.set_features(features))
                .map_err(|failed| failed.at(socket))?;
        }
        let mut restored = 0;
        for (index, ring) in state.queues.iter().enumerate() {
            let Some(ring) = ring else { continue };
            let used_index = GuestAddress(ring.registers.used + 2);
            let base = self
                .memory
                .memory()
                .read_obj::<u16>(used_index)
                .map(u16::from_le)
                .map_err(|_| RemoteError::Message {
                    socket: socket.clone(),
                    message: "SET_VRING_BASE",
                    source: vhost::Error::UsedAddress,
                })?;
            self.watchdog
                .guard(|| self.start_ring(link, index, ring, base))
                .map_err(|failed| failed.at(socket))?;
            restored += 1;
        }
        let tracked = restored > 0 && link.tracks_inflight() && lock(&self.inflight).is_some();
        Ok((restored, tracked))
    }

    /// Watches the connection for a hang-up and reconnects a backend that went away, until the
    /// daemon stops.
    pub(super) fn run_link_thread(&self) {
        if let Err(error) = self.watch_link() {
            error!("{}: link thread: {error}", self.name);
        }
    }

    fn watch_link(&self) -> io::Result<()> {
        const WAKE: u64 = 0;
        const HANGUP: u64 = 1;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        // The connection watched, with its generation.
        let mut watched: Option<(u64, UnixStream)> = None;
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
            let reconnect = {
                let state = self.lock();
                match &state.connection {
                    Connection::Up(link) => {
                        if watched.as_ref().map(|(generation, _)| *generation)
                            != Some(state.generation)
                        {
                            unwatch(&epoll, &mut watched)?;
                            let stream = link.stream.try_clone()?;
                            epoll.ctl(
                                ControlOperation::Add,
                                stream.as_raw_fd(),
                                EpollEvent::new(EventSet::READ_HANG_UP, HANGUP),
                            )?;
                            watched = Some((state.generation, stream));
                        }
                        false
                    }
                    Connection::Reconnecting => true,
                    Connection::Gone => false,
                }
            };
            if reconnect {
                unwatch(&epoll, &mut watched)?;
                self.reconnect(&epoll, &mut events);
                continue;
            }
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            for event in &events[..ready] {
                if event.data() == WAKE {
                    let _ = self.wake.read();
                    continue;
                }
                let Some(generation) = unwatch(&epoll, &mut watched)? else {
                    continue;
                };
                let mut state = self.lock();
                if state.generation == generation && matches!(state.connection, Connection::Up(_)) {
                    warn!(
                        "{}: the vhost-user backend at {} hung up; reconnecting",
                        self.name,
                        self.socket()
                    );
                    state.connection = Connection::Reconnecting;
                }
            }
        }
    }

    /// Connects again for up to [`RECONNECT_WINDOW`]; a backend that does not come back (or
    /// cannot take the device's state) sets DEVICE_NEEDS_RESET.
    fn reconnect(&self, epoll: &Epoll, events: &mut [EpollEvent]) {
        let deadline = Instant::now() + RECONNECT_WINDOW;
        loop {
            // Only this thread leaves Reconnecting.
            let attempt = Link::connect(&self.backend, &self.watchdog).and_then(|mut link| {
                let mut state = self.lock();
                let restored = self.restore(&state, &mut link)?;
                state.connection = Connection::Up(link);
                state.generation += 1;
                Ok(restored)
            });
            let error = match attempt {
                Ok((restored, tracked)) => {
                    let resumed = if tracked {
                        "the backend resubmits what its inflight region marks in flight"
                    } else {
                        "no inflight tracking: requests taken but not completed are served \
                         again from the used index"
                    };
                    info!(
                        "{}: reconnected to the vhost-user backend at {}; {restored} ring(s) \
                         restored ({resumed})",
                        self.name,
                        self.socket()
                    );
                    return;
                }
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                let mut state = self.lock();
                state.connection = Connection::Gone;
                error!(
                    "{}: the vhost-user backend did not come back within \
                     {RECONNECT_WINDOW:?}: {error}",
                    self.name
                );
                self.undelivered(&state, Undelivered::NoLink);
                return;
            }
            // Waits out the interval; a wake-up (the daemon stops) ends it early.
            let timeout = i32::try_from(RECONNECT_INTERVAL.as_millis()).unwrap_or(i32::MAX);
            if let Ok(ready) = epoll.wait(timeout, events) {
                if ready > 0 {
                    let _ = self.wake.read();
                }
            }
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// Stops watching the connection in `watched`, if any; returns its generation.
fn unwatch(epoll: &Epoll, watched: &mut Option<(u64, UnixStream)>) -> io::Result<Option<u64>> {
    let Some((generation, stream)) = watched.take() else {
        return Ok(None);
    };
    epoll.ctl(
        ControlOperation::Delete,
        stream.as_raw_fd(),
        EpollEvent::default(),
    )?;
    Ok(Some(generation))
}
