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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestMemory, TestQueue, writable};

    /// The re-check after notifications are re-enabled: a buffer the driver publishes while the
    /// device is still serving (so it sends no kick: notifications are off) must be served by
    /// another pass, not left until some later kick.
    #[test]
    fn a_buffer_published_during_a_batch_gets_another_pass() {
        let memory = TestMemory::new(0x10_0000);
        let mut queue = TestQueue::new(&memory, 0, 16, true);
        queue.add_chain(&[writable(0x8000, 16)]);
        let mut passes = 0;
        let mut published_late = false;
        serve_queue(&queue.vring.clone(), true, || {
            passes += 1;
            let mut served = 0;
            loop {
                // A statement of its own, so the ring's lock is released before `add_used`.
                let chain = queue
                    .vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(memory.mem);
                let Some(chain) = chain else { break };
                queue.vring.add_used(chain.head_index(), 0).unwrap();
                served += 1;
            }
            if !published_late {
                // The driver adds a buffer after the device's last look at the ring.
                queue.add_chain(&[writable(0x9000, 16)]);
                published_late = true;
            }
            Ok((served, QueueState::Drained))
        })
        .unwrap();
        assert_eq!(passes, 2, "the late buffer needs exactly one more pass");
        assert_eq!(queue.used_idx(), 2, "both buffers were served");
    }

    #[test]
    fn a_stopped_queue_is_left_at_once() {
        let memory = TestMemory::new(0x10_0000);
        let mut queue = TestQueue::new(&memory, 0, 16, true);
        queue.add_chain(&[writable(0x8000, 16)]);
        queue.vring.set_queue_ready(false);
        let mut passes = 0;
        serve_queue(&queue.vring.clone(), true, || {
            passes += 1;
            Ok((0, QueueState::Drained))
        })
        .unwrap();
        assert_eq!(
            passes, 0,
            "a stopped queue must not be served or re-checked"
        );
    }
}
