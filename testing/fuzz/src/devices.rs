//! Device targets: each device's chain parsing and request handling over a guest memory the
//! fuzzer writes, driven through `handle_event` as a transport's worker thread drives it.
//!
//! Input layout (shared by the four targets):
//!
//! | bytes        | meaning                                                             |
//! |--------------|---------------------------------------------------------------------|
//! | 0            | options: bit 0 EVENT_IDX, bit 1 read-only disk (blk)                |
//! | 1..9         | mask of the offered features the driver acks (little endian)        |
//! | 9..11        | length `L` of the host data (little endian)                         |
//! | 11..11+L     | host data: frames from the TAP (each preceded by a 2-byte length),  |
//! |              | or console input                                                    |
//! | 11+L..       | guest memory image from address 0 (see [`crate::guest`])            |
//!
//! After the events the queues are stopped and the device reset, as a transport's device reset
//! does (which may complete chains still in flight); then [`Guest::check`] judges every byte the
//! device wrote and every used element it returned.
//!
//! What is expensive to build (guest memory, vrings and their eventfds, socket pairs, and for
//! rng and blk the device itself) is built once per thread and reset between inputs, so that
//! nothing one input did reaches the next: guest memory is rewritten whole, each queue is reset
//! and set up again from index 0, the host side's sockets are drained, and the blk disk is
//! zeroed. The net and console devices keep host data they read but could not deliver across a
//! device reset (it belongs to the host, not to the driver), so those two are built afresh for
//! every input. [`digest`] runs an input and sums up what it did, so tests can check that an
//! input's effect does not depend on what ran before it.

use std::cell::RefCell;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;

use hvisor_vhost_blk::{BlkBackend, BlkConfig, IoEngine};
use hvisor_vhost_console::ConsoleBackend;
use hvisor_vhost_console::backend::STREAM_EVENT;
use hvisor_vhost_console::endpoint::{Endpoint, Streams};
use hvisor_vhost_core::VirtioDevice;
use hvisor_vhost_core::testing::{EpollRegistry, ready_vring};
use hvisor_vhost_net::{NetBackend, NetConfig, TapQueue};
use hvisor_vhost_rng::{RngBackend, RngConfig};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::guest::{Guest, QUEUE_SIZE, ring_addresses};

const OPTION_EVENT_IDX: u8 = 1;
const OPTION_READONLY: u8 = 2;
const HEADER_LEN: usize = 11;
/// The disk of the blk target: large enough for sectors beyond guest memory to be valid.
const DISK_SIZE: u64 = 1 << 16;

/// A device input, split into its parts.
struct Input<'a> {
    options: u8,
    feature_mask: u64,
    host_data: &'a [u8],
    image: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let header = data.get(..HEADER_LEN)?;
        let host_len = usize::from(u16::from_le_bytes([header[9], header[10]]));
        let rest = &data[HEADER_LEN..];
        let split = host_len.min(rest.len());
        Some(Input {
            options: header[0],
            feature_mask: u64::from_le_bytes(header[1..9].try_into().expect("8 bytes")),
            host_data: &rest[..split],
            image: &rest[split..],
        })
    }

    fn event_idx(&self) -> bool {
        self.options & OPTION_EVENT_IDX != 0
    }
}

/// Encodes a device input (for seeds and regression inputs).
pub fn device_input(options: u8, feature_mask: u64, host_data: &[u8], image: &[u8]) -> Vec<u8> {
    let mut input = vec![options];
    input.extend_from_slice(&feature_mask.to_le_bytes());
    input.extend_from_slice(&(host_data.len() as u16).to_le_bytes());
    input.extend_from_slice(host_data);
    input.extend_from_slice(image);
    input
}

/// Guest memory and the vrings over it, kept for every input of a thread's target.
struct Rig {
    guest: Guest,
    vrings: Vec<VringRwLock>,
    /// The driver's side of each vring's call eventfd.
    calls: Vec<EventFd>,
}

impl Rig {
    fn new(queues: u16) -> Self {
        let guest = Guest::new(queues);
        let (vrings, calls) = (0..queues)
            .map(|queue| {
                let (desc, avail, used) = ring_addresses(queue);
                ready_vring(
                    &guest.atomic,
                    QUEUE_SIZE,
                    GuestAddress(desc),
                    GuestAddress(avail),
                    GuestAddress(used),
                    false,
                )
            })
            .unzip();
        Rig {
            guest,
            vrings,
            calls,
        }
    }

