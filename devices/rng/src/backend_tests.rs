//! Queue-path tests: real `VringRwLock`s over mock rings, driven through `handle_event` exactly
//! as a transport's worker thread does.

use std::io::Write;
use std::sync::Arc;

use hvisor_vhost_core::queue::{QueueFault, RingFault};
use hvisor_vhost_core::testing::{
    EpollRegistry, FaultRecorder, TestMemory, TestQueue, returns_within, writable,
};
use hvisor_vhost_core::{VIRTIO_ID_RNG, VirtioDevice};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use vmm_sys_util::epoll::EventSet;

use super::*;
use crate::config::RateLimit;

const MEMORY_SIZE: u64 = 0x10_0000;
const DATA: u64 = 0x2_0000;
const INDIRECT_TABLE: u64 = 0x4_0000;
const UNTOUCHED: u8 = 0xee;

struct Rig {
    memory: TestMemory,
    queue: TestQueue,
    /// Shared, so an event can run on a thread of its own (see `kick_within_bound`).
    backend: Arc<RngBackend>,
    registry: Arc<EpollRegistry>,
    /// Keeps a file source alive.
    _source: Option<tempfile::NamedTempFile>,
}

/// A source whose byte `i` is `i % 251`, so tests can check what landed where.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

impl Rig {
    fn with_config(
        config: RngConfig,
        event_idx: bool,
        source: Option<tempfile::NamedTempFile>,
    ) -> Self {
        let memory = TestMemory::new(MEMORY_SIZE as usize);
        let queue = TestQueue::new(&memory, 0, 16, event_idx);
        let backend = Arc::new(RngBackend::new(&config.validate().unwrap()).unwrap());
        let registry = Arc::new(EpollRegistry::default());
        backend.attach_event_registry(0, registry.clone()).unwrap();
        backend.update_memory(memory.atomic.clone()).unwrap();
        backend.set_event_idx(event_idx);
        memory.fill(DATA, 0x1_0000, UNTOUCHED);
        Rig {
            memory,
            queue,
            backend,
            registry,
            _source: source,
        }
    }

    /// A device reading a file of `len` pattern bytes.
    fn file(len: usize, rate_limit: Option<RateLimit>, event_idx: bool) -> Self {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&pattern(len)).unwrap();
        let config = RngConfig {
            source: file.path().to_owned(),
            rate_limit,
        };
        Self::with_config(config, event_idx, Some(file))
    }

    fn event(&self, event: u16) {
        self.backend
            .handle_event(
                event,
                EventSet::IN,
                std::slice::from_ref(&self.queue.vring),
                0,
            )
            .unwrap();
    }

    fn kick(&self) {
        self.event(REQUEST_QUEUE_EVENT);
    }

    /// Kicks on a thread of its own, failing the test if the kick does not return.
    fn kick_within_bound(&self) {
        let vrings = [self.queue.vring.clone()];
        let backend = self.backend.clone();
        returns_within("a kick", std::time::Duration::from_secs(5), move || {
            backend
                .handle_event(REQUEST_QUEUE_EVENT, EventSet::IN, &vrings, 0)
                .unwrap();
        });
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        self.memory.bytes(addr, len)
    }
}

fn fills_multi_descriptor_chains(event_idx: bool) {
    let mut rig = Rig::file(4096, None, event_idx);
    let head = rig
        .queue
        .add_chain(&[writable(DATA, 10), writable(DATA + 0x100, 30)]);
    let second = rig.queue.add_chain(&[writable(DATA + 0x200, 8)]);
    rig.kick();
    assert_eq!(rig.queue.used_idx(), 2);
    assert_eq!(rig.queue.used(0), (u32::from(head), 40));
    assert_eq!(rig.queue.used(1), (u32::from(second), 8));
    let source = pattern(48);
    assert_eq!(rig.bytes(DATA, 10), source[..10]);
    assert_eq!(rig.bytes(DATA + 10, 1), [UNTOUCHED]);
    assert_eq!(rig.bytes(DATA + 0x100, 30), source[10..40]);
    assert_eq!(rig.bytes(DATA + 0x200, 8), source[40..48]);
    assert_eq!(rig.queue.signals(), 1, "one notification for the batch");
}

