//! Exit events for a backend's worker threads.

use log::warn;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

/// A new exit event for worker thread `thread_index`, as `VhostUserBackend::exit_event` must
/// hand out. Without one the workers wait forever and dropping a daemon hangs. It is fresh on
/// every call because each vhost-user connection gets its own daemon and worker threads: an
/// exit event shared with the previous connection's workers would still be readable and stop
/// the new ones at once.
pub fn new_exit_event(thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .inspect_err(|error| {
            warn!("cannot create the exit event of thread {thread_index}: {error}")
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_gives_an_unshared_event() {
        let (first, notifier) = new_exit_event(0).unwrap();
        let (second, _) = new_exit_event(0).unwrap();
        notifier.notify().unwrap();
        assert!(first.consume().is_ok());
        assert!(second.consume().is_err(), "exit events must not be shared");
    }
}
