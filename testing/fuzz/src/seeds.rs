//! Curated seed inputs: one well-formed example of each thing a target's input can say, so
//! the fuzzer starts from requests the code under test takes rather than from noise.
//! `fuzz-seeds DIR` writes them as the starting corpora; the regression tests replay them.

use crate::devices::device_input;
use crate::guest::{ImageBuilder, readable, writable};
use crate::{mmio, vhost_user};
use virtio_guest_driver::blk;

const ALL_FEATURES: u64 = u64::MAX;
const EVENT_IDX: u8 = 1;
const READONLY: u8 = 2;

/// The seeds of target `name` (empty for an unknown name).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "blk" => blk(),
        "net" => net(),
        "console" => console(),
        "rng" => rng(),
        "mmio" => mmio(),
        "virtio_cfg" => virtio_cfg(),
        "handoff" => handoff(),
        "vhost_user" => vhost_user(),
        _ => Vec::new(),
    }
}

/// Both notification modes of one memory image.
fn both_modes(host_data: &[u8], image: &[u8], extra_options: u8) -> Vec<Vec<u8>> {
    [0, EVENT_IDX]
        .iter()
        .map(|mode| device_input(mode | extra_options, ALL_FEATURES, host_data, image))
        .collect()
}

fn blk() -> Vec<Vec<u8>> {
    let (header, data, status) = (0x1000, 0x1100, 0x1f00);
    let request = |kind: u32, body: &[crate::guest::SeedBuffer], payload: &[u8]| {
        let mut buffers = vec![readable(header, 16)];
        buffers.extend_from_slice(body);
        buffers.push(writable(status, 1));
        ImageBuilder::default()
            .data(header, &blk::header(kind, 1))
            .data(data, payload)
            .chain(0, &buffers)
            .build()
    };
    let mut segment = 2u64.to_le_bytes().to_vec(); // sector
    segment.extend_from_slice(&4u32.to_le_bytes()); // sectors
    segment.extend_from_slice(&0u32.to_le_bytes()); // flags
    let images = [
        request(0, &[writable(data, 512)], &[]),
        request(0, &[writable(data, 100), writable(data + 0x200, 412)], &[]),
        request(1, &[readable(data, 512)], &[0x5a; 512]),
        request(4, &[], &[]),
        request(8, &[writable(data, 20)], &[]),
        request(11, &[readable(data, 16)], &segment),
        request(13, &[readable(data, 16)], &segment),
        // Two requests in one kick.
        ImageBuilder::default()
            .data(header, &blk::header(0, 0))
            .chain(
                0,
                &[
                    readable(header, 16),
                    writable(data, 512),
                    writable(status, 1),
                ],
            )
            .chain(
                0,
                &[
                    readable(header, 16),
                    writable(data + 0x400, 512),
                    writable(status + 1, 1),
                ],
            )
            .build(),
    ];
    let mut seeds: Vec<Vec<u8>> = images
        .iter()
        .flat_map(|image| both_modes(&[], image, 0))
        .collect();
    seeds.extend(both_modes(&[], &images[2], READONLY));
    seeds
}

fn rng() -> Vec<Vec<u8>> {
    let images = [
        ImageBuilder::default()
            .chain(0, &[writable(0x1000, 64)])
            .build(),
        ImageBuilder::default()
            .chain(0, &[writable(0x1000, 10), writable(0x1100, 30)])
            .chain(0, &[writable(0x1200, 8)])
            .build(),
        ImageBuilder::default()
            .chain(0, &[readable(0x1000, 64)])
            .build(),
    ];
    images
        .iter()
        .flat_map(|image| both_modes(&[], image, 0))
        .collect()
}

fn console() -> Vec<Vec<u8>> {
    let (receiveq, transmitq) = (0, 1);
    let images = [
        ImageBuilder::default()
            .data(0x1000, b"hello from the guest\n")
            .chain(transmitq, &[readable(0x1000, 21)])
            .chain(receiveq, &[writable(0x1100, 64)])
            .build(),
        ImageBuilder::default()
            .chain(receiveq, &[writable(0x1100, 4), writable(0x1200, 60)])
            .chain(receiveq, &[writable(0x1300, 64)])
            .build(),
    ];
    images
        .iter()
        .flat_map(|image| both_modes(b"input from the host", image, 0))
        .collect()
}

/// A frame as the host data carries it: a 2-byte length, then the frame.
fn framed(frame: &[u8]) -> Vec<u8> {
    let mut bytes = (frame.len() as u16).to_le_bytes().to_vec();
    bytes.extend_from_slice(frame);
    bytes
}

