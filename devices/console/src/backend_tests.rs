//! Queue-path tests: real `VringRwLock`s over rings in test memory, driven through
//! `handle_event` as a transport's worker does, with a real epoll set as the worker's wait set
//! and a socketpair, a PTY or a Unix socket as the host side.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisor_vhost_core::queue::{QueueFault, RingFault};
use hvisor_vhost_core::testing::{
    EpollRegistry, FaultRecorder, TestMemory, TestQueue, readable, returns_within, writable,
};
use hvisor_vhost_core::{VIRTIO_ID_CONSOLE, VirtioDevice};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use vmm_sys_util::epoll::EventSet;

use super::*;

const MEMORY_SIZE: u64 = 0x40_0000;
const RX_DATA: u64 = 0x1_0000;
const TX_DATA: u64 = 0x10_0000;
const INDIRECT_TABLE: u64 = 0x3_0000;

struct Rig {
    memory: TestMemory,
    rx: TestQueue,
    tx: TestQueue,
    /// Shared, so an event can run on a thread of its own (see `event_within_bound`).
    backend: Arc<ConsoleBackend>,
    registry: Arc<EpollRegistry>,
}

impl Rig {
    fn new(endpoint: Endpoint, output_log: Option<&Path>, event_idx: bool) -> Self {
        let memory = TestMemory::new(MEMORY_SIZE as usize);
        let rx = TestQueue::new(&memory, 0, 16, event_idx);
        let tx = TestQueue::new(&memory, 0x1000, 16, event_idx);
        let backend = Arc::new(ConsoleBackend::with_endpoint(endpoint, output_log).unwrap());
        let registry = Arc::new(EpollRegistry::default());
        backend.attach_event_registry(0, registry.clone()).unwrap();
        backend.update_memory(memory.atomic.clone()).unwrap();
        backend.set_event_idx(event_idx);
        Rig {
            memory,
            rx,
            tx,
            backend,
            registry,
        }
    }

    /// A console over one end of a socketpair; the test holds the other.
    fn socketpair(event_idx: bool) -> (Self, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        let input = OwnedFd::from(ours.try_clone().unwrap());
        let endpoint = Endpoint::Streams(Streams::new(input, OwnedFd::from(ours)).unwrap());
        (Self::new(endpoint, None, event_idx), peer)
    }

    fn event(&self, event: u16) {
        let vrings = [self.rx.vring.clone(), self.tx.vring.clone()];
        self.backend
            .handle_event(event, EventSet::IN, &vrings, 0)
            .unwrap();
    }

    /// Runs `event` on a thread of its own, failing the test if it does not return.
    fn event_within_bound(&self, event: u16) {
        let vrings = [self.rx.vring.clone(), self.tx.vring.clone()];
        let backend = self.backend.clone();
        returns_within("a worker event", Duration::from_secs(5), move || {
            backend
                .handle_event(event, EventSet::IN, &vrings, 0)
                .unwrap();
        });
    }

    fn kick_rx(&self) {
        self.event(RECEIVEQ);
    }

    fn kick_tx(&self) {
        self.event(TRANSMITQ);
    }

    /// Serves what the wait set reports until it stays quiet for `quiet_ms`.
    fn pump(&self, quiet_ms: i32) {
        loop {
            let events = self.registry.wait(quiet_ms);
            if events.is_empty() {
                return;
            }
            for (event, _) in events {
                self.event(event as u16);
            }
        }
    }

    /// Pumps until `done` holds, or fails after a few seconds.
    fn pump_until(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            for (event, _) in self.registry.wait(50) {
                self.event(event as u16);
            }
        }
    }

    fn transmit(&mut self, text: &[u8]) -> u16 {
        self.memory.write(TX_DATA, text);
        self.tx.add_chain(&[readable(TX_DATA, text.len() as u32)])
    }

    fn watched(&self, id: u16) -> Option<EventSet> {
        self.registry
            .registered()
            .get(&u64::from(id))
            .map(|(_, events)| *events)
    }
}

fn read_exactly(peer: &mut UnixStream, len: usize) -> Vec<u8> {
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = vec![0; len];
    peer.read_exact(&mut out).unwrap();
    out
}