#[test]
fn fills_buffers_without_event_idx() {
    fills_multi_descriptor_chains(false);
}

#[test]
fn fills_buffers_with_event_idx() {
    fills_multi_descriptor_chains(true);
}

#[test]
fn urandom_fills_whole_buffers() {
    let mut rig = Rig::with_config(RngConfig::default(), false, None);
    rig.queue.add_chain(&[writable(DATA, 4096)]);
    rig.kick();
    assert_eq!(rig.queue.used(0).1, 4096);
    assert!(rig.bytes(DATA, 4096).iter().any(|&b| b != UNTOUCHED));
}

#[test]
fn indirect_chains_are_followed() {
    let mut rig = Rig::file(4096, None, false);
    let head = rig.queue.add_indirect_chain(
        INDIRECT_TABLE,
        &[writable(DATA, 16), writable(DATA + 0x100, 16)],
    );
    rig.kick();
    assert_eq!(rig.queue.used(0), (u32::from(head), 32));
    assert_eq!(rig.bytes(DATA + 0x100, 16), pattern(32)[16..]);
}

#[test]
fn requests_are_bounded() {
    let mut rig = Rig::with_config(RngConfig::default(), false, None);
    rig.queue
        .add_chain(&[writable(DATA, 0x1_0000), writable(DATA + 0x1_0000, 0x100)]);
    rig.kick();
    assert_eq!(u64::from(rig.queue.used(0).1), MAX_REQUEST_BYTES);
}

#[test]
fn bad_chains_are_returned_unused_and_the_queue_keeps_working() {
    let mut rig = Rig::file(4096, None, false);
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "readable only",
            vec![RawDescriptor::from(SplitDescriptor::new(DATA, 16, 0, 0))],
        ),
        (
            "readable after writable",
            vec![
                RawDescriptor::from(SplitDescriptor::new(DATA, 16, 2 | 1, 1)),
                RawDescriptor::from(SplitDescriptor::new(DATA + 16, 16, 0, 0)),
            ],
        ),
        (
            "outside guest memory",
            vec![
                RawDescriptor::from(SplitDescriptor::new(DATA, 16, 2 | 1, 1)),
                RawDescriptor::from(SplitDescriptor::new(MEMORY_SIZE + 0x1000, 16, 2, 0)),
            ],
        ),
        (
            "straddling the end of memory",
            vec![RawDescriptor::from(SplitDescriptor::new(
                MEMORY_SIZE - 8,
                16,
                2,
                0,
            ))],
        ),
        (
            "a descriptor loop",
            vec![
                RawDescriptor::from(SplitDescriptor::new(DATA, 16, 2 | 1, 1)),
                RawDescriptor::from(SplitDescriptor::new(DATA + 16, 16, 2 | 1, 0)),
            ],
        ),
    ];
    for (name, descriptors) in cases {
        let head = rig.queue.add_raw_chain(&descriptors);
        let position = rig.queue.used_idx();
        rig.kick();
        assert_eq!(rig.queue.used(position), (u32::from(head), 0), "{name}");
        assert_eq!(
            rig.bytes(DATA, 32),
            vec![UNTOUCHED; 32],
            "{name}: nothing written"
        );
    }
    rig.queue.add_chain(&[writable(DATA, 4)]);
    rig.kick();
    assert_eq!(rig.queue.used(5).1, 4);
    assert_eq!(rig.bytes(DATA, 4), pattern(4));
}