    /// Starts an input on `backend`: guest memory holds the input's image, every queue is
    /// reset and made ready again from index 0 at the fixed ring addresses, and the backend has
    /// the guest memory and the input's features.
    fn start<B>(&mut self, backend: &B, input: &Input)
    where
        B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()>,
    {
        self.guest.load(input.image);
        for ((queue, vring), call) in (0..).zip(&self.vrings).zip(&self.calls) {
            vring.get_mut().get_queue_mut().reset();
            let (desc, avail, used) = ring_addresses(queue);
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(desc, avail, used)
                .expect("aligned ring addresses");
            vring.set_queue_event_idx(input.event_idx());
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            // Notifications of earlier inputs (nothing reads them; this keeps the count low).
            let _ = call.read();
        }
        backend
            .update_memory(self.guest.atomic.clone())
            .expect("memory update");
        backend.acked_features(backend.features() & input.feature_mask);
        backend.set_event_idx(input.event_idx());
    }

    /// Ends an input as a transport's device reset does: every queue disabled and stopped
    /// (stopping may complete a chain in flight), then the device reset; then checks guest
    /// memory, and returns a digest of it when asked to.
    fn finish<B>(&mut self, backend: &B, want_digest: bool) -> Option<u64>
    where
        B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()>,
    {
        for (index, vring) in (0..).zip(&self.vrings) {
            vring.set_enabled(false);
            vring.set_queue_ready(false);
            backend
                .stop_vring(index)
                .unwrap_or_else(|error| panic!("stopping queue {index}: {error}"));
        }
        backend.reset_device();
        self.guest.check();
        want_digest.then(|| {
            let mut hasher = DefaultHasher::new();
            self.guest.image_after().hash(&mut hasher);
            hasher.finish()
        })
    }
}

fn event<B>(backend: &B, device_event: u16, vrings: &[VringRwLock])
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()>,
{
    backend
        .handle_event(device_event, EventSet::IN, vrings, 0)
        .unwrap_or_else(|error| panic!("event {device_event} failed the worker: {error}"));
}

/// What an input did, for tests: a digest of guest memory after it, or `None` for an input
/// too short to be one.
pub fn digest(target: &str, data: &[u8]) -> Option<u64> {
    match target {
        "rng" => run_rng(data, true),
        "blk" => run_blk(data, true),
        "net" => run_net(data, true),
        "console" => run_console(data, true),
        _ => panic!("{target} is not a device target"),
    }
}

/// virtio-rng: one request queue, filled from /dev/zero.
pub fn rng(data: &[u8]) {
    run_rng(data, false);
}

fn run_rng(data: &[u8], want_digest: bool) -> Option<u64> {
    thread_local! {
        static RIG: RefCell<(RngBackend, Rig)> = RefCell::new({
            let config = RngConfig {
                source: "/dev/zero".into(),
                rate_limit: None,
            };
            let backend = RngBackend::new(&config.validate().expect("valid")).expect("rng device");
            (backend, Rig::new(1))
        });
    }
    let input = Input::parse(data)?;
    RIG.with_borrow_mut(|(backend, rig)| {
        rig.start(backend, &input);
        event(backend, 0, &rig.vrings);
        rig.finish(backend, want_digest)
    })
}

/// virtio-blk: one request queue over a 64 KiB disk in memory, with synchronous I/O so each
/// request completes inside the kick; one device writable, one read-only.
pub fn blk(data: &[u8]) {
    run_blk(data, false);
}

fn run_blk(data: &[u8], want_digest: bool) -> Option<u64> {
    thread_local! {
        static RIG: RefCell<([BlkBackend; 2], Rig)> = RefCell::new({
            let backend = |readonly| {
                let config = BlkConfig {
                    readonly,
                    io_engine: IoEngine::Sync,
                    poll_us: 0,
                    queue_size: QUEUE_SIZE,
                    ..BlkConfig::memory(DISK_SIZE)
                };
                BlkBackend::new(&config.validate().expect("valid")).expect("blk device")
            };
            ([backend(false), backend(true)], Rig::new(1))
        });
    }
    let input = Input::parse(data)?;
    RIG.with_borrow_mut(|(backends, rig)| {
        let backend = &backends[usize::from(input.options & OPTION_READONLY != 0)];
        // A zeroed disk, whatever earlier inputs wrote: cut to nothing and grown again.
        let disk = backend.device().storage().file();
        disk.set_len(0)
            .and_then(|()| disk.set_len(DISK_SIZE))
            .expect("zeroing the disk");
        rig.start(backend, &input);
        event(backend, 0, &rig.vrings);
        rig.finish(backend, want_digest)
    })
}
/// The device's end of a datagram socket pair, standing in for a TAP queue.
struct FakeTap(UnixDatagram);