fn nothing_to_read(peer: &mut UnixStream) -> bool {
    peer.set_nonblocking(true).unwrap();
    let mut byte = [0u8];
    let empty = matches!(peer.read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    peer.set_nonblocking(false).unwrap();
    empty
}

fn bytes_go_both_ways_exactly(event_idx: bool) {
    let (mut rig, mut peer) = Rig::socketpair(event_idx);
    // Guest output over three descriptors, one of them empty.
    rig.memory.write(TX_DATA, b"hello, ");
    rig.memory.write(TX_DATA + 0x100, b"host\n");
    let head = rig.tx.add_chain(&[
        readable(TX_DATA, 7),
        readable(TX_DATA + 0x80, 0),
        readable(TX_DATA + 0x100, 5),
    ]);
    rig.kick_tx();
    assert_eq!(read_exactly(&mut peer, 12), b"hello, host\n");
    assert_eq!(rig.tx.used(0), (u32::from(head), 0));
    assert_eq!(rig.tx.signals(), 1);

    // Guest input: buffers first, then bytes.
    let first = rig.rx.add_chain(&[writable(RX_DATA, 4)]);
    let second = rig
        .rx
        .add_chain(&[writable(RX_DATA + 0x100, 2), writable(RX_DATA + 0x200, 64)]);
    rig.kick_rx();
    assert_eq!(rig.watched(STREAM_EVENT), Some(EventSet::IN), "input armed");
    peer.write_all(b"typed text").unwrap();
    rig.pump_until("input", |rig| rig.rx.used_idx() == 2);
    assert_eq!(rig.rx.used(0), (u32::from(first), 4));
    assert_eq!(rig.rx.used(1), (u32::from(second), 6));
    assert_eq!(rig.memory.bytes(RX_DATA, 4), b"type");
    assert_eq!(rig.memory.bytes(RX_DATA + 0x100, 2), b"d ");
    assert_eq!(rig.memory.bytes(RX_DATA + 0x200, 4), b"text");
    assert!(rig.rx.signals() >= 1);
    // No buffers left: input is no longer watched.
    assert_eq!(rig.watched(STREAM_EVENT), None);
}

#[test]
fn bytes_go_both_ways_without_event_idx() {
    bytes_go_both_ways_exactly(false);
}

#[test]
fn bytes_go_both_ways_with_event_idx() {
    bytes_go_both_ways_exactly(true);
}

#[test]
fn indirect_transmit_chains_are_followed() {
    let (mut rig, mut peer) = Rig::socketpair(false);
    rig.memory.write(TX_DATA, b"abcdef");
    rig.tx.add_indirect_chain(
        INDIRECT_TABLE,
        &[readable(TX_DATA, 3), readable(TX_DATA + 3, 3)],
    );
    rig.kick_tx();
    assert_eq!(read_exactly(&mut peer, 6), b"abcdef");
    assert_eq!(rig.tx.used_idx(), 1);
}

/// Shrinks a socket's send buffer so a test can fill it quickly.
fn small_send_buffer(stream: &UnixStream) {
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt reads one c_int from the valid pointer.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0);
}

fn transmit_back_pressure(event_idx: bool) {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    small_send_buffer(&ours);
    let endpoint = Endpoint::Streams(
        Streams::new(
            OwnedFd::from(ours.try_clone().unwrap()),
            OwnedFd::from(ours),
        )
        .unwrap(),
    );
    let mut rig = Rig::new(endpoint, None, event_idx);
    let output: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 253) as u8).collect();
    rig.memory.write(TX_DATA, &output);
    let head = rig.tx.add_chain(&[
        readable(TX_DATA, 100 * 1024),
        readable(TX_DATA + 100 * 1024, 156 * 1024),
    ]);
    let next = rig.transmit_second(b"after");
    rig.kick_tx();
    assert_eq!(
        rig.tx.used_idx(),
        0,
        "completed before the host took every byte"
    );
    assert_eq!(
        rig.watched(OUTPUT_EVENT),
        Some(EventSet::OUT),
        "output watched for writability"
    );
    // More kicks while blocked neither complete nor lose anything.
    rig.kick_tx();
    assert_eq!(rig.tx.used_idx(), 0);

    let reader = std::thread::spawn(move || {
        let mut received = vec![0; 256 * 1024 + 5];
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        peer.read_exact(&mut received).unwrap();
        received
    });
    rig.pump_until("transmit completion", |rig| rig.tx.used_idx() == 2);
    let received = reader.join().unwrap();
    assert_eq!(&received[..256 * 1024], &output[..], "every byte, in order");
    assert_eq!(&received[256 * 1024..], b"after");
    assert_eq!(rig.tx.used(0), (u32::from(head), 0));
    assert_eq!(rig.tx.used(1), (u32::from(next), 0));
    assert_eq!(
        rig.watched(OUTPUT_EVENT),
        None,
        "writability no longer watched"
    );
}