#[test]
fn a_short_source_completes_requests_with_what_it_had() {
    let mut rig = Rig::file(10, None, false);
    rig.queue.add_chain(&[writable(DATA, 16)]);
    rig.queue.add_chain(&[writable(DATA + 0x100, 16)]);
    rig.kick();
    assert_eq!(rig.queue.used_idx(), 2);
    assert_eq!(rig.queue.used(0).1, 10);
    assert_eq!(rig.bytes(DATA, 10), pattern(10));
    assert_eq!(
        rig.queue.used(1).1,
        0,
        "end of file: an empty answer, not a hang"
    );
}

#[test]
fn an_empty_fifo_yields_empty_answers() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("entropy");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `path` is a valid NUL-terminated string.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let config = RngConfig {
        source: fifo.clone(),
        rate_limit: None,
    };
    let mut rig = Rig::with_config(config, false, None);
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    rig.queue.add_chain(&[writable(DATA, 16)]);
    rig.kick();
    assert_eq!(rig.queue.used(0).1, 0, "no data: answered at once");
    writer.write_all(b"abc").unwrap();
    rig.queue.add_chain(&[writable(DATA, 16)]);
    rig.kick();
    assert_eq!(rig.queue.used(1).1, 3);
    assert_eq!(rig.bytes(DATA, 3), b"abc");
}

#[test]
fn missing_sources_are_named() {
    let config = RngConfig {
        source: "/nonexistent/entropy".into(),
        rate_limit: None,
    };
    let Err(error) = RngBackend::new(&config) else {
        panic!("opened a missing source");
    };
    assert!(
        error.to_string().contains("/nonexistent/entropy"),
        "{error}"
    );
}

fn rate_limit_pauses_and_resumes(event_idx: bool) {
    let limit = RateLimit {
        bytes_per_sec: 2000,
        burst: 24,
    };
    let mut rig = Rig::file(4096, Some(limit), event_idx);
    let registered = rig.registry.registered();
    let (_, (_, events)) = registered.iter().next().expect("timer registered");
    assert_eq!(
        registered.keys().copied().collect::<Vec<_>>(),
        vec![u64::from(RATE_LIMIT_TIMER_EVENT)]
    );
    assert_eq!(*events, EventSet::IN);
    assert!(u64::from(RATE_LIMIT_TIMER_EVENT) > rig.backend.num_queues() as u64);

    for i in 0..4 {
        rig.queue.add_chain(&[writable(DATA + 0x100 * i, 16)]);
    }
    rig.kick();
    // The burst covers one request and half of the next; the rest wait in the ring.
    assert_eq!(rig.queue.used_idx(), 2);
    assert_eq!(rig.queue.used(0).1, 16);
    assert_eq!(rig.queue.used(1).1, 8);
    assert!(rig.registry.wait(0).is_empty(), "the timer fired at once");
    // Kicks meanwhile neither spin nor serve.
    rig.kick();
    assert_eq!(rig.queue.used_idx(), 2);

    let mut served = 2;
    for _ in 0..100 {
        for (event, _) in rig.registry.wait(1000) {
            rig.event(event as u16);
        }
        served = rig.queue.used_idx();
        if served == 4 {
            break;
        }
    }
    assert_eq!(served, 4, "the timer resumed the queue");
    let total: u32 = (0..4).map(|i| rig.queue.used(i).1).sum();
    assert_eq!(
        rig.bytes(DATA + 0x100, 8),
        pattern(24)[16..],
        "bytes continue the source in order"
    );
    assert!(total > 24);
}

#[test]
fn rate_limit_pauses_and_resumes_without_event_idx() {
    rate_limit_pauses_and_resumes(false);
}

#[test]
fn rate_limit_pauses_and_resumes_with_event_idx() {
    rate_limit_pauses_and_resumes(true);
}

#[test]
fn without_a_limit_nothing_is_registered() {
    let rig = Rig::file(16, None, false);
    assert!(rig.registry.registered().is_empty());
}

