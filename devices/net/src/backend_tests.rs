//! Queue-path tests: real `VringRwLock`s over `MockSplitQueue` rings, driven through
//! `handle_event` exactly as a transport's worker thread does, with a datagram socket pair
//! standing in for the TAP (one end is the device's TAP queue, the other the "wire").

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hvisor_vhost_core::queue::{QueueFault, RingFault, queue_is_live};
use hvisor_vhost_core::testing::{
    Buffer, FaultRecorder, UsedRing, mock_queue, mock_used_ring, publish_heads, raw, readable,
    rebased, returns_within, set_avail_idx, writable,
};
use hvisor_vhost_core::{EventRegistry, VirtioDevice};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::NetBackend;
use crate::config::{MacAddress, NetConfig};
use crate::tap::TapQueue;
use crate::virtio_net::*;

const QUEUE_SIZE: u16 = 16;
const MEMORY_SIZE: u64 = 0x10_0000;
const BUFFERS: u64 = 0x1_0000;
const UNTOUCHED: u8 = 0xee;
/// Bound of a worker event that must return (a worker spinning on a broken ring fails the
/// test).
const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The device's end of a socket pair, recording the controls the device applies.
struct FakeTap {
    socket: UnixDatagram,
    header_lens: Mutex<Vec<usize>>,
    offloads: Mutex<Vec<u32>>,
    enabled: Mutex<Vec<bool>>,
    refuse_ufo: bool,
}

impl AsFd for FakeTap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl TapQueue for FakeTap {
    fn set_vnet_header_len(&self, len: usize) -> io::Result<()> {
        self.header_lens.lock().unwrap().push(len);
        Ok(())
    }

    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        if self.refuse_ufo && offloads & libc::TUN_F_UFO != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.offloads.lock().unwrap().push(offloads);
        Ok(())
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        self.enabled.lock().unwrap().push(enabled);
        Ok(())
    }
}

/// A TAP queue and the wire end of its socket pair.
fn fake_tap(refuse_ufo: bool) -> (FakeTap, UnixDatagram) {
    let (device, wire) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    wire.set_nonblocking(true).unwrap();
    let tap = FakeTap {
        socket: device,
        header_lens: Mutex::default(),
        offloads: Mutex::default(),
        enabled: Mutex::default(),
        refuse_ufo,
    };
    (tap, wire)
}

/// A worker's wait set as the device sees it; refuses what epoll refuses.
#[derive(Default)]
struct FakeRegistry {
    entries: Mutex<Vec<(RawFd, EventSet, u64)>>,
}

impl FakeRegistry {
    fn watches(&self, data: u64) -> Option<EventSet> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .find(|entry| entry.2 == data)
            .map(|entry| entry.1)
    }
}

impl EventRegistry for FakeRegistry {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        let mut entries = self.entries.lock().unwrap();
        if entries.iter().any(|entry| entry.0 == fd) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        entries.push((fd, events, data));
        Ok(())
    }

    fn unregister(&self, fd: RawFd, _events: EventSet, data: u64) -> io::Result<()> {
        let mut entries = self.entries.lock().unwrap();
        let position = entries
            .iter()
            .position(|entry| entry.0 == fd && entry.2 == data)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        entries.remove(position);
        Ok(())
    }
}

const fn bit(feature: u32) -> u64 {
    1 << feature
}

const MODERN: u64 = bit(VIRTIO_F_VERSION_1);
const MERGEABLE: u64 = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF);

/// Each queue's rings take a page of their own.
fn queue_start(queue: usize) -> u64 {
    queue as u64 * 0x1000
}

/// A test rig: guest memory, every queue of the device, the backend under test, the wire ends
/// of its TAP queues and the registries of its worker threads.
struct Rig<T: TapQueue + 'static = FakeTap> {
    mem: &'static GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    /// Shared, so an event can run on a thread of its own (see `event_within_bound`).
    backend: Arc<NetBackend<T>>,
    vrings: Vec<VringRwLock>,
    calls: Vec<EventFd>,
    next_desc: Vec<u16>,
    registries: Vec<Arc<FakeRegistry>>,
    wires: Vec<UnixDatagram>,
}

impl Rig<FakeTap> {
    fn new(config: NetConfig, features: u64, event_idx: bool) -> Self {
        let (taps, wires): (Vec<_>, Vec<_>) =
            (0..config.queue_pairs).map(|_| fake_tap(false)).unzip();
        let backend = NetBackend::with_taps(taps, &config).unwrap();
        Rig::with_backend(backend, wires, features, event_idx)
    }

    fn pairs(queue_pairs: u16, features: u64, event_idx: bool) -> Self {
        let config = NetConfig {
            queue_pairs,
            ..NetConfig::tap("fake0")
        };
        Self::new(config, features, event_idx)
    }

    fn default(features: u64, event_idx: bool) -> Self {
        Self::pairs(1, features, event_idx)
    }

    fn tap(&self, pair: usize) -> &FakeTap {
        &self.backend.pairs[pair].tap
    }

    /// Sends a frame from the wire to the device.
    fn send(&self, pair: usize, frame: &[u8]) {
        self.wires[pair].send(frame).unwrap();
    }

    /// Frames the device wrote to the wire so far.
    fn received(&self, pair: usize) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
        while let Ok(len) = self.wires[pair].recv(&mut buf) {
            frames.push(buf[..len].to_vec());
        }
        frames
    }
}