impl Rig {
    fn transmit_second(&mut self, text: &[u8]) -> u16 {
        let at = TX_DATA + 0x4_0000 + 0x1000;
        self.memory.write(at, text);
        self.tx.add_chain(&[readable(at, text.len() as u32)])
    }
}

#[test]
fn transmit_back_pressure_without_event_idx() {
    transmit_back_pressure(false);
}

#[test]
fn transmit_back_pressure_with_event_idx() {
    transmit_back_pressure(true);
}

#[test]
fn input_waits_for_receive_buffers_and_arrives_once() {
    let (mut rig, mut peer) = Rig::socketpair(true);
    peer.write_all(b"early bytes").unwrap();
    // A kick with an empty receiveq reads nothing and watches nothing.
    rig.kick_rx();
    assert_eq!(rig.watched(STREAM_EVENT), None);
    rig.pump(20);
    // A buffer smaller than the input: the rest waits in the device.
    rig.rx.add_chain(&[writable(RX_DATA, 5)]);
    rig.kick_rx();
    assert_eq!(rig.rx.used(0).1, 5);
    assert_eq!(rig.memory.bytes(RX_DATA, 5), b"early");
    rig.pump(20);
    assert_eq!(rig.rx.used_idx(), 1);
    rig.rx.add_chain(&[writable(RX_DATA + 0x100, 64)]);
    rig.kick_rx();
    assert_eq!(rig.rx.used(1).1, 6);
    assert_eq!(rig.memory.bytes(RX_DATA + 0x100, 6), b" bytes");
    // Nothing is delivered twice.
    rig.rx.add_chain(&[writable(RX_DATA + 0x200, 64)]);
    rig.kick_rx();
    rig.pump(20);
    assert_eq!(rig.rx.used_idx(), 2);
    assert_eq!(rig.watched(STREAM_EVENT), Some(EventSet::IN));
    peer.write_all(b"!").unwrap();
    rig.pump_until("late input", |rig| rig.rx.used_idx() == 3);
    assert_eq!(rig.rx.used(2).1, 1);
}

#[test]
fn bad_chains_are_returned_unused_and_the_queues_keep_working() {
    let (mut rig, mut peer) = Rig::socketpair(false);
    let write = 2u16;
    let next = 1u16;
    rig.memory.write(TX_DATA, b"ok");
    let bad_tx = [
        (
            "writable descriptor on the transmitq",
            vec![RawDescriptor::from(SplitDescriptor::new(
                TX_DATA, 2, write, 0,
            ))],
        ),
        (
            "outside guest memory",
            vec![RawDescriptor::from(SplitDescriptor::new(
                MEMORY_SIZE + 0x1000,
                2,
                0,
                0,
            ))],
        ),
        (
            "a descriptor loop",
            vec![
                RawDescriptor::from(SplitDescriptor::new(TX_DATA, 1, next, 1)),
                RawDescriptor::from(SplitDescriptor::new(TX_DATA, 1, next, 0)),
            ],
        ),
    ];
    for (i, (name, descriptors)) in bad_tx.iter().enumerate() {
        let head = rig.tx.add_raw_chain(descriptors);
        rig.kick_tx();
        assert_eq!(rig.tx.used(i as u16), (u32::from(head), 0), "{name}");
    }
    assert!(nothing_to_read(&mut peer), "bad chains sent nothing");
    rig.transmit(b"ok");
    rig.kick_tx();
    assert_eq!(read_exactly(&mut peer, 2), b"ok");

    peer.write_all(b"in").unwrap();
    let bad_rx = [
        (
            "readable descriptor on the receiveq",
            vec![RawDescriptor::from(SplitDescriptor::new(RX_DATA, 8, 0, 0))],
        ),
        (
            "straddling the end of memory",
            vec![RawDescriptor::from(SplitDescriptor::new(
                MEMORY_SIZE - 1,
                8,
                write,
                0,
            ))],
        ),
    ];
    rig.memory.fill(RX_DATA, 8, 0xee);
    for (i, (name, descriptors)) in bad_rx.iter().enumerate() {
        let head = rig.rx.add_raw_chain(descriptors);
        rig.kick_rx();
        assert_eq!(rig.rx.used(i as u16), (u32::from(head), 0), "{name}");
    }
    assert_eq!(rig.memory.bytes(RX_DATA, 8), vec![0xee; 8]);
    rig.rx.add_chain(&[writable(RX_DATA, 8)]);
    rig.kick_rx();
    assert_eq!(rig.rx.used(2).1, 2, "input kept through the bad chains");
    assert_eq!(rig.memory.bytes(RX_DATA, 2), b"in");
}

