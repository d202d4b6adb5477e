//! The notification loop every queue worker runs, with and without VIRTIO_RING_F_EVENT_IDX.

use std::io;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// Where a batch of work on a queue stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    /// No buffer is left in the available ring.
    Drained,
    /// Buffers are left, but the device cannot take them now (no input, a full output, a rate
    /// limit); it resumes on an event of its own, not on a kick.
    Blocked,
}

/// Runs `serve_batch` until the queue is drained or blocked, signalling the driver after each
/// batch that completed buffers (when EVENT_IDX says it wants to hear).
///
/// With EVENT_IDX, notifications are suppressed while serving, then re-enabled and re-checked,
/// so a buffer the driver added meanwhile (without kicking) is not left behind. A blocked queue
/// returns at once: re-checking it would spin on buffers it cannot take. So does a queue that
/// was stopped meanwhile (device reset, GET_VRING_BASE): its buffers may never be taken, and the
/// re-check would report them forever.
pub fn serve_queue(
    vring: &VringRwLock,
    event_idx: bool,
    mut serve_batch: impl FnMut() -> io::Result<(usize, QueueState)>,
) -> io::Result<()> {
    loop {
        if !queue_is_live(vring) {
            return Ok(());
        }
        if event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        let (completed, state) = serve_batch()?;
        if completed > 0 && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        if !event_idx {
            return Ok(());
        }
        let more = vring.enable_notification().map_err(io::Error::other)?;
        if !more || state == QueueState::Blocked {
            return Ok(());
        }
    }
}

/// Whether the driver set the queue up and the transport enabled it: only then may its ring be
/// read (a stopped queue's addresses may be stale).
pub fn queue_is_live(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Whether the driver has made buffers available that the device has not taken yet.
pub fn has_available_buffers(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|avail| avail.0 != queue.next_avail())
}