impl AsFd for FakeTap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl TapQueue for FakeTap {
    fn set_vnet_header_len(&self, _len: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn set_offloads(&self, _offloads: u32) -> std::io::Result<()> {
        Ok(())
    }

    fn set_queue_enabled(&self, _enabled: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// Frames of the host data: each a 2-byte length and that many bytes (the last one cut short
/// by the end of the data).
fn frames(mut host_data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = host_data.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
        let (frame, rest) = rest.split_at(len);
        host_data = rest;
        Some(frame)
    })
}

/// Reads and drops every datagram waiting on the non-blocking `socket`.
fn drain_datagrams(socket: &UnixDatagram) {
    let mut buffer = [0u8; 2048];
    while socket.recv(&mut buffer).is_ok() {}
}

/// Reads and drops every byte waiting on the non-blocking `stream`.
fn drain_stream(mut stream: &UnixStream) {
    let mut buffer = [0u8; 4096];
    while stream.read(&mut buffer).is_ok_and(|read| read > 0) {}
}

/// The net target's kept state: the socket pair standing in for the TAP, and the rig.
struct NetRig {
    device_end: UnixDatagram,
    wire: UnixDatagram,
    rig: Rig,
}

fn net_device(tap: &UnixDatagram) -> NetBackend<FakeTap> {
    let config = NetConfig {
        queue_size: QUEUE_SIZE,
        ..NetConfig::tap("fuzz0")
    };
    let tap = FakeTap(tap.try_clone().expect("duplicate"));
    NetBackend::with_taps(vec![tap], &config).expect("net device")
}

/// virtio-net: one queue pair and the control queue over a socket pair standing in for the
/// TAP. The host's frames wait on the TAP; then TX, RX, the TAP's readable event and the
/// control queue are served, in that order.
pub fn net(data: &[u8]) {
    run_net(data, false);
}

fn run_net(data: &[u8], want_digest: bool) -> Option<u64> {
    thread_local! {
        static RIG: RefCell<NetRig> = RefCell::new({
            let (device_end, wire) = UnixDatagram::pair().expect("socket pair");
            // Non-blocking on both ends, as a TAP queue is opened.
            device_end.set_nonblocking(true).expect("non-blocking");
            wire.set_nonblocking(true).expect("non-blocking");
            let queues = net_device(&device_end).num_queues() as u16;
            NetRig {
                device_end,
                wire,
                rig: Rig::new(queues),
            }
        });
    }
    let input = Input::parse(data)?;
    RIG.with_borrow_mut(
        |NetRig {
             device_end,
             wire,
             rig,
         }| {
            // Frames an earlier input left on the TAP or sent to the wire.
            drain_datagrams(device_end);
            drain_datagrams(wire);
            for frame in frames(input.host_data) {
                // A frame the socket cannot take (too large, buffer full) is simply not on the TAP.
                let _ = wire.send(frame);
            }
            let backend = net_device(device_end);
            let queues = backend.num_queues() as u16;
            backend
                .attach_event_registry(0, Arc::new(EpollRegistry::default()))
                .expect("registry");
            rig.start(&backend, &input);
            let tap_readable = queues + 1;
            for device_event in [1, 0, tap_readable, 2] {
                event(&backend, device_event, &rig.vrings);
            }
            rig.finish(&backend, want_digest)
        },
    )
}

/// The console target's kept state: the socket pair of the host side, and the rig.
struct ConsoleRig {
    device_end: UnixStream,
    host_end: UnixStream,
    rig: Rig,
}

/// virtio-console: receive and transmit queues over a socket pair; the host data waits as
/// input, then TX, RX and the input event are served.
pub fn console(data: &[u8]) {
    run_console(data, false);
}

fn run_console(data: &[u8], want_digest: bool) -> Option<u64> {
    thread_local! {
        static RIG: RefCell<ConsoleRig> = RefCell::new({
            let (device_end, host_end) = UnixStream::pair().expect("socket pair");
            // The device makes its end non-blocking too; the harness drains both.
            device_end.set_nonblocking(true).expect("non-blocking");
            host_end.set_nonblocking(true).expect("non-blocking");
            ConsoleRig {
                device_end,
                host_end,
                rig: Rig::new(2),
            }
        });
    }
    let input = Input::parse(data)?;
    RIG.with_borrow_mut(
        |ConsoleRig {
             device_end,
             host_end,
             rig,
         }| {
            // Input an earlier device did not read, output it wrote.
            drain_stream(device_end);
            drain_stream(host_end);
            // What the socket takes now; the rest is input the host never sent.
            let _ = std::io::Write::write(&mut &*host_end, input.host_data);
            let duplicate = || OwnedFd::from(device_end.try_clone().expect("duplicate"));
            let streams = Streams::new(duplicate(), duplicate()).expect("streams");
            let backend =
                ConsoleBackend::with_endpoint(Endpoint::Streams(streams), None::<&std::path::Path>)
                    .expect("console device");
            backend
                .attach_event_registry(0, Arc::new(EpollRegistry::default()))
                .expect("registry");
            rig.start(&backend, &input);
            for device_event in [1, 0, STREAM_EVENT] {
                event(&backend, device_event, &rig.vrings);
            }
            rig.finish(&backend, want_digest)
        },
    )
}
