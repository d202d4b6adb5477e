//! The virtio-console device as a `VhostUserBackend`: both queues and the host side on one
//! worker thread, so the data path needs no lock between directions.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{ByteValued, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap, Le16, Le32};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use hvisor_vhost_core::backend::{COMMON_FEATURES, GuestMemorySlot, common_protocol_features};
use hvisor_vhost_core::chain::{Direction, Segment, collect_segments, read_stream, write_stream};
use hvisor_vhost_core::config_space::read_config;
use hvisor_vhost_core::exit::new_exit_event;
use hvisor_vhost_core::log_limit::LogLimiter;
use hvisor_vhost_core::queue::{
    QueueState, Rings, has_available_buffers, queue_is_live, serve_queue,
};
use hvisor_vhost_core::{EventRegistry, VIRTIO_ID_CONSOLE, VirtioDevice};

use crate::config::{BackendConfig, ConsoleConfig};
use crate::endpoint::{Endpoint, EndpointError, Pty, SocketServer, Streams, read_fd, write_fd};
use crate::virtio_console::{RECEIVEQ, TRANSMITQ, VIRTIO_CONSOLE_F_SIZE, VirtioConsoleConfig};

pub const QUEUE_SIZE: u16 = 128;
const NUM_QUEUES: usize = 2;
/// Event ids of the host side, above the queues and the exit event (`NUM_QUEUES`).
/// The input descriptor, or the one descriptor carrying both directions (PTY, socket client).
pub const STREAM_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// A separate output descriptor (stdout).
pub const OUTPUT_EVENT: u16 = NUM_QUEUES as u16 + 2;
pub const LISTENER_EVENT: u16 = NUM_QUEUES as u16 + 3;
/// Guest output held while no socket client is connected; beyond it the guest waits.
pub const BACKLOG_LIMIT: usize = 64 << 10;
/// Input is read in pieces of this size, and only while the guest has buffers for it.
const CHUNK: usize = 4096;

static GUEST_MISTAKES: LogLimiter = LogLimiter::new(module_path!(), Duration::from_secs(1));
static HOST_FAILURES: LogLimiter = LogLimiter::new(module_path!(), Duration::from_secs(1));

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot open output log {path}: {source}")]
    OutputLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A transmit chain taken from the ring and not yet completed: its bytes up to `done` are with
/// the host side.
struct PendingTx {
    vring: VringRwLock,
    head: u16,
    segments: Vec<Segment>,
    total: u64,
    done: u64,
}

/// A descriptor in the worker's wait set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watch {
    fd: RawFd,
    events: EventSet,
    id: u16,
}

/// Everything the worker thread owns.
struct Console {
    endpoint: Endpoint,
    output_log: Option<File>,
    registry: Option<Arc<dyn EventRegistry>>,
    watches: Vec<Watch>,
    /// Guest output the host side has not taken yet, in order.
    pending_tx: Option<PendingTx>,
    /// Output accepted while no client is connected (or from a stopped queue).
    backlog: VecDeque<u8>,
    /// A write would block: wait until the output descriptor is writable.
    output_blocked: bool,
    /// Input read but not yet delivered; delivered before anything newer is read.
    pending_rx: Vec<u8>,
    /// The guest has receive buffers and input would block: wait until it is readable.
    input_wanted: bool,
    /// False once a non-reconnecting input (stdin) reached its end.
    input_open: bool,
    segments: Vec<Segment>,
    chunk: Vec<u8>,
    rings: Arc<Rings>,
}

impl Console {
    fn log_output(&mut self, data: &[u8]) {
        if let Some(log) = &mut self.output_log {
            if let Err(error) = log.write_all(data) {
                HOST_FAILURES.warn(format_args!("output log write failed: {error}"));
            }
        }
    }

    /// The host side failed for good; a socket client is dropped so the next may connect.
    fn drop_peer(&mut self, what: &str, error: io::Error) {
        if self.endpoint.reconnects() {
            debug!("console client gone ({what}: {error})");
            self.unwatch_peer();
            self.endpoint.disconnect();
            self.output_blocked = false;
            self.input_wanted = false;
        } else {
            HOST_FAILURES.warn(format_args!("console {what} failed: {error}"));
        }
    }