fn net() -> Vec<Vec<u8>> {
    let (rx, tx, ctrl) = (0, 1, 2);
    // virtio_net_hdr_v1 (12 bytes) and a minimal Ethernet frame.
    let mut packet = vec![0u8; 12];
    packet.extend_from_slice(&[0xff; 6]);
    packet.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00]);
    packet.extend_from_slice(&[0x45; 46]);
    let host_frame = framed(&packet);
    let images = [
        ImageBuilder::default()
            .data(0x1000, &packet)
            .chain(tx, &[readable(0x1000, packet.len() as u32)])
            .chain(rx, &[writable(0x2000, 1526)])
            .build(),
        ImageBuilder::default()
            .data(0x1000, &packet)
            .chain(tx, &[readable(0x1000, 12), readable(0x1100, 60)])
            .chain(rx, &[writable(0x2000, 12), writable(0x2100, 100)])
            .chain(rx, &[writable(0x2800, 64)])
            .build(),
        // Control queue: VIRTIO_NET_CTRL_RX / PROMISC on, then an ack byte.
        ImageBuilder::default()
            .data(0x1000, &[0, 0, 1])
            .chain(
                ctrl,
                &[
                    readable(0x1000, 2),
                    readable(0x1002, 1),
                    writable(0x1010, 1),
                ],
            )
            .build(),
    ];
    let mut host_data = host_frame.clone();
    host_data.extend_from_slice(&host_frame);
    images
        .iter()
        .flat_map(|image| both_modes(&host_data, image, 0))
        .collect()
}

/// A driver bringing up queue 0 of the device in `window` over the rings of
/// [`crate::guest`]'s queue 0, then kicking it.
fn bring_up(window: u8) -> Vec<u8> {
    use hvisor_transport::mmio::reg;
    let write = |offset: u64, value: u64| mmio::encode(0, true, window, 4, offset as u16, value);
    let read = |offset: u64| mmio::encode(1, false, window, 4, offset as u16, 0);
    [
        read(reg::MAGIC_VALUE),
        read(reg::VERSION),
        read(reg::DEVICE_ID),
        write(reg::STATUS, 1),
        write(reg::STATUS, 3),
        write(reg::DEVICE_FEATURES_SEL, 1),
        read(reg::DEVICE_FEATURES),
        write(reg::DRIVER_FEATURES_SEL, 1),
        write(reg::DRIVER_FEATURES, 1),
        write(reg::STATUS, 11),
        read(reg::STATUS),
        write(reg::QUEUE_SEL, 0),
        read(reg::QUEUE_NUM_MAX),
        write(reg::QUEUE_NUM, 8),
        write(reg::QUEUE_DESC_LOW, 0),
        write(reg::QUEUE_AVAIL_LOW, 0x80),
        write(reg::QUEUE_USED_LOW, 0x100),
        write(reg::QUEUE_READY, 1),
        write(reg::STATUS, 15),
        mmio::encode(2, true, window, 4, reg::QUEUE_NOTIFY as u16, 0),
        read(reg::INTERRUPT_STATUS),
        write(reg::INTERRUPT_ACK, 1),
        read(reg::CONFIG),
        mmio::encode(1, false, window, 1, reg::CONFIG as u16 + 1, 0),
    ]
    .concat()
}

fn with_image(image: &[u8], requests: &[u8]) -> Vec<u8> {
    let mut input = (image.len() as u16).to_le_bytes().to_vec();
    input.extend_from_slice(image);
    input.extend_from_slice(requests);
    input
}

fn mmio() -> Vec<Vec<u8>> {
    let rng_image = ImageBuilder::default()
        .chain(0, &[writable(0x1000, 64)])
        .build();
    let blk_image = ImageBuilder::default()
        .data(0x1000, &blk::header(0, 0))
        .chain(
            0,
            &[
                readable(0x1000, 16),
                writable(0x1100, 512),
                writable(0x1f00, 1),
            ],
        )
        .build();
    let console_image = ImageBuilder::default()
        .data(0x1000, b"console output\n")
        .chain(1, &[readable(0x1000, 15)])
        .build();
    let strays = [
        mmio::encode(40, false, 0, 4, 0, 0),
        mmio::encode(0, false, 3, 4, 0, 0),
        mmio::encode(0, true, 4, 4, 0x70, 0),
        mmio::encode(0, false, 0, 3, 0, 0),
        mmio::encode(0, true, 0, 2, 0x70, 1),
    ]
    .concat();
    vec![
        with_image(&rng_image, &bring_up(0)),
        with_image(&blk_image, &bring_up(1)),
        with_image(&console_image, &bring_up(2)),
        with_image(&[], &strays),
    ]
}