impl<T: TapQueue + 'static> Rig<T> {
    fn with_backend(
        backend: NetBackend<T>,
        wires: Vec<UnixDatagram>,
        features: u64,
        event_idx: bool,
    ) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap(),
        ));
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut vrings = Vec::new();
        let mut calls = Vec::new();
        let mut queues = Vec::new();
        for queue in 0..backend.num_queues() {
            let (rings, vring, call) =
                mock_queue(mem, &atomic, queue_start(queue), QUEUE_SIZE, event_idx);
            vrings.push(vring);
            calls.push(call);
            queues.push(rings);
        }
        let registries: Vec<Arc<FakeRegistry>> = (0..backend.queues_per_thread().len())
            .map(|_| Arc::new(FakeRegistry::default()))
            .collect();
        for (thread, registry) in registries.iter().enumerate() {
            backend
                .attach_event_registry(thread, registry.clone())
                .unwrap();
        }
        backend.update_memory(atomic).unwrap();
        let features = features | if event_idx { bit(29) } else { 0 };
        backend.acked_features(features);
        backend.set_event_idx(event_idx);
        let next_desc = vec![0; vrings.len()];
        Rig {
            mem,
            queues,
            backend: Arc::new(backend),
            vrings,
            calls,
            next_desc,
            registries,
            wires,
        }
    }

    /// (thread, vrings of that thread, position of `queue` among them).
    fn thread_of(&self, queue: usize) -> (usize, Vec<VringRwLock>, u16) {
        let masks = self.backend.queues_per_thread();
        let thread = masks
            .iter()
            .position(|mask| mask >> queue & 1 == 1)
            .unwrap();
        let members: Vec<usize> = (0..self.vrings.len())
            .filter(|&q| masks[thread] >> q & 1 == 1)
            .collect();
        let position = members.iter().position(|&q| q == queue).unwrap() as u16;
        let vrings = members.iter().map(|&q| self.vrings[q].clone()).collect();
        (thread, vrings, position)
    }

    fn kick(&self, queue: usize) {
        let (thread, vrings, position) = self.thread_of(queue);
        self.backend
            .handle_event(position, EventSet::IN, &vrings, thread)
            .unwrap();
    }

    fn tap_event(&self, pair: usize, event: u16, evset: EventSet) {
        let (thread, vrings, _) = self.thread_of(2 * pair);
        self.backend
            .handle_event(event, evset, &vrings, thread)
            .unwrap();
    }

    /// Runs worker event `event` of the thread serving `queue` on a thread of its own,
    /// failing the test if it does not return.
    fn event_within_bound(&self, queue: usize, event: u16) {
        let (thread, vrings, _) = self.thread_of(queue);
        let backend = self.backend.clone();
        returns_within("a worker event", EVENT_TIMEOUT, move || {
            backend
                .handle_event(event, EventSet::IN, &vrings, thread)
                .unwrap();
        });
    }

    fn kick_within_bound(&self, queue: usize) {
        self.event_within_bound(queue, self.thread_of(queue).2);
    }

    fn tap_readable(&self, pair: usize) {
        self.tap_event(pair, self.backend.tap_readable_event(), EventSet::IN);
    }

    fn tap_writable(&self, pair: usize) {
        self.tap_event(pair, self.backend.tap_writable_event(), EventSet::OUT);
    }

    fn listening(&self, pair: usize) -> bool {
        let data = u64::from(self.backend.tap_readable_event());
        self.registries[pair].watches(data) == Some(EventSet::IN)
    }

    fn waiting_to_write(&self, pair: usize) -> bool {
        let data = u64::from(self.backend.tap_writable_event());
        self.registries[pair].watches(data) == Some(EventSet::OUT)
    }

    fn rings(&self, queue: usize) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        &self.queues[queue]
    }

    fn next_index(&self, queue: usize, count: usize) -> u16 {
        let first = self.next_desc[queue];
        if usize::from(first) + count > usize::from(QUEUE_SIZE) {
            0
        } else {
            first
        }
    }

    /// Publishes descriptors exactly as given; NEXT links are relative to the first one.
    fn publish(&mut self, queue: usize, descriptors: &[RawDescriptor]) -> u16 {
        let first = self.next_index(queue, descriptors.len());
        self.rings(queue)
            .add_desc_chains(&rebased(descriptors, first), first)
            .unwrap();
        self.next_desc[queue] = first + descriptors.len() as u16;
        first
    }

    fn add_chain(&mut self, queue: usize, buffers: &[Buffer]) -> u16 {
        let descriptors: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| {
                if i + 1 < buffers.len() {
                    raw(*buffer, VRING_DESC_F_NEXT, i as u16 + 1)
                } else {
                    raw(*buffer, 0, 0)
                }
            })
            .collect();
        self.publish(queue, &descriptors)
    }

    fn used_ring(&self, queue: usize) -> UsedRing {
        mock_used_ring(self.mem, queue_start(queue), QUEUE_SIZE)
    }

    /// The used-ring entry at `position` of `queue`: (descriptor head, used length).
    fn used(&self, queue: usize, position: u16) -> (u32, u32) {
        self.used_ring(queue).entry(position)
    }

    fn used_idx(&self, queue: usize) -> u16 {
        self.used_ring(queue).idx()
    }

    /// The avail ring index after which the driver is asked to kick (EVENT_IDX).
    fn avail_event(&self, queue: usize) -> u16 {
        self.used_ring(queue).avail_event()
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.write(addr, &vec![byte; len]);
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    fn signals(&self, queue: usize) -> u64 {
        self.calls[queue].read().unwrap_or(0)
    }
}