    /// Hands `data` to the host side; returns how much it took (0: wait for writability or a
    /// client).
    fn emit(&mut self, data: &[u8]) -> usize {
        if let Some(fd) = self
            .endpoint
            .output_fd()
            .filter(|_| self.backlog.is_empty())
        {
            let mut written = 0;
            // Until the descriptor says it is full: only then will it report writability.
            loop {
                match write_fd(fd, &data[written..]) {
                    Ok(count) if count > 0 && written + count < data.len() => written += count,
                    Ok(count) => {
                        written += count;
                        self.output_blocked = written < data.len();
                        self.log_output(&data[..written]);
                        return written;
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        self.output_blocked = true;
                        self.log_output(&data[..written]);
                        return written;
                    }
                    Err(error) => {
                        self.log_output(&data[..written]);
                        self.drop_peer("output", error);
                        if !self.endpoint.reconnects() {
                            // Nothing will ever take it (stdout closed); holding it would
                            // hang the guest forever.
                            self.log_output(&data[written..]);
                            return data.len();
                        }
                        if written > 0 {
                            return written;
                        }
                        break;
                    }
                }
            }
        }
        let taken = data
            .len()
            .min(BACKLOG_LIMIT.saturating_sub(self.backlog.len()));
        self.backlog.extend(&data[..taken]);
        self.log_output(&data[..taken]);
        taken
    }

