//! The virtio-rng device as a `VhostUserBackend`: one request queue on one worker thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use hvisor_vhost_core::backend::{COMMON_FEATURES, GuestMemorySlot, common_protocol_features};
use hvisor_vhost_core::chain::{Direction, Segment, collect_segments};
use hvisor_vhost_core::config_space::read_config;
use hvisor_vhost_core::exit::new_exit_event;
use hvisor_vhost_core::log_limit::LogLimiter;
use hvisor_vhost_core::queue::{QueueState, Rings, queue_is_live, serve_queue};
use hvisor_vhost_core::{EventRegistry, VIRTIO_ID_RNG, VirtioDevice};

use crate::config::RngConfig;
use crate::rate_limit::TokenBucket;
use crate::source::{EntropySource, OpenError};

pub const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 1;
const REQUEST_QUEUE_EVENT: u16 = 0;
/// The request queue's index in the device.
const REQUEST_QUEUE: u16 = 0;
/// The rate-limit timer's event id: above the queue and the exit event (`NUM_QUEUES`).
pub const RATE_LIMIT_TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// No single request holds the worker for longer than one read of this size.
pub const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// Guests provoke these at will; one line per second is enough to diagnose them.
static GUEST_MISTAKES: LogLimiter = LogLimiter::new(module_path!(), Duration::from_secs(1));
static SOURCE_SHORTFALLS: LogLimiter = LogLimiter::new(module_path!(), Duration::from_secs(1));
static RING_FAILURES: LogLimiter = LogLimiter::new(module_path!(), Duration::from_secs(1));

/// Errors building the backend.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot create the rate-limit timer: {0}")]
    Timer(io::Error),
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The optional rate limit: a bucket, and the timer that resumes a paused queue.
struct Throttle {
    bucket: TokenBucket,
    timer: TimerFd,
    armed: bool,
    registered: bool,
}

impl Throttle {
    fn new(bucket: TokenBucket) -> io::Result<Self> {
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh timerfd that nothing else owns.
        let timer = unsafe { TimerFd::from_raw_fd(fd) };
        Ok(Throttle {
            bucket,
            timer,
            armed: false,
            registered: false,
        })
    }

    /// Bytes the next request may take now; 0 pauses the queue until the timer fires.
    fn budget(&mut self, now: Instant) -> io::Result<u64> {
        let available = self.bucket.available(now);
        if available == 0 && !self.armed {
            if !self.registered {
                warn!(
                    "rate limit reached but no event registry holds the timer: requests wait for the next kick"
                );
            }
            self.timer.reset(self.bucket.time_to_refill(now), None)?;
            self.armed = true;
        }
        Ok(available)
    }

    fn expired(&mut self) {
        // The timer is non-blocking: reading clears its readiness, and a spurious event
        // (nothing to read) is harmless.
        let _ = self.timer.wait();
        self.armed = false;
    }
}

/// State of the one queue worker.
struct Worker {
    source: EntropySource,
    throttle: Option<Throttle>,
    segments: Vec<Segment>,
    rings: Arc<Rings>,
}

impl Worker {
    /// Serves requests until the ring is empty or the rate limit pauses it.
    fn serve_batch(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
    ) -> io::Result<(usize, QueueState)> {
        let mut completed = 0;
        loop {
            let budget = match &mut self.throttle {
                None => MAX_REQUEST_BYTES,
                Some(throttle) => match throttle.budget(Instant::now())? {
                    0 => return Ok((completed, QueueState::Blocked)),
                    available => available.min(MAX_REQUEST_BYTES),
                },
            };
            let Some(chain) = self.rings.pop(vring, REQUEST_QUEUE, mem) else {
                return Ok((completed, QueueState::Drained));
            };
            let head = chain.head_index();
            let used_len =
                match collect_segments(chain, Direction::DeviceWritable, mem, &mut self.segments) {
                    Ok(capacity) => self.fill(head, mem, capacity.min(budget)),
                    Err(error) => {
                        GUEST_MISTAKES.warn(format_args!(
                            "request at descriptor {head} returned unused: {error}"
                        ));
                        0
                    }
                };
            if self.rings.add_used(vring, REQUEST_QUEUE, head, used_len) {
                completed += 1;
            }
        }
    }