#[test]
fn output_log_gets_a_copy_of_guest_output() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let endpoint = Endpoint::Streams(
        Streams::new(
            OwnedFd::from(ours.try_clone().unwrap()),
            OwnedFd::from(ours),
        )
        .unwrap(),
    );
    let mut rig = Rig::new(endpoint, Some(log.path()), false);
    rig.transmit(b"boot log line\n");
    rig.kick_tx();
    assert_eq!(read_exactly(&mut peer, 14), b"boot log line\n");
    assert_eq!(std::fs::read(log.path()).unwrap(), b"boot log line\n");
}

#[test]
fn pty_reports_its_slave_and_size_and_carries_bytes() {
    let endpoint = Endpoint::Pty(Pty::open().unwrap());
    let mut rig = Rig::new(endpoint, None, false);
    let path = rig.backend.pty_path().expect("a PTY path").to_owned();
    assert!(path.starts_with("/dev/pts"), "{}", path.display());
    assert_ne!(rig.backend.features() & (1 << VIRTIO_CONSOLE_F_SIZE), 0);
    assert_eq!(rig.backend.get_config(0, 4), vec![80, 0, 25, 0]);

    let mut slave = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    rig.transmit(b"to the terminal");
    rig.kick_tx();
    let mut received = vec![0; 15];
    slave.read_exact(&mut received).unwrap();
    assert_eq!(received, b"to the terminal");

    rig.rx.add_chain(&[writable(RX_DATA, 64)]);
    rig.kick_rx();
    slave.write_all(b"keys").unwrap();
    rig.pump_until("PTY input", |rig| rig.rx.used_idx() == 1);
    assert_eq!(
        rig.memory.bytes(RX_DATA, rig.rx.used(0).1 as usize),
        b"keys"
    );
}

#[test]
fn socket_clients_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.sock");
    let endpoint = Endpoint::Socket(SocketServer::bind(&path).unwrap());
    let mut rig = Rig::new(endpoint, None, true);
    assert_eq!(
        rig.backend.features() & (1 << VIRTIO_CONSOLE_F_SIZE),
        0,
        "no size"
    );
    assert_eq!(rig.backend.get_config(0, 4), vec![0; 4]);
    assert_eq!(rig.watched(LISTENER_EVENT), Some(EventSet::IN));

    // Output before any client is held, and the chain completes.
    rig.transmit(b"early ");
    rig.kick_tx();
    assert_eq!(rig.tx.used_idx(), 1);
    rig.rx.add_chain(&[writable(RX_DATA, 64)]);
    rig.kick_rx();

    let mut first = UnixStream::connect(&path).unwrap();
    rig.pump_until("first client", |rig| rig.watched(LISTENER_EVENT).is_none());
    assert_eq!(read_exactly(&mut first, 6), b"early ");
    first.write_all(b"one").unwrap();
    rig.pump_until("first input", |rig| rig.rx.used_idx() == 1);
    assert_eq!(rig.memory.bytes(RX_DATA, 3), b"one");
    rig.rx.add_chain(&[writable(RX_DATA + 0x100, 64)]);
    rig.kick_rx();
    drop(first);
    rig.pump_until("listening again", |rig| {
        rig.watched(LISTENER_EVENT).is_some()
    });

    rig.transmit(b"while away");
    rig.kick_tx();
    assert_eq!(rig.tx.used_idx(), 2);
    let mut second = UnixStream::connect(&path).unwrap();
    rig.pump_until("second client", |rig| rig.watched(LISTENER_EVENT).is_none());
    assert_eq!(read_exactly(&mut second, 10), b"while away");
    second.write_all(b"two").unwrap();
    rig.pump_until("second input", |rig| rig.rx.used_idx() == 2);
    assert_eq!(rig.memory.bytes(RX_DATA + 0x100, 3), b"two");
    rig.transmit(b"live");
    rig.kick_tx();
    assert_eq!(read_exactly(&mut second, 4), b"live");
    drop(rig);
    assert!(!path.exists(), "socket file removed");
}