    /// Writes held output to a connected peer; true once none is left.
    fn flush_backlog(&mut self) -> bool {
        while !self.backlog.is_empty() {
            let Some(fd) = self.endpoint.output_fd() else {
                return false;
            };
            let (front, _) = self.backlog.as_slices();
            match write_fd(fd, front) {
                Ok(written) => drop(self.backlog.drain(..written)),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.output_blocked = true;
                    return false;
                }
                Err(error) => {
                    let held = self.backlog.len();
                    self.drop_peer("output", error);
                    if !self.endpoint.reconnects() {
                        HOST_FAILURES.warn(format_args!("{held} bytes of held output discarded"));
                        self.backlog.clear();
                    }
                }
            }
        }
        true
    }

    /// Moves the pending chain's bytes to the host side; true once all were taken.
    fn push_pending(&mut self, pending: &mut PendingTx, mem: &GuestMemoryMmap) -> bool {
        let mut chunk = std::mem::take(&mut self.chunk);
        let finished = loop {
            if pending.done == pending.total {
                break true;
            }
            let len = (pending.total - pending.done).min(CHUNK as u64) as usize;
            if let Err(error) = read_stream(mem, &pending.segments, pending.done, &mut chunk[..len])
            {
                GUEST_MISTAKES.warn(format_args!(
                    "transmit chain {}: guest memory vanished after {} bytes: {error}",
                    pending.head, pending.done
                ));
                break true;
            }
            let taken = self.emit(&chunk[..len]);
            pending.done += taken as u64;
            if taken < len {
                break false;
            }
        };
        self.chunk = chunk;
        finished
    }

    fn transmit_batch(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) -> io::Result<(usize, QueueState)> {
        let mut completed = 0;
        loop {
            // With a peer that cannot take the held output yet, new output must wait behind
            // it. With no peer at all, new output joins the backlog (in order) until it is
            // full, which `push_pending` reports.
            if !self.flush_backlog() && self.endpoint.output_fd().is_some() {
                return Ok((completed, QueueState::Blocked));
            }
            if let Some(mut pending) = self.pending_tx.take() {
                if !self.push_pending(&mut pending, mem) {
                    self.pending_tx = Some(pending);
                    return Ok((completed, QueueState::Blocked));
                }
                if self
                    .rings
                    .add_used(&pending.vring, TRANSMITQ, pending.head, 0)
                {
                    completed += 1;
                }
                continue;
            }
            let Some(chain) = self.rings.pop(vring, TRANSMITQ, mem) else {
                return Ok((completed, QueueState::Drained));
            };
            let head = chain.head_index();
            let mut segments = std::mem::take(&mut self.segments);
            match collect_segments(chain, Direction::DeviceReadable, mem, &mut segments) {
                Ok(total) => {
                    self.pending_tx = Some(PendingTx {
                        vring: vring.clone(),
                        head,
                        segments,
                        total,
                        done: 0,
                    });
                }
                Err(error) => {
                    self.segments = segments;
                    GUEST_MISTAKES.warn(format_args!(
                        "transmitq: chain at descriptor {head} returned unused: {error}"
                    ));
                    if self.rings.add_used(vring, TRANSMITQ, head, 0) {
                        completed += 1;
                    }
                }
            }
        }
    }

    /// Reads more input; true if some arrived.
    fn read_input(&mut self) -> bool {
        let Some(fd) = self.endpoint.input_fd().filter(|_| self.input_open) else {
            return false;
        };
        self.pending_rx.resize(CHUNK, 0);
        let result = loop {
            match read_fd(fd, &mut self.pending_rx) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                result => break result,
            }
        };
        self.pending_rx.truncate(*result.as_ref().unwrap_or(&0));
        match result {
            Ok(0) if self.endpoint.reconnects() => {
                self.drop_peer("input", io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            Ok(0) => {
                info!("console input ended");
                self.input_open = false;
            }
            Ok(_) => return true,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.input_wanted = true,
            Err(error) => {
                self.drop_peer("input", error);
                self.input_open = self.endpoint.reconnects();
            }
        }
        false
    }

    fn receive_batch(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) -> io::Result<(usize, QueueState)> {
        let mut completed = 0;
        loop {
            if self.pending_rx.is_empty() {
                // Input is read only into buffers the guest has already posted.
                if !has_available_buffers(vring, mem) {
                    return Ok((completed, QueueState::Drained));
                }
                if !self.read_input() {
                    return Ok((completed, QueueState::Blocked));
                }
            }
            let Some(chain) = self.rings.pop(vring, RECEIVEQ, mem) else {
                return Ok((completed, QueueState::Drained));
            };
            let head = chain.head_index();
            let used_len =
                match collect_segments(chain, Direction::DeviceWritable, mem, &mut self.segments) {
                    Ok(capacity) => {
                        let len = (capacity as usize).min(self.pending_rx.len());
                        match write_stream(mem, &self.segments, &self.pending_rx[..len]) {
                            Ok(()) => {
                                self.pending_rx.drain(..len);
                                len as u32
                            }
                            Err(error) => {
                                GUEST_MISTAKES.warn(format_args!(
                                    "receiveq: chain at descriptor {head} unusable: {error}"
                                ));
                                0
                            }
                        }
                    }
                    Err(error) => {
                        GUEST_MISTAKES.warn(format_args!(
                            "receiveq: chain at descriptor {head} returned unused: {error}"
                        ));
                        0
                    }
                };
            if self.rings.add_used(vring, RECEIVEQ, head, used_len) {
                completed += 1;
            }
        }
    }

    fn serve_transmit(&mut self, vring: &VringRwLock, mem: &GuestMemoryMmap, event_idx: bool) {
        self.output_blocked = false;
        if !queue_is_live(vring) {
            // Output held from before the queue stopped still goes out.
            self.flush_backlog();
            return;
        }
        if let Err(error) = serve_queue(vring, event_idx, || self.transmit_batch(vring, mem)) {
            GUEST_MISTAKES.warn(format_args!("transmitq: {error}"));
        }
    }

    fn serve_receive(&mut self, vring: &VringRwLock, mem: &GuestMemoryMmap, event_idx: bool) {
        self.input_wanted = false;
        if !queue_is_live(vring) {
            return;
        }
        if let Err(error) = serve_queue(vring, event_idx, || self.receive_batch(vring, mem)) {
            GUEST_MISTAKES.warn(format_args!("receiveq: {error}"));
        }
    }

    /// The wait set the current state calls for: input only while the guest waits for it,
    /// output only while a write would block, the listener only while no client is connected.
    fn wanted_watches(&self) -> Vec<Watch> {
        let mut watches = Vec::new();
        let input = self
            .endpoint
            .input_fd()
            .filter(|_| self.input_wanted && self.input_open);
        let output = self.endpoint.output_fd().filter(|_| self.output_blocked);
        match (input, output) {
            (Some(input), Some(output)) if input == output => watches.push(Watch {
                fd: input,
                events: EventSet::IN | EventSet::OUT,
                id: STREAM_EVENT,
            }),
            _ => {
                if let Some(fd) = input {
                    watches.push(Watch {
                        fd,
                        events: EventSet::IN,
                        id: STREAM_EVENT,
                    });
                }
                if let Some(fd) = output {
                    let id = if self.endpoint.input_fd() == Some(fd) {
                        STREAM_EVENT
                    } else {
                        OUTPUT_EVENT
                    };
                    watches.push(Watch {
                        fd,
                        events: EventSet::OUT,
                        id,
                    });
                }
            }
        }
        if let Some(fd) = self.endpoint.listener_fd() {
            watches.push(Watch {
                fd,
                events: EventSet::IN,
                id: LISTENER_EVENT,
            });
        }
        watches
    }

    fn sync_watches(&mut self) {
        let Some(registry) = self.registry.clone() else {
            return;
        };
        let wanted = self.wanted_watches();
        let current = std::mem::take(&mut self.watches);
        for watch in current.iter().filter(|watch| !wanted.contains(watch)) {
            if let Err(error) = registry.unregister(watch.fd, watch.events, u64::from(watch.id)) {
                HOST_FAILURES.warn(format_args!("cannot unwatch fd {}: {error}", watch.fd));
            }
        }
        for watch in wanted {
            if current.contains(&watch) {
                self.watches.push(watch);
            } else {
                match registry.register(watch.fd, watch.events, u64::from(watch.id)) {
                    Ok(()) => self.watches.push(watch),
                    Err(error) => {
                        HOST_FAILURES.warn(format_args!("cannot watch fd {}: {error}", watch.fd));
                    }
                }
            }
        }
    }

    /// Takes the peer's descriptors out of the wait set before they are closed: a closed
    /// descriptor leaves epoll by itself, and its number may come back with the next client.
    fn unwatch_peer(&mut self) {
        let peer = [self.endpoint.input_fd(), self.endpoint.output_fd()];
        let registry = self.registry.clone();
        self.watches.retain(|watch| {
            if !peer.contains(&Some(watch.fd)) {
                return true;
            }
            if let Some(registry) = &registry {
                let _ = registry.unregister(watch.fd, watch.events, u64::from(watch.id));
            }
            false
        });
    }
}