fn virtio_cfg() -> Vec<Vec<u8>> {
    let device = |body: &str| {
        format!(
            r#"{{"zones": [{{"id": 1, "memory_region": [{{"zone0_ipa": "0x50000000",
            "zonex_ipa": "0x50000000", "size": "0x1000000"}}], "devices": [{{"status": "enable",
            "addr": "0xa003c00", "len": "0x200", "irq": 78, {body}}}]}}]}}"#
        )
        .into_bytes()
    };
    vec![
        device(r#""type": "blk", "img": "disk.img", "readonly": true, "serial": "disk0""#),
        device(
            r#""type": "net", "tap": "tap0", "mac": ["0x00", "0x16", "0x3e", "0x10", "0x10", "0x10"]"#,
        ),
        device(r#""type": "console", "socket": "/tmp/console.sock""#),
        device(r#""type": "rng", "rate_limit": 1048576"#),
        br#"{"zones": [{"id": 1, "memory_region": [{"zone0_ipa": "0x0", "zonex_ipa": "0x0",
            "size": "0x1000"}, {"zone0_ipa": "0x2000", "zonex_ipa": "0x2000", "size": "0x1000"}],
            "devices": [{"status": "disable", "type": "gpu"}]},
            {"id": 2, "memory_region": [{"zone0_ipa": "0x10000", "zonex_ipa": "0x0",
            "size": "0x1000"}], "devices": []}]}"#
            .to_vec(),
    ]
}

fn handoff() -> Vec<Vec<u8>> {
    let hello = |windows: &str| {
        format!(
            r#"{{"protocol": "hvisor-vhost-handoff", "version": 1, "bridge_fd": 0,
            "wakeup_fd": 1, "windows": [{windows}]}}"#
        )
        .into_bytes()
    };
    vec![
        hello(r#"{"zone": 1, "zone0_ipa": 32768, "size": 16384, "fd": 2, "offset": 4096}"#),
        hello(
            r#"{"zone": 1, "zone0_ipa": 32768, "size": 16384, "fd": 2},
               {"zone": 2, "zone0_ipa": 0, "size": 4096, "fd": 2, "offset": 61440}"#,
        ),
        hello(r#"{"zone": 1, "zone0_ipa": 32768, "size": 16384, "fd": 4}"#),
        hello(r#"{"zone": 1, "zone0_ipa": 32768, "size": 16384, "fd": 3}"#),
    ]
}

fn u32s(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|word| word.to_le_bytes()).collect()
}

fn u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|word| word.to_le_bytes()).collect()
}

fn vhost_user() -> Vec<Vec<u8>> {
    const NEED_REPLY: u32 = 0x8;
    let message = |request: u32, fds: u8, payload: &[u8]| {
        vhost_user::encode(request, 1 | NEED_REPLY, fds, payload)
    };
    let eventfd = 4 | 1;
    // Guest RAM at 0, mapped by the frontend at 0x7f00_0000_0000.
    let base = 0x7f00_0000_0000u64;
    let mut memory_table = u32s(&[1, 0]);
    memory_table.extend(u64s(&[0, 0x1_0000, base, 0]));
    let mut ring_addresses = u32s(&[0, 0]);
    ring_addresses.extend(u64s(&[base, base + 0x100, base + 0x80, 0]));
    let set_up = [
        message(1, 0, &[]),                                             // GET_FEATURES
        message(3, 0, &[]),                                             // SET_OWNER
        message(15, 0, &[]),                                            // GET_PROTOCOL_FEATURES
        message(16, 0, &u64s(&[0x1 | 0x8 | 0x200 | 0x8000 | 0x20000])), // SET_PROTOCOL_FEATURES
        message(2, 0, &u64s(&[1 << 32 | 1 << 30 | 1 << 29])),           // SET_FEATURES
        message(5, 1, &memory_table),                                   // SET_MEM_TABLE
        message(8, 0, &u32s(&[0, 8])),                                  // SET_VRING_NUM
        message(9, 0, &ring_addresses),                                 // SET_VRING_ADDR
        message(10, 0, &u32s(&[0, 0])),                                 // SET_VRING_BASE
        message(13, eventfd, &u64s(&[0])),                              // SET_VRING_CALL
        message(12, eventfd, &u64s(&[0])),                              // SET_VRING_KICK
        message(18, 0, &u32s(&[0, 1])),                                 // SET_VRING_ENABLE
    ]
    .concat();
    // GET_CONFIG: offset, size, flags, then the bytes.
    let mut config = u32s(&[0, 60, 0]);
    config.extend_from_slice(&[0; 60]);
    // GET_INFLIGHT_FD: mmap size and offset, queues, queue size, padding.
    let mut inflight = u64s(&[0, 0]);
    inflight.extend_from_slice(&[1, 0, 8, 0, 0, 0, 0, 0]);
    let tail = [
        message(24, 0, &config),
        message(31, 0, &inflight),
        message(11, 0, &u32s(&[0, 0])), // GET_VRING_BASE
    ]
    .concat();
    let image = ImageBuilder::default()
        .data(0x1000, &blk::header(0, 0))
        .chain(
            0,
            &[
                readable(0x1000, 16),
                writable(0x1100, 512),
                writable(0x1f00, 1),
            ],
        )
        .build();
    let mut full = set_up.clone();
    full.extend_from_slice(&tail);
    vec![
        with_image(&[], &set_up),
        with_image(&image, &full),
        with_image(
            &[],
            &[
                message(8, 0, &u32s(&[0, 3])),
                message(16, 0, &u64s(&[u64::MAX])),
            ]
            .concat(),
        ),
    ]
}
