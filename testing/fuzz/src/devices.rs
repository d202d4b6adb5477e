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
//! After the events, [`Guest::check`] judges every byte the device wrote and every used
//! element it returned.

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
use vhost_user_backend::{VhostUserBackend, VringRwLock};
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

/// The ready vrings of `queues` queues over `guest`, each with its call eventfd.
fn vrings(guest: &Guest, queues: u16, event_idx: bool) -> (Vec<VringRwLock>, Vec<EventFd>) {
    (0..queues)
        .map(|queue| {
            let (desc, avail, used) = ring_addresses(queue);
            ready_vring(
                &guest.atomic,
                QUEUE_SIZE,
                GuestAddress(desc),
                GuestAddress(avail),
                GuestAddress(used),
                event_idx,
            )
        })
        .unzip()
}

/// Hands `backend` the guest, acks the masked features, and returns the vrings.
fn connect<B>(backend: &B, input: &Input, guest: &Guest) -> (Vec<VringRwLock>, Vec<EventFd>)
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()>,
{
    backend
        .update_memory(guest.atomic.clone())
        .expect("memory update");
    backend.acked_features(backend.features() & input.feature_mask);
    backend.set_event_idx(input.event_idx());
    vrings(guest, backend.num_queues() as u16, input.event_idx())
}

fn event<B>(backend: &B, device_event: u16, vrings: &[VringRwLock])
where
    B: VhostUserBackend<Vring = VringRwLock, Bitmap = ()>,
{
    backend
        .handle_event(device_event, EventSet::IN, vrings, 0)
        .unwrap_or_else(|error| panic!("event {device_event} failed the worker: {error}"));
}

/// virtio-rng: one request queue, filled from /dev/zero.
pub fn rng(data: &[u8]) {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let guest = Guest::new(input.image, 1);
    let config = RngConfig {
        source: "/dev/zero".into(),
        rate_limit: None,
    };
    let backend = RngBackend::new(&config.validate().expect("valid")).expect("rng device");
    let (vrings, _calls) = connect(&backend, &input, &guest);
    event(&backend, 0, &vrings);
    guest.check();
}

/// virtio-blk: one request queue over a 64 KiB disk in memory, with synchronous I/O so each
/// request completes inside the kick.
pub fn blk(data: &[u8]) {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let guest = Guest::new(input.image, 1);
    let config = BlkConfig {
        readonly: input.options & OPTION_READONLY != 0,
        io_engine: IoEngine::Sync,
        poll_us: 0,
        queue_size: QUEUE_SIZE,
        ..BlkConfig::memory(DISK_SIZE)
    };
    let backend = BlkBackend::new(&config.validate().expect("valid")).expect("blk device");
    let (vrings, _calls) = connect(&backend, &input, &guest);
    event(&backend, 0, &vrings);
    guest.check();
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

/// virtio-net: one queue pair and the control queue over a socket pair standing in for the
/// TAP. The host's frames wait on the TAP; then TX, RX, the TAP's readable event and the
/// control queue are served, in that order.
pub fn net(data: &[u8]) {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let (device_end, wire) = UnixDatagram::pair().expect("socket pair");
    // Non-blocking on both ends, as a TAP queue is opened.
    device_end.set_nonblocking(true).expect("non-blocking");
    wire.set_nonblocking(true).expect("non-blocking");
    for frame in frames(input.host_data) {
        // A frame the socket cannot take (too large, buffer full) is simply not on the TAP.
        let _ = wire.send(frame);
    }
    let config = NetConfig {
        queue_size: QUEUE_SIZE,
        ..NetConfig::tap("fuzz0")
    };
    let backend = NetBackend::with_taps(vec![FakeTap(device_end)], &config).expect("net device");
    let queues = backend.num_queues() as u16;
    let guest = Guest::new(input.image, queues);
    let registry = Arc::new(EpollRegistry::default());
    backend
        .attach_event_registry(0, registry)
        .expect("registry");
    let (vrings, _calls) = connect(&backend, &input, &guest);
    let tap_readable = queues + 1;
    for device_event in [1, 0, tap_readable, 2] {
        event(&backend, device_event, &vrings);
    }
    guest.check();
}

/// virtio-console: receive and transmit queues over a socket pair; the host data waits as
/// input, then TX, RX and the input event are served.
pub fn console(data: &[u8]) {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let (device_end, host_end) = UnixStream::pair().expect("socket pair");
    host_end.set_nonblocking(true).expect("non-blocking");
    // What the socket takes now; the rest is input the host never sent.
    let _ = std::io::Write::write(&mut &host_end, input.host_data);
    let output = OwnedFd::from(device_end.try_clone().expect("duplicate"));
    let streams = Streams::new(OwnedFd::from(device_end), output).expect("streams");
    let backend =
        ConsoleBackend::with_endpoint(Endpoint::Streams(streams), None::<&std::path::Path>)
            .expect("console device");
    let guest = Guest::new(input.image, 2);
    let registry = Arc::new(EpollRegistry::default());
    backend
        .attach_event_registry(0, registry)
        .expect("registry");
    let (vrings, _calls) = connect(&backend, &input, &guest);
    for device_event in [1, 0, STREAM_EVENT] {
        event(&backend, device_event, &vrings);
    }
    guest.check();
    drop(host_end);
}