/// Opens the output log for appending, without ever blocking: a FIFO no process reads is
/// refused at once (opening it for writing would wait for a reader), and writes to a FIFO whose
/// reader falls behind fail instead of stalling the console, which loses part of the copy rather
/// than the guest's progress.
fn open_output_log(path: &Path) -> Result<File, ConsoleError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| {
            let source = if source.raw_os_error() == Some(libc::ENXIO) {
                io::Error::new(
                    source.kind(),
                    "it is a FIFO that no process has open for reading",
                )
            } else {
                source
            };
            ConsoleError::OutputLog {
                path: path.to_owned(),
                source,
            }
        })
}

/// A virtio console with one port.
pub struct ConsoleBackend {
    console: Mutex<Console>,
    /// The console's, outside its lock: the transport reaches them while a worker holds it.
    rings: Arc<Rings>,
    has_size: bool,
    pty_path: Option<PathBuf>,
    event_idx: AtomicBool,
    memory: GuestMemorySlot,
}

impl ConsoleBackend {
    /// Opens the host side a validated config describes.
    pub fn new(config: &ConsoleConfig) -> Result<Self, ConsoleError> {
        let endpoint = match &config.backend {
            BackendConfig::Pty => Endpoint::Pty(Pty::open()?),
            BackendConfig::UnixSocket(path) => Endpoint::Socket(SocketServer::bind(path)?),
            BackendConfig::Stdio => Endpoint::Streams(Streams::stdio()?),
        };
        Self::with_endpoint(endpoint, config.output_log.as_deref())
    }

    pub fn with_endpoint(
        endpoint: Endpoint,
        output_log: Option<&Path>,
    ) -> Result<Self, ConsoleError> {
        let output_log = output_log.map(open_output_log).transpose()?;
        let rings = Arc::new(Rings::default());
        Ok(ConsoleBackend {
            has_size: endpoint.size().is_some(),
            pty_path: endpoint.pty_path().map(Path::to_owned),
            console: Mutex::new(Console {
                endpoint,
                output_log,
                registry: None,
                watches: Vec::new(),
                pending_tx: None,
                backlog: VecDeque::new(),
                output_blocked: false,
                pending_rx: Vec::with_capacity(CHUNK),
                input_wanted: false,
                input_open: true,
                segments: Vec::new(),
                chunk: vec![0; CHUNK],
                rings: rings.clone(),
            }),
            rings,
            event_idx: AtomicBool::new(false),
            memory: GuestMemorySlot::default(),
        })
    }