/// A frame with its virtio-net header: `header_len` header bytes, then an Ethernet header and
/// a payload of `payload` bytes, each byte derived from `seed`.
fn frame(header_len: usize, payload: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0u8; header_len];
    frame.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00]);
    frame.extend((0..payload).map(|i| seed.wrapping_add(i as u8)));
    frame
}

/// The frame as the guest must see it: `num_buffers` set.
fn with_num_buffers(mut frame: Vec<u8>, count: u16) -> Vec<u8> {
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&count.to_le_bytes());
    frame
}

fn tx_frames_reach_the_tap_exactly(event_idx: bool) {
    let mut rig = Rig::default(MODERN, event_idx);
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| frame(HEADER_LEN, 100 + i, i as u8))
        .collect();
    for (i, frame) in frames.iter().enumerate() {
        let at = BUFFERS + 0x1000 * i as u64;
        rig.write(at, frame);
        // Header alone, then the frame in two pieces.
        rig.add_chain(
            1,
            &[
                readable(at, HEADER_LEN as u32),
                readable(at + HEADER_LEN as u64, 20),
                readable(at + HEADER_LEN as u64 + 20, frame.len() as u32 - 32),
            ],
        );
    }
    rig.kick(1);
    assert_eq!(rig.received(0), frames);
    assert_eq!(rig.used_idx(1), 3);
    for position in 0..3 {
        assert_eq!(rig.used(1, position).1, 0, "TX chains return length 0");
    }
    assert_eq!(rig.signals(1), 1, "one interrupt for the batch");
    assert_eq!(rig.backend.stats().tx_frames.load(Ordering::Relaxed), 3);
    if event_idx {
        // avail_event tells the driver to kick for the very next chain (hvisor-tool #101).
        assert_eq!(rig.avail_event(1), 3);
    }
}

#[test]
fn tx_frames_reach_the_tap_exactly_without_event_idx() {
    tx_frames_reach_the_tap_exactly(false);
}

#[test]
fn tx_frames_reach_the_tap_exactly_with_event_idx() {
    tx_frames_reach_the_tap_exactly(true);
}

fn rx_frames_land_with_a_header(event_idx: bool) {
    let mut rig = Rig::default(MODERN, event_idx);
    let first = frame(HEADER_LEN, 200, 1);
    // The TAP leaves num_buffers alone; the device must set it.
    let mut sent = first.clone();
    sent[NUM_BUFFERS_OFFSET] = 0xff;
    rig.send(0, &sent);
    rig.fill(BUFFERS, 0x1000, UNTOUCHED);
    rig.add_chain(0, &[writable(BUFFERS, 100), writable(BUFFERS + 100, 1900)]);
    rig.add_chain(0, &[writable(BUFFERS + 0x1000, 2000)]);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 1);
    assert_eq!(rig.used(0, 0), (0, first.len() as u32));
    assert_eq!(
        rig.bytes(BUFFERS, first.len()),
        with_num_buffers(first.clone(), 1)
    );
    assert_eq!(rig.bytes(BUFFERS + first.len() as u64, 1), [UNTOUCHED]);
    assert!(rig.listening(0), "buffers are left, so the TAP is watched");
    assert_eq!(rig.signals(0), 1);

    let second = frame(HEADER_LEN, 60, 2);
    rig.send(0, &second);
    rig.tap_readable(0);
    assert_eq!(rig.used(0, 1), (2, second.len() as u32));
    assert_eq!(
        rig.bytes(BUFFERS + 0x1000, second.len()),
        with_num_buffers(second, 1)
    );
    assert_eq!(rig.backend.stats().rx_frames.load(Ordering::Relaxed), 2);
}

#[test]
fn rx_frames_land_with_a_header_without_event_idx() {
    rx_frames_land_with_a_header(false);
}

#[test]
fn rx_frames_land_with_a_header_with_event_idx() {
    rx_frames_land_with_a_header(true);
}

#[test]
fn legacy_drivers_get_a_ten_byte_header() {
    let mut rig = Rig::default(0, false);
    assert_eq!(*rig.tap(0).header_lens.lock().unwrap(), [LEGACY_HEADER_LEN]);
    let frame = frame(LEGACY_HEADER_LEN, 50, 3);
    rig.send(0, &frame);
    rig.add_chain(0, &[writable(BUFFERS, 2000)]);
    rig.kick(0);
    assert_eq!(rig.used(0, 0).1, frame.len() as u32);
    assert_eq!(rig.bytes(BUFFERS, frame.len()), frame);
}

fn mergeable_frames_span_chains(event_idx: bool) {
    let mut rig = Rig::default(MERGEABLE, event_idx);
    let frame = frame(HEADER_LEN, 236, 4);
    assert_eq!(frame.len(), 262);
    rig.send(0, &frame);
    for i in 0..4 {
        rig.add_chain(0, &[writable(BUFFERS + 0x1000 * i, 100)]);
    }
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 3);
    let lens: Vec<u32> = (0..3).map(|p| rig.used(0, p).1).collect();
    assert_eq!(lens, [100, 100, 62]);
    let mut landed = Vec::new();
    for i in 0..3 {
        landed.extend(rig.bytes(BUFFERS + 0x1000 * i, lens[i as usize] as usize));
    }
    assert_eq!(landed, with_num_buffers(frame, 3));
    assert_eq!(rig.signals(0), 1);
}

#[test]
fn mergeable_frames_span_chains_without_event_idx() {
    mergeable_frames_span_chains(false);
}

#[test]
fn mergeable_frames_span_chains_with_event_idx() {
    mergeable_frames_span_chains(true);
}