#[test]
fn output_without_a_client_is_bounded_then_back_pressures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.sock");
    let endpoint = Endpoint::Socket(SocketServer::bind(&path).unwrap());
    let mut rig = Rig::new(endpoint, None, false);
    let output: Vec<u8> = (0..BACKLOG_LIMIT + 1000).map(|i| (i % 241) as u8).collect();
    rig.memory.write(TX_DATA, &output);
    rig.tx.add_chain(&[readable(TX_DATA, output.len() as u32)]);
    rig.kick_tx();
    assert_eq!(
        rig.tx.used_idx(),
        0,
        "more than the backlog: the guest waits"
    );
    let mut client = UnixStream::connect(&path).unwrap();
    let reader = std::thread::spawn(move || {
        let mut received = vec![0; BACKLOG_LIMIT + 1000];
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.read_exact(&mut received).unwrap();
        received
    });
    rig.pump_until("completion", |rig| rig.tx.used_idx() == 1);
    assert_eq!(reader.join().unwrap(), output);
}

#[test]
fn stopping_the_transmitq_completes_the_pending_chain_and_keeps_its_bytes() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    small_send_buffer(&ours);
    let endpoint = Endpoint::Streams(
        Streams::new(
            OwnedFd::from(ours.try_clone().unwrap()),
            OwnedFd::from(ours),
        )
        .unwrap(),
    );
    let mut rig = Rig::new(endpoint, None, false);
    let output: Vec<u8> = (0..200 * 1024).map(|i| (i % 239) as u8).collect();
    rig.memory.write(TX_DATA, &output);
    rig.tx.add_chain(&[readable(TX_DATA, output.len() as u32)]);
    rig.kick_tx();
    assert_eq!(rig.tx.used_idx(), 0);
    rig.tx.vring.set_queue_ready(false);
    rig.backend.stop_vring(u32::from(TRANSMITQ)).unwrap();
    assert_eq!(rig.tx.used_idx(), 1, "the driver got its buffer back");
    let reader = std::thread::spawn(move || {
        let mut received = vec![0; 200 * 1024];
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        peer.read_exact(&mut received).unwrap();
        received
    });
    rig.pump_until("held output", |_| reader.is_finished());
    assert_eq!(reader.join().unwrap(), output);
}