#[test]
fn device_identity_features_and_config_space() {
    let rig = Rig::file(16, None, false);
    assert_eq!(rig.backend.device_type(), VIRTIO_ID_RNG);
    assert_eq!(rig.backend.num_queues(), 1);
    let features = rig.backend.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    assert!(
        rig.backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG)
    );
    assert_eq!(rig.backend.get_config(0, 8), vec![0; 8]);
    assert_eq!(rig.backend.get_config(100, 3), vec![0; 3]);
    assert!(rig.backend.get_config(0, 0).is_empty());
    assert!(rig.backend.exit_event(0).is_some());
}

#[test]
fn unexpected_events_are_ignored_without_stopping_the_worker() {
    let mut rig = Rig::file(16, None, false);
    let vrings = std::slice::from_ref(&rig.queue.vring);
    assert!(
        rig.backend
            .handle_event(0, EventSet::OUT, vrings, 0)
            .is_ok()
    );
    assert!(rig.backend.handle_event(9, EventSet::IN, vrings, 0).is_ok());
    assert!(rig.backend.handle_event(0, EventSet::IN, &[], 0).is_ok());
    // The timer event without a rate limit, and before guest memory is known.
    rig.event(RATE_LIMIT_TIMER_EVENT);
    rig.queue.add_chain(&[writable(DATA, 4)]);
    rig.kick();
    assert_eq!(rig.queue.used(0).1, 4);
    rig.backend.stop_vring(0).unwrap();
}

#[test]
fn stopped_queues_are_not_read() {
    let mut rig = Rig::file(16, None, false);
    rig.queue.add_chain(&[writable(DATA, 4)]);
    rig.queue.vring.set_queue_ready(false);
    rig.kick();
    assert_eq!(rig.queue.used_idx(), 0);
}

/// Two heads beyond the descriptor table ahead of a valid request, published with one kick:
/// the bad heads are skipped and the request is served in the same kick.
fn bad_heads_do_not_hold_back_the_batch(event_idx: bool) {
    let mut rig = Rig::file(4096, None, event_idx);
    rig.queue.add_heads(&[16, u16::MAX]);
    let head = rig.queue.add_chain(&[writable(DATA, 32)]);
    rig.kick();
    assert_eq!(
        rig.queue.used_idx(),
        1,
        "the request waits for another kick"
    );
    assert_eq!(rig.queue.used(0), (u32::from(head), 32));
    assert_eq!(rig.bytes(DATA, 32), pattern(32));
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_without_event_idx() {
    bad_heads_do_not_hold_back_the_batch(false);
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_with_event_idx() {
    bad_heads_do_not_hold_back_the_batch(true);
}

/// An avail index more than a ring ahead of the device: the kick returns, the queue is
/// stopped and reported once; once the transport starts it again, it serves.
fn a_broken_ring_stops_the_queue(event_idx: bool) {
    let mut rig = Rig::file(4096, None, event_idx);
    let recorder = FaultRecorder::default();
    rig.backend.set_fault_handler(recorder.handler());
    rig.queue.add_chain(&[writable(DATA, 32)]);
    rig.queue.set_avail_idx(16 + 8);
    rig.kick_within_bound();
    let fault = QueueFault {
        queue: 0,
        fault: RingFault::AvailIndexBeyondRing {
            avail_idx: 24,
            next_avail: 0,
            size: 16,
        },
    };
    assert_eq!(recorder.faults(), vec![fault]);
    assert!(
        !queue_is_live(&rig.queue.vring),
        "the queue was not stopped"
    );
    assert_eq!(rig.queue.used_idx(), 0);
    rig.kick_within_bound();
    assert_eq!(recorder.faults().len(), 1, "reported once");

    rig.queue.set_avail_idx(1);
    rig.queue.vring.set_queue_ready(true);
    rig.kick();
    assert_eq!(rig.queue.used(0).1, 32);
    assert_eq!(rig.bytes(DATA, 32), pattern(32));
}

#[test]
fn a_broken_ring_stops_the_queue_without_event_idx() {
    a_broken_ring_stops_the_queue(false);
}

#[test]
fn a_broken_ring_stops_the_queue_with_event_idx() {
    a_broken_ring_stops_the_queue(true);
}