fn a_frame_waits_in_the_device_until_buffers_come(event_idx: bool) {
    let mut rig = Rig::default(MERGEABLE, event_idx);
    let frames: Vec<Vec<u8>> = (0..2).map(|i| frame(HEADER_LEN, 300, i)).collect();
    for frame in &frames {
        rig.send(0, frame);
    }
    // No buffers: the TAP is not watched, so the worker does not spin on it.
    rig.kick(0);
    assert!(!rig.listening(0));
    assert_eq!(rig.used_idx(0), 0);

    // One buffer too small for the frame: it stays in the ring and the TAP stays unwatched.
    rig.add_chain(0, &[writable(BUFFERS, 200)]);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 0);
    assert!(!rig.listening(0));
    if event_idx {
        // The driver is asked to kick for the chain after the one already seen.
        assert_eq!(rig.avail_event(0), 1);
    }

    // Enough room for the first frame only: it is delivered, the second waits in the device.
    rig.add_chain(0, &[writable(BUFFERS + 0x1000, 200)]);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 2);
    assert!(!rig.listening(0));
    assert_eq!(rig.received(0), Vec::<Vec<u8>>::new());

    rig.add_chain(0, &[writable(BUFFERS + 0x2000, 1000)]);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 3);
    assert_eq!(
        rig.bytes(BUFFERS + 0x2000, frames[1].len()),
        with_num_buffers(frames[1].clone(), 1)
    );
    // The TAP ran empty first: it is watched, and the next frame finds the ring dry and
    // unwatches it again (one wake-up, no spinning).
    assert!(rig.listening(0));
    rig.send(0, &frames[0]);
    rig.tap_readable(0);
    assert!(!rig.listening(0));
}

#[test]
fn a_frame_waits_in_the_device_until_buffers_come_without_event_idx() {
    a_frame_waits_in_the_device_until_buffers_come(false);
}

#[test]
fn a_frame_waits_in_the_device_until_buffers_come_with_event_idx() {
    a_frame_waits_in_the_device_until_buffers_come(true);
}

/// Makes the device end's send buffer tiny, so a few frames fill it and writes get EAGAIN.
fn shrink_send_buffer(socket: &UnixDatagram) {
    let size: libc::c_int = 4096;
    // SAFETY: the option value points to `size`, which outlives the call, with its length.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
}