#[test]
fn identity_features_and_config_space() {
    let (rig, _peer) = Rig::socketpair(false);
    assert_eq!(rig.backend.device_type(), VIRTIO_ID_CONSOLE);
    assert_eq!(rig.backend.num_queues(), 2);
    assert_eq!(rig.backend.queues_per_thread(), vec![0b11]);
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
    assert_eq!(
        features & (1 << VIRTIO_CONSOLE_F_SIZE),
        0,
        "a socketpair has no size"
    );
    assert!(
        rig.backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG)
    );
    // cols, rows, max_nr_ports = 1, emerg_wr; then zeroes.
    assert_eq!(
        rig.backend.get_config(0, 12),
        vec![0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(rig.backend.get_config(4, 2), vec![1, 0]);
    assert_eq!(rig.backend.get_config(10, 6), vec![0; 6]);
    assert!(rig.backend.set_config(8, &[1, 0, 0, 0]).is_err());
    assert!(rig.backend.exit_event(0).is_some());
}

#[test]
fn unexpected_events_are_ignored_without_stopping_the_worker() {
    let (mut rig, mut peer) = Rig::socketpair(false);
    let vrings = [rig.rx.vring.clone(), rig.tx.vring.clone()];
    assert!(
        rig.backend
            .handle_event(9, EventSet::IN, &vrings, 0)
            .is_ok()
    );
    assert!(
        rig.backend
            .handle_event(0, EventSet::IN, &vrings[..1], 0)
            .is_ok()
    );
    rig.event(LISTENER_EVENT);
    rig.event(OUTPUT_EVENT);
    rig.transmit(b"still here");
    rig.kick_tx();
    assert_eq!(read_exactly(&mut peer, 10), b"still here");
}

/// Two heads beyond the descriptor table ahead of a valid chain on each queue, published with
/// one kick: the bad heads are skipped and the valid chain is served in the same kick.
fn bad_heads_do_not_hold_back_the_batch(event_idx: bool) {
    let (mut rig, mut peer) = Rig::socketpair(event_idx);
    rig.tx.add_heads(&[16, u16::MAX]);
    rig.transmit(b"after bad heads");
    rig.kick_tx();
    assert_eq!(read_exactly(&mut peer, 15), b"after bad heads");
    assert_eq!(rig.tx.used_idx(), 1);

    peer.write_all(b"typed").unwrap();
    rig.rx.add_heads(&[16, u16::MAX]);
    let head = rig.rx.add_chain(&[writable(RX_DATA, 64)]);
    rig.kick_rx();
    assert_eq!(rig.rx.used_idx(), 1, "input waits for another kick");
    assert_eq!(rig.rx.used(0), (u32::from(head), 5));
    assert_eq!(rig.memory.bytes(RX_DATA, 5), b"typed");
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_without_event_idx() {
    bad_heads_do_not_hold_back_the_batch(false);
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_with_event_idx() {
    bad_heads_do_not_hold_back_the_batch(true);
}

/// An avail index more than a ring ahead of the device on each queue: each event returns, the
/// queue is stopped and reported once, and nothing is lost: input read meanwhile and output
/// published before the jump go through once the transport starts the queues again.
fn broken_rings_stop_their_queues(event_idx: bool) {
    let (mut rig, mut peer) = Rig::socketpair(event_idx);
    let recorder = FaultRecorder::default();
    rig.backend.set_fault_handler(recorder.handler());
    peer.write_all(b"typed").unwrap();
    rig.rx.add_chain(&[writable(RX_DATA, 64)]);
    rig.rx.set_avail_idx(16 + 8);
    rig.event_within_bound(RECEIVEQ);
    rig.transmit(b"output");
    rig.tx.set_avail_idx(16 + 8);
    rig.event_within_bound(TRANSMITQ);
    rig.event_within_bound(STREAM_EVENT);
    let fault = RingFault::AvailIndexBeyondRing {
        avail_idx: 24,
        next_avail: 0,
        size: 16,
    };
    let on = |queue| QueueFault {
        queue,
        fault: fault.clone(),
    };
    assert_eq!(recorder.faults(), vec![on(RECEIVEQ), on(TRANSMITQ)]);
    assert!(!queue_is_live(&rig.rx.vring) && !queue_is_live(&rig.tx.vring));
    assert_eq!((rig.rx.used_idx(), rig.tx.used_idx()), (0, 0));
    assert!(nothing_to_read(&mut peer));

    // The driver repairs its rings and the transport starts the queues again.
    for queue in [&mut rig.rx, &mut rig.tx] {
        queue.set_avail_idx(1);
        queue.vring.set_queue_ready(true);
    }
    rig.kick_rx();
    rig.kick_tx();
    assert_eq!(rig.rx.used(0).1, 5);
    assert_eq!(rig.memory.bytes(RX_DATA, 5), b"typed");
    assert_eq!(read_exactly(&mut peer, 6), b"output");
    assert_eq!(recorder.faults().len(), 2);
}

#[test]
fn broken_rings_stop_their_queues_without_event_idx() {
    broken_rings_stop_their_queues(false);
}

#[test]
fn broken_rings_stop_their_queues_with_event_idx() {
    broken_rings_stop_their_queues(true);
}