    fn fill(&mut self, head: u16, mem: &GuestMemoryMmap, wanted: u64) -> u32 {
        let (filled, shortfall) = self.source.fill(mem, &self.segments, wanted);
        if let Some(shortfall) = shortfall {
            SOURCE_SHORTFALLS.warn(format_args!(
                "request at descriptor {head}: {filled} of {wanted} bytes from {}: {shortfall}",
                self.source.path().display()
            ));
        }
        if let Some(throttle) = &mut self.throttle {
            throttle.bucket.consume(filled);
        }
        // `wanted` is at most MAX_REQUEST_BYTES.
        filled as u32
    }
}

/// A virtio entropy device over an [`EntropySource`].
pub struct RngBackend {
    worker: Mutex<Worker>,
    /// The worker's, outside its lock: the transport reaches them while a worker holds it.
    rings: Arc<Rings>,
    event_idx: AtomicBool,
    memory: GuestMemorySlot,
}

impl RngBackend {
    /// Opens the source a validated config names.
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        let source = EntropySource::open(&config.source)?;
        let throttle = config
            .rate_limit
            .map(|limit| Throttle::new(TokenBucket::new(limit, Instant::now())))
            .transpose()
            .map_err(RngError::Timer)?;
        info!(
            "entropy from {}{}",
            config.source.display(),
            match config.rate_limit {
                Some(limit) => format!(
                    ", at most {} bytes per second (bursts of {})",
                    limit.bytes_per_sec, limit.burst
                ),
                None => String::new(),
            }
        );
        let rings = Arc::new(Rings::default());
        Ok(RngBackend {
            worker: Mutex::new(Worker {
                source,
                throttle,
                segments: Vec::new(),
                rings: rings.clone(),
            }),
            rings,
            event_idx: AtomicBool::new(false),
            memory: GuestMemorySlot::default(),
        })
    }

    fn worker(&self) -> std::sync::MutexGuard<'_, Worker> {
        self.worker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn guest_memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.memory.current()
    }

    fn serve(&self, vring: &VringRwLock) {
        let Some(mem) = self.guest_memory() else {
            warn!("request queue served before guest memory was set; ignored");
            return;
        };
        // The timer may fire after the driver stopped the queue; its ring is not to be read.
        if !queue_is_live(vring) {
            return;
        }
        let mut worker = self.worker();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        if let Err(error) = serve_queue(vring, event_idx, || worker.serve_batch(vring, &mem)) {
            RING_FAILURES.warn(format_args!("request queue: {error}"));
        }
    }
}

impl VirtioDevice for RngBackend {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn rings(&self) -> &Rings {
        &self.rings
    }

    fn attach_event_registry(
        &self,
        thread_id: usize,
        registry: Arc<dyn EventRegistry>,
    ) -> io::Result<()> {
        let mut worker = self.worker();
        let Some(throttle) = worker.throttle.as_mut().filter(|_| thread_id == 0) else {
            return Ok(());
        };
        // Registered for good: a disarmed timer never fires.
        registry.register(
            throttle.timer.as_raw_fd(),
            EventSet::IN,
            u64::from(RATE_LIMIT_TIMER_EVENT),
        )?;
        throttle.registered = true;
        Ok(())
    }
}

impl VhostUserBackend for RngBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
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

    /// virtio-rng has no config space: every byte reads as zero.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&[], offset, size)
    }

    fn update_memory(&self, memory: Memory) -> io::Result<()> {
        self.memory.replace(memory);
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_exit_event(thread_index)
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready; once the worker's batch is done it takes no
        // more requests, so waiting for its lock waits for the ones in flight.
        drop(self.worker());
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error returned from here stops the worker thread for good, so nothing is
        // propagated: guest mistakes and source failures are logged where they happen.
        let [vring] = vrings else {
            warn!(
                "worker {thread_id}: {} queues instead of 1; event ignored",
                vrings.len()
            );
            return Ok(());
        };
        if !evset.contains(EventSet::IN) {
            warn!(
                "worker {thread_id}: unexpected event set {evset:?} for event {device_event}; ignored"
            );
            return Ok(());
        }
        match device_event {
            REQUEST_QUEUE_EVENT => self.serve(vring),
            RATE_LIMIT_TIMER_EVENT => {
                if let Some(throttle) = &mut self.worker().throttle {
                    throttle.expired();
                }
                self.serve(vring);
            }
            _ => warn!("worker {thread_id}: unknown event {device_event}; ignored"),
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