fn a_full_tap_holds_tx_back_without_losing_frames(event_idx: bool) {
    let mut rig = Rig::default(MODERN, event_idx);
    shrink_send_buffer(&rig.tap(0).socket);
    let frames: Vec<Vec<u8>> = (0..12).map(|i| frame(HEADER_LEN, 1500, i)).collect();
    for (i, frame) in frames.iter().enumerate() {
        let at = BUFFERS + 0x1000 * i as u64;
        rig.write(at, frame);
        rig.add_chain(1, &[readable(at, frame.len() as u32)]);
    }
    rig.kick(1);
    let sent = rig.used_idx(1);
    assert!(
        sent > 0 && sent < 12,
        "{sent} frames went out before the TAP filled"
    );
    assert!(rig.waiting_to_write(0));
    // Kicks while the TAP is full change nothing.
    rig.kick(1);
    assert_eq!(rig.used_idx(1), sent);

    let mut arrived = rig.received(0);
    let mut rounds = 0;
    while rig.used_idx(1) < 12 {
        assert!(rig.waiting_to_write(0), "stalled with chains left");
        rig.tap_writable(0);
        arrived.extend(rig.received(0));
        rounds += 1;
        assert!(rounds < 20);
    }
    assert!(!rig.waiting_to_write(0));
    let seeds =
        |frames: &[Vec<u8>]| -> Vec<u8> { frames.iter().map(|f| f[HEADER_LEN + 14]).collect() };
    assert_eq!(
        seeds(&arrived),
        seeds(&frames),
        "every frame, once, in order"
    );
    assert_eq!(arrived, frames);
    assert_eq!(rig.backend.stats().tx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn a_full_tap_holds_tx_back_without_losing_frames_without_event_idx() {
    a_full_tap_holds_tx_back_without_losing_frames(false);
}

#[test]
fn a_full_tap_holds_tx_back_without_losing_frames_with_event_idx() {
    a_full_tap_holds_tx_back_without_losing_frames(true);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut rig = Rig::default(MODERN, false);
    let header_and_ethernet = (HEADER_LEN + 14) as u32;
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        (
            "shorter than header and Ethernet header",
            vec![raw(readable(BUFFERS, header_and_ethernet - 1), 0, 0)],
        ),
        (
            "header only",
            vec![raw(readable(BUFFERS, HEADER_LEN as u32), 0, 0)],
        ),
        (
            "longer than 65562 bytes",
            vec![
                raw(readable(BUFFERS, 60000), VRING_DESC_F_NEXT, 1),
                raw(readable(BUFFERS, 5563), 0, 0),
            ],
        ),
        (
            "device-writable buffer",
            vec![
                raw(readable(BUFFERS, 100), VRING_DESC_F_NEXT, 1),
                raw(writable(BUFFERS + 0x1000, 100), 0, 0),
            ],
        ),
        (
            "outside guest memory",
            vec![raw(readable(MEMORY_SIZE + 0x1000, 100), 0, 0)],
        ),
        (
            "straddling the end of guest memory",
            vec![raw(readable(MEMORY_SIZE - 50, 100), 0, 0)],
        ),
        (
            "descriptor loop",
            vec![
                raw(readable(BUFFERS, 100), VRING_DESC_F_NEXT, 1),
                raw(readable(BUFFERS, 100), VRING_DESC_F_NEXT, 0),
            ],
        ),
    ];
    let count = cases.len() as u16;
    for (name, descriptors) in cases {
        let head = rig.publish(1, &descriptors);
        let position = rig.used_idx(1);
        rig.kick(1);
        assert_eq!(rig.used(1, position), (u32::from(head), 0), "{name}");
        assert!(rig.received(0).is_empty(), "{name}: reached the TAP");
    }
    assert_eq!(rig.used_idx(1), count);
    assert_eq!(
        rig.backend.stats().tx_dropped.load(Ordering::Relaxed),
        u64::from(count)
    );
    // The queue keeps working.
    let good = frame(HEADER_LEN, 46, 9);
    rig.write(BUFFERS, &good);
    rig.add_chain(1, &[readable(BUFFERS, good.len() as u32)]);
    rig.kick(1);
    assert_eq!(rig.received(0), [good]);
}

#[test]
fn malformed_rx_frames_and_chains_are_dropped_and_counted() {
    let mut rig = Rig::default(MODERN, false);
    // From the TAP: too short, too long.
    rig.send(0, &frame(HEADER_LEN, 0, 0)[..HEADER_LEN + 13]);
    rig.send(
        0,
        &frame(HEADER_LEN, MAX_FRAME_LEN - HEADER_LEN - 14 + 1, 0),
    );
    rig.send(0, &frame(HEADER_LEN, 500, 7));
    // From the guest: a readable buffer, one outside memory, one shorter than the header,
    // then one too small for the frame (no MRG_RXBUF: the frame is dropped, the chain kept),
    // then a good one.
    let bad_chains = [
        rig.add_chain(0, &[readable(BUFFERS, 2000)]),
        rig.add_chain(0, &[writable(MEMORY_SIZE - 100, 2000)]),
        rig.add_chain(0, &[writable(BUFFERS, HEADER_LEN as u32 - 1)]),
    ];
    rig.fill(BUFFERS + 0x1000, 0x1000, UNTOUCHED);
    let small = rig.add_chain(0, &[writable(BUFFERS + 0x1000, 100)]);
    rig.kick(0);
    for (position, head) in bad_chains.iter().enumerate() {
        assert_eq!(rig.used(0, position as u16), (u32::from(*head), 0));
    }
    assert_eq!(
        rig.used_idx(0),
        3,
        "the small chain is kept for a smaller frame"
    );
    assert_eq!(rig.bytes(BUFFERS + 0x1000, 100), vec![UNTOUCHED; 100]);
    // 2 bad frames, 3 bad chains, 1 frame too big for the non-mergeable buffer.
    assert_eq!(rig.backend.stats().rx_dropped.load(Ordering::Relaxed), 6);

    let fits = frame(HEADER_LEN, 40, 8);
    rig.send(0, &fits);
    rig.tap_readable(0);
    assert_eq!(rig.used(0, 3), (u32::from(small), fits.len() as u32));
    assert_eq!(
        rig.bytes(BUFFERS + 0x1000, fits.len()),
        with_num_buffers(fits, 1)
    );
    assert_eq!(rig.backend.stats().rx_frames.load(Ordering::Relaxed), 1);
}

/// A control command: class, command, payload; returns (used length, ack byte).
fn control(rig: &mut Rig, class: u8, command: u8, payload: &[u8]) -> (u32, u8) {
    let ctrl = rig.vrings.len() - 1;
    let mut request = vec![class, command];
    request.extend_from_slice(payload);
    rig.write(BUFFERS, &request);
    rig.write(BUFFERS + 0x100, &[UNTOUCHED]);
    let head = rig.add_chain(
        ctrl,
        &[
            readable(BUFFERS, request.len() as u32),
            writable(BUFFERS + 0x100, 1),
        ],
    );
    let position = rig.used_idx(ctrl);
    rig.kick(ctrl);
    let (id, len) = rig.used(ctrl, position);
    assert_eq!(id, u32::from(head));
    (len, rig.bytes(BUFFERS + 0x100, 1)[0])
}

#[test]
fn the_control_queue_sets_queue_pairs() {
    let mq = MODERN | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    let mut rig = Rig::pairs(2, mq, false);
    assert_eq!(rig.backend.num_queues(), 5);
    assert_eq!(rig.backend.queues_per_thread(), vec![0b10011, 0b01100]);
    let features = rig.backend.features();
    assert_ne!(features & bit(VIRTIO_NET_F_MQ), 0);
    assert_ne!(features & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    let mq_class = VIRTIO_NET_CTRL_MQ as u8;
    let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;

    assert_eq!(
        control(&mut rig, mq_class, set, &1u16.to_le_bytes()),
        (1, ok)
    );
    assert_eq!(*rig.tap(1).enabled.lock().unwrap(), [false]);
    assert!(rig.tap(0).enabled.lock().unwrap().is_empty());
    assert_eq!(
        control(&mut rig, mq_class, set, &2u16.to_le_bytes()),
        (1, ok)
    );
    assert_eq!(*rig.tap(1).enabled.lock().unwrap(), [false, true]);
    for pairs in [0u16, 3] {
        assert_eq!(
            control(&mut rig, mq_class, set, &pairs.to_le_bytes()),
            (1, err)
        );
    }
    assert_eq!(
        control(&mut rig, mq_class, set, &[1]),
        (1, err),
        "short payload"
    );
    assert_eq!(
        control(&mut rig, 0, 0, &[1]),
        (1, err),
        "CTRL_RX is not offered"
    );
    assert_eq!(control(&mut rig, 99, 0, &[]), (1, err));

    // No ack byte: returned empty.
    let ctrl = 4;
    let head = rig.add_chain(ctrl, &[readable(BUFFERS, 4)]);
    let position = rig.used_idx(ctrl);
    rig.kick(ctrl);
    assert_eq!(rig.used(ctrl, position), (u32::from(head), 0));

    // The second pair has its own worker, TAP queue and wait set.
    let frame = frame(HEADER_LEN, 64, 5);
    rig.write(BUFFERS + 0x2000, &frame);
    rig.add_chain(3, &[readable(BUFFERS + 0x2000, frame.len() as u32)]);
    rig.kick(3);
    assert_eq!(rig.received(1), [frame]);
    assert!(rig.received(0).is_empty());
}

#[test]
fn without_mq_negotiated_pairs_cannot_be_set() {
    let mut rig = Rig::pairs(2, MODERN | bit(VIRTIO_NET_F_CTRL_VQ), false);
    let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    let reply = control(&mut rig, VIRTIO_NET_CTRL_MQ as u8, set, &1u16.to_le_bytes());
    assert_eq!(reply, (1, VIRTIO_NET_ERR as u8));
    assert!(rig.tap(1).enabled.lock().unwrap().is_empty());
}

#[test]
fn acked_features_configure_the_tap() {
    let guest = bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_UFO);
    let rig = Rig::default(MERGEABLE | guest, false);
    let tap = rig.tap(0);
    assert_eq!(*tap.header_lens.lock().unwrap(), [HEADER_LEN]);
    let all = libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | libc::TUN_F_TSO_ECN
        | libc::TUN_F_UFO;
    // Probe, reset, then what the driver acked.
    assert_eq!(
        *tap.offloads.lock().unwrap(),
        [libc::TUN_F_CSUM | libc::TUN_F_UFO, 0, all]
    );
    assert_ne!(rig.backend.features() & bit(VIRTIO_NET_F_GUEST_UFO), 0);

    // A kernel without UFO: not offered, and dropped from the offloads if acked anyway.
    let (tap, wire) = fake_tap(true);
    let backend = NetBackend::with_taps(vec![tap], &NetConfig::tap("fake0")).unwrap();
    assert_eq!(backend.features() & bit(VIRTIO_NET_F_GUEST_UFO), 0);
    assert_eq!(backend.features() & bit(VIRTIO_NET_F_HOST_UFO), 0);
    let rig = Rig::with_backend(backend, vec![wire], MODERN | guest, false);
    assert_eq!(
        *rig.tap(0).offloads.lock().unwrap(),
        [0, all & !libc::TUN_F_UFO]
    );
}

#[test]
fn offered_features() {
    let rig = Rig::default(MODERN, false);
    let features = rig.backend.features();
    for feature in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        29, // RING_EVENT_IDX
        28, // RING_INDIRECT_DESC
        30, // vhost-user PROTOCOL_FEATURES
    ] {
        assert_ne!(features & bit(feature), 0, "feature {feature}");
    }
    assert_eq!(features & bit(VIRTIO_NET_F_MQ), 0);
    assert_eq!(features & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(rig.backend.num_queues(), 2);
    assert_eq!(rig.backend.queues_per_thread(), vec![0b11]);
    assert_eq!(rig.backend.device_type(), 1);
    assert!(rig.backend.exit_event(0).is_some());
}

#[test]
fn config_space_is_complete_and_reads_honour_offset_and_size() {
    let config = NetConfig {
        mac: Some(MacAddress([0x00, 0x16, 0x3e, 0x10, 0x10, 0x10])),
        queue_pairs: 3,
        ..NetConfig::tap("fake0")
    };
    let rig = Rig::new(config, MODERN, false);
    let full = rig.backend.get_config(0, 24);
    let mut space = VirtioNetConfig::default();
    space.as_mut_slice().copy_from_slice(&full);
    assert_eq!(space.mac, [0x00, 0x16, 0x3e, 0x10, 0x10, 0x10]);
    assert_eq!(space.status.to_native(), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(space.max_virtqueue_pairs.to_native(), 3);
    assert_eq!(space.mtu.to_native(), 1500);
    assert_eq!(space.speed.to_native(), SPEED_UNKNOWN);
    assert_eq!(space.duplex, DUPLEX_UNKNOWN);
    assert_eq!(rig.backend.get_config(8, 2), vec![3, 0]);
    assert_eq!(rig.backend.get_config(6, 1), vec![1]);
    assert_eq!(
        rig.backend.get_config(22, 4),
        vec![0; 4],
        "past the end reads as zero"
    );
    assert_eq!(rig.backend.get_config(1000, 2), vec![0; 2]);
    assert!(rig.backend.set_config(0, &[1, 2, 3, 4, 5, 6]).is_err());
}

#[test]
fn unexpected_events_are_ignored_without_stopping_the_worker() {
    let mut rig = Rig::default(MODERN, false);
    let vrings = &rig.vrings[..];
    for (event, evset, thread) in [
        (0, EventSet::OUT, 0),
        (1, EventSet::HANG_UP, 0),
        (2, EventSet::IN, 0),
        (7, EventSet::IN, 0),
        (0, EventSet::IN, 9),
    ] {
        assert!(
            rig.backend
                .handle_event(event, evset, vrings, thread)
                .is_ok()
        );
    }
    let frame = frame(HEADER_LEN, 64, 1);
    rig.write(BUFFERS, &frame);
    rig.add_chain(1, &[readable(BUFFERS, frame.len() as u32)]);
    rig.kick(1);
    assert_eq!(rig.received(0), [frame]);
}

#[test]
fn a_vanished_tap_is_unwatched_instead_of_spinning() {
    let mut rig = Rig::default(MODERN, false);
    rig.add_chain(0, &[writable(BUFFERS, 2000)]);
    rig.kick(0);
    assert!(rig.listening(0));
    // Reads fail from now on, as on a TAP whose interface was deleted.
    let write_only = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    // SAFETY: both descriptors are open; the TAP's descriptor number now names /dev/null
    // opened write-only, which the socket object closes at the end like its own.
    let ret = unsafe { libc::dup2(write_only.as_raw_fd(), rig.tap(0).socket.as_raw_fd()) };
    assert!(ret >= 0);
    rig.tap_readable(0);
    assert!(!rig.listening(0));
    assert_eq!(rig.used_idx(0), 0);
}

#[test]
fn queues_that_are_not_ready_are_left_alone() {
    let mut rig = Rig::default(MODERN, false);
    rig.add_chain(0, &[writable(BUFFERS, 2000)]);
    rig.kick(0);
    assert!(rig.listening(0));
    rig.vrings[0].set_queue_ready(false);
    rig.send(0, &frame(HEADER_LEN, 64, 1));
    rig.tap_readable(0);
    assert!(!rig.listening(0), "a reset queue stops TAP reads");
    assert_eq!(rig.used_idx(0), 0);
}

#[test]
fn stop_vring_waits_for_the_batch_in_flight() {
    use std::sync::atomic::AtomicBool;
    let rig = Rig::pairs(2, MODERN, false);
    let stopped = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let batch = rig.backend.pairs[1].state.lock().unwrap();
        let stopper = scope.spawn(|| {
            rig.backend.stop_vring(3).unwrap();
            stopped.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !stopped.load(Ordering::SeqCst),
            "stop_vring returned mid-batch"
        );
        drop(batch);
        stopper.join().unwrap();
    });
    rig.backend.stop_vring(4).unwrap();
    rig.backend.stop_vring(99).unwrap();
}

/// Runs `test` on a thread moved into a network namespace of its own, so the TAP it creates
/// and every address it configures live and die there, away from the host's interfaces.
/// Returns why it was skipped, if it was.
fn in_private_network_namespace(test: impl FnOnce() + Send + 'static) -> Option<String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating a TAP and a network namespace needs root".into());
    }
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace; the thread ends with
        // the test, taking the namespace and its TAP with it.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Some(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        test();
        None
    })
    .join()
    .unwrap()
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?} failed");
}

