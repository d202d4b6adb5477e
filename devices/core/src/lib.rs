//! The little a transport needs from a device crate besides `VhostUserBackend`: the virtio
//! device type, a way for the device to watch its own file descriptors (a TAP, a PTY, a
//! socket) from its queue worker threads, whichever transport runs those threads, and a way to
//! hear of queues the device stopped because the driver broke their rings.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use vhost_user_backend::VringRwLock;
use vmm_sys_util::epoll::EventSet;

use crate::counters::QueueCounters;
use crate::inflight::InflightRegion;
use crate::queue::{FaultHandler, Rings};

/// Adds and removes a device's own descriptors in one worker thread's wait set.
///
/// An event on a registered descriptor is delivered to the backend's `handle_event` on that
/// thread with `device_event = data`. As in vhost-user-backend, `data` must be greater than the
/// backend's number of queues (lower values name queues and the exit event).
pub trait EventRegistry: Send + Sync {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()>;
    fn unregister(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()>;
}

/// What became of a kick a transport asked the device to serve on the transport's own thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineKick {
    /// Every available buffer was served, and the used ring signalled if the driver wants it.
    Served,
    /// Some buffers were served (and signalled); the queue's worker must take the rest.
    HandedOver,
    /// Nothing was served: the device does not serve this queue inline, or not now.
    Unserved,
    /// The queue's worker is in the middle of a batch; it must be kicked (it may find the
    /// buffers while it still polls the ring).
    WorkerBusy,
}

/// A virtio device, as its transports see it.
pub trait VirtioDevice {
    /// The virtio device id (virtio 1.2, section 5): 1 net, 2 block, 3 console, 4 entropy.
    fn device_type(&self) -> u32;

    /// Called once per worker thread, before the driver can kick a queue, with that thread's
    /// registry. Devices without descriptors of their own keep the default.
    fn attach_event_registry(
        &self,
        thread_id: usize,
        registry: Arc<dyn EventRegistry>,
    ) -> io::Result<()> {
        let _ = (thread_id, registry);
        Ok(())
    }

    /// Hands the device the inflight region of its vhost-user connection (`None` drops it), for
    /// devices that offer `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`. Called before the queues start
    /// and after every worker has finished with the previous connection.
    fn set_inflight_region(&self, region: Option<Arc<InflightRegion>>) -> io::Result<()> {
        let _ = region;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this device does not track in-flight requests",
        ))
    }

    /// Where the device takes chains from and returns them to, for all its queues.
    fn rings(&self) -> &Rings;

    /// Installs what the device calls when it stops a queue whose ring the driver broke (see
    /// [`queue::Rings`]); the transport decides what the driver is told. Installed before the
    /// driver can kick a queue; a later call replaces the handler.
    fn set_fault_handler(&self, handler: FaultHandler) {
        self.rings().set_fault_handler(handler);
    }

    /// Counts the chains each queue takes and returns, and its ring faults, on `counters`
    /// (indexed by queue), for a transport that reports them. Once per device, before the
    /// driver can kick a queue; a second call fails.
    fn count_chains(&self, counters: Arc<[QueueCounters]>) -> io::Result<()> {
        self.rings().count_chains(counters)
    }

    /// While `closing`, the device stops a queue where it would take its next chain, so every
    /// queue worker ends its batch (see [`queue::Rings::set_closing`]); for a transport whose
    /// frontend left without stopping its rings, before it waits for the workers.
    fn set_closing(&self, closing: bool) {
        self.rings().set_closing(closing);
    }

    /// Serves a kick of `queue` on the caller's thread instead of the queue's worker, for a
    /// transport whose kicks arrive on a thread that is awake anyway (hvisor's request loop):
    /// the hop to a sleeping worker costs more than the work of a request that never waits.
    /// A device may serve only requests that end without sleeping, and a bounded number of
    /// them: the caller's thread answers other vCPUs too. Never called concurrently with
    /// `stop_vring` or `reset_device` of the same device.
    fn serve_kick_inline(&self, queue: usize, vring: &VringRwLock) -> InlineKick {
        let _ = (queue, vring);
        InlineKick::Unserved
    }
}

impl<T: VirtioDevice + ?Sized> VirtioDevice for Arc<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }

    fn attach_event_registry(
        &self,
        thread_id: usize,
        registry: Arc<dyn EventRegistry>,
    ) -> io::Result<()> {
        (**self).attach_event_registry(thread_id, registry)
    }

    fn set_inflight_region(&self, region: Option<Arc<InflightRegion>>) -> io::Result<()> {
        (**self).set_inflight_region(region)
    }

    fn rings(&self) -> &Rings {
        (**self).rings()
    }

    fn serve_kick_inline(&self, queue: usize, vring: &VringRwLock) -> InlineKick {
        (**self).serve_kick_inline(queue, vring)
    }
}

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_ID_CONSOLE: u32 = 3;
pub const VIRTIO_ID_RNG: u32 = 4;

pub mod backend;
pub mod chain;
pub mod config_space;
pub mod counters;
pub mod exit;
pub mod inflight;
pub mod log_limit;
pub mod queue;
pub mod socket;
pub mod stop;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
