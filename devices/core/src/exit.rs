//! Exit events for a backend's worker threads.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use log::warn;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

thread_local! {
    /// Set while [`WorkerExitEvents::collect`] runs on this thread.
    static COLLECTING: RefCell<Option<Collection>> = const { RefCell::new(None) };
}

/// Exit events made ahead for the daemon being built, and the consumers handed out so far.
struct Collection {
    prepared: Vec<(EventConsumer, EventNotifier)>,
    handed_out: Vec<RawFd>,
}

/// A new exit event for worker thread `thread_index`, as `VhostUserBackend::exit_event` must
/// hand out. Without one the workers wait forever and dropping a daemon hangs. It is fresh on
/// every call because each vhost-user connection gets its own daemon and worker threads: an
/// exit event shared with the previous connection's workers would still be readable and stop
/// the new ones at once.
///
/// Inside [`WorkerExitEvents::collect`] it hands out the events made ahead there and records
/// their consumers.
pub fn new_exit_event(thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
    let collected = COLLECTING.with_borrow_mut(|collecting| {
        let collection = collecting.as_mut()?;
        let pair = match collection.prepared.pop() {
            Some(pair) => pair,
            None => new_event_pair(thread_index)?,
        };
        collection.handed_out.push(pair.0.as_raw_fd());
        Some(pair)
    });
    collected.or_else(|| new_event_pair(thread_index))
}

fn new_event_pair(thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .inspect_err(|error| {
            warn!("cannot create the exit event of thread {thread_index}: {error}");
        })
        .ok()
}

/// The exit-event consumers of one vhost-user-backend daemon's worker threads.
///
/// vhost-user-backend 0.24 turns each consumer it gets from `exit_event` into a raw descriptor
/// for its worker's epoll set and never closes it (`VringEpollHandler::new`, `into_raw_fd`):
/// one eventfd per worker thread per daemon, and a transport builds a daemon per connection.
/// This takes over that abandoned ownership. Dropping it wakes every worker that still waits
/// on one of these events (a daemon that failed half-built has no other way to stop the
/// workers it already started), then closes the consumers; nothing else ever closes them.
///
/// Drop it only after the daemon: the daemon's drop sends the exit events and joins its
/// workers, which must find their events still registered.
#[derive(Debug)]
pub struct WorkerExitEvents {
    /// The consumers' descriptors; as notifiers because a consumer shares its eventfd with
    /// its notifier, so a write to it is the worker's exit event.
    consumers: Vec<EventNotifier>,
}

impl WorkerExitEvents {
    /// Makes `threads` exit events, then runs `build` (which builds a vhost-user-backend
    /// daemon) with [`new_exit_event`] handing those out on this thread, so an exit event
    /// cannot fail to be made halfway through: a worker without one could never be stopped.
    /// Returns what `build` returned with the consumers handed out meanwhile.
    pub fn collect<T>(threads: usize, build: impl FnOnce() -> T) -> io::Result<(T, Self)> {
        let prepared = (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        COLLECTING.with_borrow_mut(|collecting| {
            *collecting = Some(Collection {
                prepared,
                handed_out: Vec::new(),
            });
        });
        // Ends the collection also if `build` panics, so later calls on this thread make
        // untracked events again.
        struct EndCollection;
        impl Drop for EndCollection {
            fn drop(&mut self) {
                COLLECTING.with_borrow_mut(Option::take);
            }
        }
        let end = EndCollection;
        let built = build();
        let handed_out = COLLECTING
            .with_borrow_mut(Option::take)
            .map(|collection| collection.handed_out)
            .unwrap_or_default();
        drop(end);
        let consumers = handed_out
            .into_iter()
            // SAFETY: each of these is the descriptor of a consumer `build` took from
            // `new_exit_event`; vhost-user-backend 0.24 (pinned) keeps it only as a raw
            // descriptor in an epoll set and never closes it, so this is its only owner.
            .map(|fd| unsafe { EventNotifier::from_raw_fd(fd) })
            .collect();
        Ok((built, WorkerExitEvents { consumers }))
    }

    /// How many consumers were handed out.
    pub fn len(&self) -> usize {
        self.consumers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.consumers.is_empty()
    }
}

impl Drop for WorkerExitEvents {
    fn drop(&mut self) {
        for consumer in &self.consumers {
            if let Err(error) = consumer.notify() {
                warn!("cannot send an exit event to a worker: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn every_call_gives_an_unshared_event() {
        let (first, notifier) = new_exit_event(0).unwrap();
        let (second, _) = new_exit_event(0).unwrap();
        notifier.notify().unwrap();
        assert!(first.consume().is_ok());
        assert!(second.consume().is_err(), "exit events must not be shared");
    }

    /// Whether `fd` is still an exit-event consumer. Those lack FD_CLOEXEC, which every
    /// descriptor std opens has, so a number reused by a test running in parallel does not
    /// pass for the consumer.
    fn is_open_consumer(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC == 0
    }

    /// What vhost-user-backend 0.24 does with the consumer: keep it as a raw descriptor.
    fn abandon(consumer: EventConsumer) -> RawFd {
        consumer.into_raw_fd()
    }

    #[test]
    fn collected_consumers_are_woken_and_closed_on_drop() {
        let ((raw, notifier), events) = WorkerExitEvents::collect(2, || {
            let (consumer, notifier) = new_exit_event(0).unwrap();
            (abandon(consumer), notifier)
        })
        .unwrap();
        assert_eq!(events.len(), 1, "one event handed out");
        // A clone of the eventfd shows the exit event and outlives the consumer.
        let watcher = notifier.try_clone().unwrap();
        drop(events);
        assert!(
            !is_open_consumer(raw),
            "the abandoned consumer must be closed"
        );
        // SAFETY: the clone's descriptor moves from `watcher` to the file.
        let mut watcher = unsafe { std::fs::File::from_raw_fd(watcher.into_raw_fd()) };
        let mut count = [0u8; 8];
        std::io::Read::read_exact(&mut watcher, &mut count).unwrap();
        assert_eq!(
            u64::from_ne_bytes(count),
            1,
            "the worker was sent its exit event"
        );
    }

    #[test]
    fn events_outside_a_collection_are_not_taken_over() {
        let ((), events) = WorkerExitEvents::collect(1, || ()).unwrap();
        assert!(events.is_empty());
        let (consumer, _notifier) = new_exit_event(0).unwrap();
        let raw = consumer.as_raw_fd();
        drop(events);
        assert!(
            is_open_consumer(raw),
            "a consumer made outside the collection is its owner's"
        );
    }
}