fn wait_readable(fd: BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&raw mut poll, 1, 200) > 0 }
}

#[test]
fn a_real_tap_moves_frames_both_ways_in_a_private_namespace() {
    let skipped = in_private_network_namespace(|| {
        let mac = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let config = NetConfig {
            create_tap: true,
            mac: Some(mac),
            ..NetConfig::tap("hvtest0")
        };
        let backend = NetBackend::new(&config).unwrap();
        ip(&["link", "set", "hvtest0", "up"]);
        ip(&["addr", "add", "10.200.0.1/24", "dev", "hvtest0"]);
        let mut rig = Rig::with_backend(backend, Vec::new(), MODERN, false);

        // The guest asks who has 10.200.0.1; the namespace's stack must answer.
        let mut request = vec![0u8; HEADER_LEN];
        request.extend_from_slice(&[0xff; 6]);
        request.extend_from_slice(&mac.0);
        request.extend_from_slice(&[0x08, 0x06]);
        request.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        request.extend_from_slice(&mac.0);
        request.extend_from_slice(&[10, 200, 0, 2]);
        request.extend_from_slice(&[0; 6]);
        request.extend_from_slice(&[10, 200, 0, 1]);
        rig.write(BUFFERS, &request);
        rig.add_chain(1, &[readable(BUFFERS, request.len() as u32)]);

        let mut heads = std::collections::HashMap::new();
        for i in 0..8 {
            let addr = BUFFERS + 0x1000 * (1 + i);
            heads.insert(rig.add_chain(0, &[writable(addr, 2048)]), addr);
        }
        rig.kick(0);
        rig.kick(1);
        assert_eq!(rig.used_idx(1), 1);
        assert_eq!(rig.backend.stats().tx_frames.load(Ordering::Relaxed), 1);

        let mut seen = 0;
        for _ in 0..25 {
            if wait_readable(rig.backend.pairs[0].tap.as_fd()) {
                rig.tap_readable(0);
            }
            while seen < rig.used_idx(0) {
                let (head, len) = rig.used(0, seen);
                seen += 1;
                let frame = rig.bytes(heads[&(head as u16)], len as usize);
                let ethernet = &frame[HEADER_LEN..];
                let is_arp_reply = ethernet[12..14] == [0x08, 0x06]
                    && ethernet[20..22] == [0, 2]
                    && ethernet[28..32] == [10, 200, 0, 1];
                if is_arp_reply {
                    assert_eq!(ethernet[0..6], mac.0, "the reply is addressed to the guest");
                    assert_eq!(frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2], [1, 0]);
                    return;
                }
            }
        }
        panic!("no ARP reply reached the guest");
    });
    if let Some(reason) = skipped {
        eprintln!("skipped: {reason}");
    }
}