    /// The PTY slave users attach to (e.g. `screen /dev/pts/3`), for a PTY console.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }

    fn console(&self) -> MutexGuard<'_, Console> {
        self.console
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn guest_memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.memory.current()
    }

    fn config_space(&self) -> VirtioConsoleConfig {
        let (cols, rows) = self.console().endpoint.size().unwrap_or((0, 0));
        VirtioConsoleConfig {
            cols: Le16::from(cols),
            rows: Le16::from(rows),
            max_nr_ports: Le32::from(1),
            emerg_wr: Le32::from(0),
        }
    }
}

impl VirtioDevice for ConsoleBackend {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn rings(&self) -> &Rings {
        &self.rings
    }

    fn attach_event_registry(
        &self,
        thread_id: usize,
        registry: Arc<dyn EventRegistry>,
    ) -> io::Result<()> {
        if thread_id != 0 {
            return Ok(());
        }
        let mut console = self.console();
        console.registry = Some(registry);
        console.sync_watches();
        Ok(())
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        let mut features = COMMON_FEATURES;
        if self.has_size {
            features |= 1 << VIRTIO_CONSOLE_F_SIZE;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        common_protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(self.config_space().as_slice(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // EMERG_WRITE is not offered, so no field is writable.
        GUEST_MISTAKES.warn(format_args!(
            "config write of {} bytes at offset {offset} refused: the console config is read-only",
            buf.len()
        ));
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }

    fn update_memory(&self, memory: Memory) -> io::Result<()> {
        self.memory.replace(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Taking the lock waits for the batch in flight. A transmit chain the host side has not
        // fully taken is completed now, its remaining bytes held for later: the driver must get
        // every buffer back, and no byte may be lost.
        let mut console = self.console();
        if queue_index != u32::from(TRANSMITQ) {
            return Ok(());
        }
        let Some(pending) = console.pending_tx.take() else {
            return Ok(());
        };
        if let Some(mem) = self.guest_memory() {
            let mut rest = vec![0; (pending.total - pending.done) as usize];
            match read_stream(&mem, &pending.segments, pending.done, &mut rest) {
                Ok(()) => {
                    console.log_output(&rest);
                    console.backlog.extend(rest);
                }
                Err(error) => GUEST_MISTAKES.warn(format_args!(
                    "transmit chain {}: guest memory vanished: {error}",
                    pending.head
                )),
            }
        }
        if console
            .rings
            .add_used(&pending.vring, TRANSMITQ, pending.head, 0)
            && pending
                .vring
                .needs_notification()
                .map_err(io::Error::other)?
        {
            pending.vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn reset_device(&self) {
        let mut console = self.console();
        console.input_wanted = false;
        console.sync_watches();
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error returned from here stops the worker thread for good, so nothing is
        // propagated: guest mistakes and host-side failures are logged where they happen.
        let [receiveq, transmitq] = vrings else {
            warn!(
                "worker {thread_id}: {} queues instead of 2; event ignored",
                vrings.len()
            );
            return Ok(());
        };
        let Some(mem) = self.guest_memory() else {
            warn!("event {device_event} before guest memory was set; ignored");
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut console = self.console();
        match device_event {
            RECEIVEQ => console.serve_receive(receiveq, &mem, event_idx),
            TRANSMITQ => console.serve_transmit(transmitq, &mem, event_idx),
            STREAM_EVENT | OUTPUT_EVENT => {
                // Readable, writable or hung up: whichever it is, each direction finds out
                // by trying.
                console.serve_transmit(transmitq, &mem, event_idx);
                console.serve_receive(receiveq, &mem, event_idx);
            }
            LISTENER_EVENT => match console.endpoint.accept() {
                Ok(true) => {
                    console.serve_transmit(transmitq, &mem, event_idx);
                    console.serve_receive(receiveq, &mem, event_idx);
                }
                Ok(false) => {}
                Err(error) => HOST_FAILURES.warn(format_args!("console accept failed: {error}")),
            },
            _ => warn!("worker {thread_id}: unknown event {device_event} ({evset:?}); ignored"),
        }
        console.sync_watches();
        Ok(())
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