/// Two heads beyond the descriptor table ahead of a valid chain on each of TX, RX and the
/// control queue, each published with one kick: the bad heads are skipped and the valid chain
/// is served in the same kick, not the next one.
fn bad_heads_do_not_hold_back_the_batch(event_idx: bool) {
    let mq = MODERN | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    let mut rig = Rig::pairs(2, mq, event_idx);
    let bad = [QUEUE_SIZE, u16::MAX];

    let sent = frame(HEADER_LEN, 100, 7);
    rig.write(BUFFERS, &sent);
    publish_heads(rig.rings(1), QUEUE_SIZE, &bad);
    rig.add_chain(1, &[readable(BUFFERS, sent.len() as u32)]);
    rig.kick(1);
    assert_eq!(rig.received(0), vec![sent], "TX waits for another kick");
    assert_eq!(rig.used_idx(1), 1);

    let arriving = frame(HEADER_LEN, 100, 8);
    rig.send(0, &arriving);
    publish_heads(rig.rings(0), QUEUE_SIZE, &bad);
    rig.add_chain(0, &[writable(BUFFERS + 0x1000, 2000)]);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 1, "RX waits for another kick");
    assert_eq!(
        rig.bytes(BUFFERS + 0x1000, arriving.len()),
        with_num_buffers(arriving, 1)
    );

    let ctrl = rig.vrings.len() - 1;
    publish_heads(rig.rings(ctrl), QUEUE_SIZE, &bad);
    let pairs_set = (
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    assert_eq!(
        control(&mut rig, pairs_set.0, pairs_set.1, &1u16.to_le_bytes()),
        (1, VIRTIO_NET_OK as u8),
        "the control command waits for another kick"
    );
    assert_eq!(rig.backend.stats().rx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_without_event_idx() {
    bad_heads_do_not_hold_back_the_batch(false);
}

#[test]
fn bad_heads_do_not_hold_back_the_batch_with_event_idx() {
    bad_heads_do_not_hold_back_the_batch(true);
}

/// Issue 12, item 13: frames wait on the TAP while the driver moves the RX avail index a ring
/// and 8 entries past the used index. The worker returns (it used to spin at full CPU, holding
/// the pair's lock), the RX queue is stopped and reported once, TX goes on, and no frame is
/// lost: once the transport restarts the queue, the waiting frames are delivered in order.
fn a_broken_rx_ring_stops_rx_alone(event_idx: bool) {
    let mut rig = Rig::default(MODERN, event_idx);
    let recorder = FaultRecorder::default();
    rig.backend.set_fault_handler(recorder.handler());
    rig.add_chain(0, &[writable(BUFFERS, 2000)]);
    rig.send(0, &frame(HEADER_LEN, 100, 1));
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 1);
    assert!(rig.listening(0));

    let waiting: Vec<Vec<u8>> = (2..5).map(|seed| frame(HEADER_LEN, 100, seed)).collect();
    for frame in &waiting {
        rig.send(0, frame);
    }
    set_avail_idx(rig.rings(0), 1 + QUEUE_SIZE + 8);
    rig.event_within_bound(0, rig.backend.tap_readable_event());
    rig.kick_within_bound(0);
    let fault = QueueFault {
        queue: 0,
        fault: RingFault::AvailIndexBeyondRing {
            avail_idx: 1 + QUEUE_SIZE + 8,
            next_avail: 1,
            size: QUEUE_SIZE,
        },
    };
    assert_eq!(recorder.faults(), vec![fault], "reported once");
    assert!(
        !queue_is_live(&rig.vrings[0]),
        "the RX queue was not stopped"
    );
    assert!(
        !rig.listening(0),
        "the TAP is still watched for a stopped queue"
    );
    assert_eq!(rig.used_idx(0), 1);

    let sent = frame(HEADER_LEN, 60, 9);
    rig.write(BUFFERS + 0x4000, &sent);
    rig.add_chain(1, &[readable(BUFFERS + 0x4000, sent.len() as u32)]);
    rig.kick(1);
    assert_eq!(rig.received(0), vec![sent], "TX stopped with RX");

    // The driver repairs its ring and the transport starts the queue again.
    set_avail_idx(rig.rings(0), 1);
    for i in 0..3 {
        rig.add_chain(0, &[writable(BUFFERS + 0x1000 * (i + 1), 2000)]);
    }
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 1, "a stopped queue was served");
    rig.vrings[0].set_queue_ready(true);
    rig.kick(0);
    assert_eq!(rig.used_idx(0), 4);
    for (i, frame) in waiting.into_iter().enumerate() {
        let len = frame.len();
        assert_eq!(rig.used(0, 1 + i as u16).1, len as u32);
        assert_eq!(
            rig.bytes(BUFFERS + 0x1000 * (i as u64 + 1), len),
            with_num_buffers(frame, 1)
        );
    }
    assert_eq!(recorder.faults().len(), 1);
}

#[test]
fn a_broken_rx_ring_stops_rx_alone_without_event_idx() {
    a_broken_rx_ring_stops_rx_alone(false);
}

#[test]
fn a_broken_rx_ring_stops_rx_alone_with_event_idx() {
    a_broken_rx_ring_stops_rx_alone(true);
}

/// The same jump on the TX and control rings: each worker returns and each queue is reported.
#[test]
fn broken_tx_and_control_rings_stop_their_queues() {
    let mq = MODERN | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    let rig = Rig::pairs(2, mq, true);
    let recorder = FaultRecorder::default();
    rig.backend.set_fault_handler(recorder.handler());
    let ctrl = rig.vrings.len() - 1;
    for queue in [1, ctrl] {
        set_avail_idx(rig.rings(queue), QUEUE_SIZE + 8);
        rig.kick_within_bound(queue);
        assert!(!queue_is_live(&rig.vrings[queue]), "queue {queue}");
    }
    let reported: Vec<u16> = recorder.faults().iter().map(|fault| fault.queue).collect();
    assert_eq!(reported, [1, ctrl as u16]);
    assert!(queue_is_live(&rig.vrings[0]) && queue_is_live(&rig.vrings[3]));
}
