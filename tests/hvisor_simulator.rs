//! The hvisor transport end to end, in one process: the simulator plays hvisor and a zone's
//! guest, the daemon's request loop serves it over the hand-off socket. Covers the
//! virtio-mmio register file against the C daemon's known gaps (docs/hvisor-abi.md section 8),
//! the answering rule of the request ring (3.3, 3.4), interrupt delivery (3.5) and shutdown.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hvisor_sim::guest::{BlkGuest, MmioGuest};
use hvisor_transport::abi::{DeviceReq, DeviceRes};
use hvisor_transport::counters::Reason;
use hvisor_transport::mmio::reg;
use hvisor_transport::ring::HypervisorSide;
use support::hvisor::*;
use virtio_guest_driver::blk::{Payload, RequestBuffers};
use virtio_guest_driver::{Buffer, DriverQueue, QueueLayout, blk};
use vm_memory::{Address, Bytes, GuestAddress};

const ZONE: u32 = 1;
const BLK: BlkSpec = BlkSpec {
    zone: ZONE,
    addr: 0xa00_3c00,
    irq: 78,
};
const BLK_B: BlkSpec = BlkSpec {
    zone: ZONE,
    addr: 0xa00_3e00,
    irq: 79,
};
/// Same window and irq as [`BLK`] in another zone: only the zone tells them apart.
const BLK_ZONE2: BlkSpec = BlkSpec { zone: 2, ..BLK };

const MAGIC: u32 = 0x7472_6976;
const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// vhost-user's feature bit, which a virtio-mmio driver must never see.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const NEGOTIATED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
const DESC_F_NEXT: u16 = 1;

fn write_driver_features(mmio: &MmioGuest, features: u64) -> TestResult {
    mmio.write(reg::DRIVER_FEATURES_SEL, 0)?;
    mmio.write(reg::DRIVER_FEATURES, features as u32)?;
    mmio.write(reg::DRIVER_FEATURES_SEL, 1)?;
    mmio.write(reg::DRIVER_FEATURES, (features >> 32) as u32)?;
    Ok(())
}

fn driver_features(mmio: &MmioGuest) -> TestResult<u64> {
    mmio.write(reg::DRIVER_FEATURES_SEL, 0)?;
    let low = mmio.read(reg::DRIVER_FEATURES)?;
    mmio.write(reg::DRIVER_FEATURES_SEL, 1)?;
    let high = mmio.read(reg::DRIVER_FEATURES)?;
    Ok(u64::from(high) << 32 | u64::from(low))
}

/// Reset, ACKNOWLEDGE, DRIVER: where feature negotiation starts.
fn begin_initialization(mmio: &MmioGuest) -> TestResult {
    mmio.write(reg::STATUS, 0)?;
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE)?;
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
    Ok(())
}

/// Offers `features` and sets FEATURES_OK; returns the Status read back.
fn offer_features(mmio: &MmioGuest, features: u64) -> TestResult<u32> {
    write_driver_features(mmio, features)?;
    mmio.write(
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    )?;
    Ok(mmio.read(reg::STATUS)?)
}

/// Brings the device to FEATURES_OK with [`NEGOTIATED`].
fn negotiate(mmio: &MmioGuest) -> TestResult {
    begin_initialization(mmio)?;
    let status = offer_features(mmio, NEGOTIATED)?;
    assert_ne!(status & STATUS_FEATURES_OK, 0, "features refused");
    Ok(())
}

/// Ring addresses of a queue of `size` entries at `at`, laid out as the driver lays them out.
fn ring_addresses(at: u64, size: u16) -> [u64; 3] {
    let layout = QueueLayout::new(size, GuestAddress(at));
    [layout.desc.0, layout.avail.0, layout.used.0]
}

const RING_ADDRESS_REGISTERS: [u64; 3] = [
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_AVAIL_LOW,
    reg::QUEUE_USED_LOW,
];

fn write_rings(mmio: &MmioGuest, [desc, avail, used]: [u64; 3]) -> TestResult {
    for (low, address) in RING_ADDRESS_REGISTERS.into_iter().zip([desc, avail, used]) {
        mmio.write(low, address as u32)?;
        mmio.write(low + 4, (address >> 32) as u32)?;
    }
    Ok(())
}

/// QueueNum, QueueReady and the six address halves of the selected queue.
fn queue_registers(mmio: &MmioGuest) -> TestResult<Vec<u32>> {
    let mut offsets = vec![reg::QUEUE_NUM, reg::QUEUE_READY];
    for low in RING_ADDRESS_REGISTERS {
        offsets.extend([low, low + 4]);
    }
    offsets
        .into_iter()
        .map(|offset| Ok(mmio.read(offset)?))
        .collect()
}

#[test]
fn probe_initialization_and_blk_io() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let mmio = rig.mmio(BLK, 0);
    assert_eq!(mmio.read(reg::MAGIC_VALUE)?, MAGIC);
    assert_eq!(mmio.read(reg::VERSION)?, 2);
    assert_eq!(mmio.read(reg::DEVICE_ID)?, blk::DEVICE_ID);
    assert_eq!(mmio.read(reg::VENDOR_ID)?, 0x4856_4953);

    mmio.write(reg::STATUS, 0)?;
    assert_eq!(mmio.read(reg::STATUS)?, 0);
    for status in [STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER] {
        mmio.write(reg::STATUS, status)?;
        assert_eq!(mmio.read(reg::STATUS)?, status);
    }
    let offered = mmio.device_features()?;
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0, "offered {offered:#x}");
    assert_ne!(offered & VIRTIO_BLK_F_FLUSH, 0, "offered {offered:#x}");
    assert_eq!(
        offered & VHOST_USER_F_PROTOCOL_FEATURES,
        0,
        "vhost-user's PROTOCOL_FEATURES offered to a virtio-mmio driver: {offered:#x}"
    );
    assert_eq!(
        offered & VIRTIO_F_ACCESS_PLATFORM,
        0,
        "offered {offered:#x}"
    );
    write_driver_features(&mmio, NEGOTIATED)?;
    assert_eq!(driver_features(&mmio)?, NEGOTIATED);
    let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    mmio.write(reg::STATUS, features_ok)?;
    assert_eq!(mmio.read(reg::STATUS)?, features_ok);

    mmio.write(reg::QUEUE_SEL, 1)?;
    assert_eq!(mmio.read(reg::QUEUE_NUM_MAX)?, 0, "blk has one queue");
    mmio.write(reg::QUEUE_SEL, 0)?;
    assert_eq!(mmio.read(reg::QUEUE_NUM_MAX)?, 512);
    let queue = mmio.setup_queue(0, 256, area(0))?;
    assert_eq!(mmio.read(reg::QUEUE_NUM)?, 256);
    for (low, address) in RING_ADDRESS_REGISTERS.into_iter().zip([
        queue.layout.desc,
        queue.layout.avail,
        queue.layout.used,
    ]) {
        assert_eq!(mmio.read(low)?, address.0 as u32);
        assert_eq!(mmio.read(low + 4)?, (address.0 >> 32) as u32);
    }
    mmio.write(reg::STATUS, features_ok | STATUS_DRIVER_OK)?;
    assert_eq!(mmio.read(reg::STATUS)?, features_ok | STATUS_DRIVER_OK);

    // A write, its interrupt taken the way Linux's handler takes it.
    let mut driver = PolledBlk::new(mmio, queue, memory);
    let data = pattern(1, 8192);
    let head = driver.post(BLK_T_OUT, 16, Payload::Out(&data))?;
    let interrupt = rig
        .sim
        .wait_interrupt(TIMEOUT)
        .ok_or("no interrupt for the write")?;
    let configured = DeviceRes {
        target_zone: BLK.zone,
        irq_id: BLK.irq,
    };
    assert_eq!(interrupt, configured);
    assert_eq!(driver.mmio.read(reg::INTERRUPT_STATUS)? & 1, 1);
    driver.mmio.write(reg::INTERRUPT_ACK, 1)?;
    assert_eq!(driver.mmio.read(reg::INTERRUPT_STATUS)?, 0);
    assert_eq!(driver.wait_used(head)?, 1, "used length: the status byte");
    assert_eq!(memory.read_obj::<u8>(driver.buffers.status)?, BLK_S_OK);
    let (status, back) = driver.read(16, 8192)?;
    assert_eq!(status, BLK_S_OK);
    assert!(back == data, "data read back differs");
    assert!(image_bytes(&rig.images[0], 16, 8192) == data);
    wait_until("the read's interrupt", || {
        Ok(!rig.sim.take_interrupts().is_empty())
    })?;

    // The library's driver (EVENT_IDX, interrupt driven) after a re-initialization.
    let mut guest = BlkGuest::start(&rig.sim, ZONE, BLK.addr, area(1), 64, 4096)?;
    let data = pattern(2, 4096);
    assert_eq!(guest.write(64, &data)?, blk::S_OK);
    let (status, back) = guest.read(64, 4096)?;
    assert_eq!(status, blk::S_OK);
    assert!(back == data, "data read back differs");
    assert!(image_bytes(&rig.images[0], 64, 4096) == data);
    for interrupt in rig.sim.take_interrupts() {
        assert_eq!(interrupt, configured);
    }
    Ok(rig.stop()?)
}

#[test]
fn driver_features_are_assigned_per_word_cleared_on_reset_and_checked() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let mmio = rig.mmio(BLK, 0);
    let offered = mmio.device_features()?;

    begin_initialization(&mmio)?;
    mmio.write(reg::DRIVER_FEATURES_SEL, 0)?;
    mmio.write(reg::DRIVER_FEATURES, 0x206)?;
    mmio.write(reg::DRIVER_FEATURES, 0x200)?;
    // hvisor-tool ORs the words together and would read back 0x206.
    assert_eq!(mmio.read(reg::DRIVER_FEATURES)?, 0x200);
    mmio.write(reg::DRIVER_FEATURES_SEL, 1)?;
    mmio.write(reg::DRIVER_FEATURES, 1)?;
    assert_eq!(driver_features(&mmio)?, NEGOTIATED);
    mmio.write(reg::STATUS, 0)?;
    assert_eq!(driver_features(&mmio)?, 0, "features survived a reset");

    let not_offered = (0..32)
        .map(|bit| 1u64 << bit)
        .find(|&bit| offered & bit == 0 && bit != VHOST_USER_F_PROTOCOL_FEATURES)
        .ok_or("every low feature bit is offered")?;
    for (features, what) in [
        (
            NEGOTIATED | VHOST_USER_F_PROTOCOL_FEATURES,
            "vhost-user's PROTOCOL_FEATURES",
        ),
        (NEGOTIATED | not_offered, "a feature not offered"),
        (VIRTIO_BLK_F_FLUSH, "no VERSION_1"),
    ] {
        begin_initialization(&mmio)?;
        let status = offer_features(&mmio, features)?;
        assert_eq!(
            status,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            "FEATURES_OK stuck with {what} ({features:#x})"
        );
    }
    // The driver may correct itself after a refusal...
    let status = offer_features(&mmio, NEGOTIATED)?;
    assert_ne!(status & STATUS_FEATURES_OK, 0);
    // ...but not change its mind once FEATURES_OK stuck.
    mmio.write(reg::DRIVER_FEATURES_SEL, 0)?;
    mmio.write(reg::DRIVER_FEATURES, 0)?;
    assert_eq!(driver_features(&mmio)?, NEGOTIATED);

    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 0, 3)?;
    Ok(rig.stop()?)
}

#[test]
fn queue_setup_is_validated() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let mmio = rig.mmio(BLK, 0);
    negotiate(&mmio)?;
    mmio.write(reg::QUEUE_SEL, 0)?;
    let rings = ring_addresses(area(0).0, 512);
    for num in [100, 1024, 0, 3] {
        mmio.write(reg::QUEUE_NUM, num)?;
        write_rings(&mmio, rings)?;
        mmio.write(reg::QUEUE_READY, 1)?;
        assert_eq!(
            mmio.read(reg::QUEUE_READY)?,
            0,
            "QueueReady with QueueNum {num}"
        );
    }

    mmio.write(reg::QUEUE_NUM, 16)?;
    let ram_end = RAM_BASE + RAM_SIZE;
    for (rings, what) in [
        (ring_addresses(0x1000_0000, 16), "below zone RAM"),
        (
            ring_addresses(0x1_0000_0000 + RAM_BASE, 16),
            "above 4 GiB (only the high half is wrong)",
        ),
        (
            [area(0).0, area(0).0 + 0x1000, ram_end - 0x40],
            "a used ring running past the end of zone RAM",
        ),
        (
            [area(0).0 + 8, area(0).0 + 0x1000, area(0).0 + 0x2000],
            "a misaligned descriptor table",
        ),
    ] {
        write_rings(&mmio, rings)?;
        mmio.write(reg::QUEUE_READY, 1)?;
        assert_eq!(mmio.read(reg::QUEUE_READY)?, 0, "QueueReady with {what}");
    }

    write_rings(&mmio, ring_addresses(area(0).0, 16))?;
    mmio.write(reg::QUEUE_READY, 1)?;
    assert_eq!(mmio.read(reg::QUEUE_READY)?, 1, "a valid queue refused");
    mmio.write(reg::QUEUE_NUM, 32)?;
    assert_eq!(
        mmio.read(reg::QUEUE_NUM)?,
        16,
        "QueueNum changed under a ready queue"
    );
    mmio.write(reg::QUEUE_READY, 0)?;
    assert_eq!(mmio.read(reg::QUEUE_READY)?, 0);

    // hvisor-tool ORs the halves into the stored address: LOW 0x12345000, HIGH 1, LOW
    // 0x6000 would read back 0x12347000 in the low half.
    for low in RING_ADDRESS_REGISTERS {
        mmio.write(low, 0x1234_5000)?;
        mmio.write(low + 4, 1)?;
        mmio.write(low, 0x6000)?;
        assert_eq!(mmio.read(low)?, 0x6000, "low half of {low:#x}");
        assert_eq!(mmio.read(low + 4)?, 1, "high half of {low:#x}");
        mmio.write(low + 4, 0)?;
        assert_eq!(mmio.read(low + 4)?, 0, "high half of {low:#x}");
    }

    write_rings(&mmio, ring_addresses(area(0).0, 16))?;
    let queue0 = queue_registers(&mmio)?;
    for select in [1, 7, u32::MAX] {
        mmio.write(reg::QUEUE_SEL, select)?;
        assert_eq!(mmio.read(reg::QUEUE_SEL)?, select);
        mmio.write(reg::QUEUE_NUM, 8)?;
        write_rings(&mmio, ring_addresses(area(1).0, 8))?;
        mmio.write(reg::QUEUE_READY, 1)?;
        mmio.write(reg::QUEUE_NOTIFY, select)?;
        assert_eq!(mmio.read(reg::QUEUE_NUM_MAX)?, 0, "QueueSel {select}");
        assert_eq!(
            queue_registers(&mmio)?,
            vec![0; 8],
            "queue registers with QueueSel {select}"
        );
    }
    mmio.write(reg::QUEUE_SEL, 0)?;
    assert_eq!(
        queue_registers(&mmio)?,
        queue0,
        "queue 0 changed by writes with QueueSel out of range"
    );

    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(2), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 8, 4)?;
    Ok(rig.stop()?)
}

#[test]
fn malformed_register_accesses_are_answered_and_harmless() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let mmio = rig.mmio(BLK, 0);
    negotiate(&mmio)?;
    let status = mmio.read(reg::STATUS)?;

    // Registers are aligned 4-byte words: anything else reads 0.
    for (offset, size) in [
        (reg::MAGIC_VALUE, 1),
        (reg::MAGIC_VALUE, 2),
        (reg::MAGIC_VALUE + 1, 1),
        (reg::MAGIC_VALUE + 2, 4),
        (reg::MAGIC_VALUE, 8),
        (reg::MAGIC_VALUE, 3),
        (reg::MAGIC_VALUE, 0),
        (reg::MAGIC_VALUE, 16),
    ] {
        assert_eq!(
            mmio.read_sized(offset, size)?,
            0,
            "{size}-byte read at {offset:#x}"
        );
    }
    // Write-only registers, and legacy ones (GuestPageSize, QueuePFN) that do not exist.
    for offset in [reg::QUEUE_NOTIFY, reg::INTERRUPT_ACK, 0x028, 0x040] {
        assert_eq!(mmio.read(offset)?, 0, "read of {offset:#x}");
    }
    for offset in [
        reg::MAGIC_VALUE,
        reg::VERSION,
        reg::DEVICE_ID,
        reg::VENDOR_ID,
        reg::DEVICE_FEATURES,
        reg::QUEUE_NUM_MAX,
        reg::INTERRUPT_STATUS,
        reg::CONFIG_GENERATION,
    ] {
        let before = mmio.read(offset)?;
        mmio.write(offset, 0xdead_beef)?;
        assert_eq!(mmio.read(offset)?, before, "read-only {offset:#x} written");
    }
    // A reset through a malformed Status write would show as Status 0.
    for size in [1, 2, 3, 8, 0, 16] {
        mmio.write_sized(reg::STATUS, size, 0)?;
    }
    mmio.write_sized(reg::STATUS + 2, 4, 0)?;
    assert_eq!(mmio.read(reg::STATUS)?, status, "a malformed write reset");

    // Config space: read the struct in 8-byte pieces, then check every narrower read
    // against it. hvisor-tool returns 8 bytes whatever the size.
    let mut config = Vec::new();
    for piece in 0..8 {
        config.extend(mmio.read_sized(reg::CONFIG + 8 * piece, 8)?.to_le_bytes());
    }
    let field = |offset: usize, size: usize| {
        let mut bytes = [0u8; 8];
        bytes[..size].copy_from_slice(&config[offset..offset + size]);
        u64::from_le_bytes(bytes)
    };
    assert_eq!(field(0x00, 8), IMAGE_SIZE / SECTOR, "capacity");
    assert_eq!(field(0x14, 4), 512, "blk_size");
    assert_eq!(field(0x20, 1), 1, "writeback");
    assert_eq!(field(0x22, 2), 1, "num_queues");
    for size in [1usize, 2, 4, 8] {
        for offset in 0..=config.len() - size {
            assert_eq!(
                mmio.read_sized(reg::CONFIG + offset as u64, size as u8)?,
                field(offset, size),
                "{size}-byte config read at {offset:#x}"
            );
        }
    }
    // Past the end of the struct, including accesses that straddle it or the window's end.
    assert_eq!(mmio.read_sized(reg::CONFIG + 0x3c, 8)?, field(0x3c, 4));
    for (offset, size) in [(0x40, 4), (0x40, 8), (0x80, 1), (0xf8, 8), (0xfc, 8)] {
        assert_eq!(
            mmio.read_sized(reg::CONFIG + offset, size)?,
            0,
            "{size}-byte config read at {offset:#x}"
        );
    }

    // Only the writeback byte is writable, and only as a byte.
    let generation = mmio.read(reg::CONFIG_GENERATION)?;
    mmio.write_sized(reg::CONFIG + 0x20, 1, 0)?;
    assert_eq!(mmio.read_sized(reg::CONFIG + 0x20, 1)?, 0, "writeback");
    let generation_after = mmio.read(reg::CONFIG_GENERATION)?;
    assert_ne!(generation_after, generation, "ConfigGeneration unchanged");
    mmio.write_sized(reg::CONFIG, 4, 0x1234)?;
    mmio.write_sized(reg::CONFIG + 0x20, 2, 0x0101)?;
    assert_eq!(mmio.read_sized(reg::CONFIG, 8)?, IMAGE_SIZE / SECTOR);
    assert_eq!(mmio.read_sized(reg::CONFIG + 0x20, 1)?, 0, "writeback");
    assert_eq!(mmio.read(reg::CONFIG_GENERATION)?, generation_after);
    mmio.write_sized(reg::CONFIG + 0x20, 1, 1)?;
    assert_eq!(mmio.read_sized(reg::CONFIG + 0x20, 1)?, 1, "writeback");

    assert_eq!(mmio.read(reg::STATUS)?, status);
    let mut driver = PolledBlk::start(mmio, area(0), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 0, 5)?;
    Ok(rig.stop()?)
}

/// The used index of `queue`, as the driver reads it.
fn used_index(memory: &vm_memory::GuestMemoryMmap, queue: &DriverQueue) -> TestResult<u16> {
    Ok(queue.device_used_idx(memory)?)
}

/// Waits long enough for a worker to have served a request it was kicked for, and checks that
/// none was: a request served early shows here within microseconds.
fn assert_nothing_served(
    memory: &vm_memory::GuestMemoryMmap,
    queue: &DriverQueue,
    image: &std::path::Path,
    what: &str,
) -> TestResult {
    thread::sleep(Duration::from_millis(200));
    assert_eq!(used_index(memory, queue)?, 0, "a request was served {what}");
    assert!(
        image_bytes(image, 0, 4096) == vec![0; 4096],
        "the image was written {what}"
    );
    Ok(())
}

/// virtio 1.2 2.1.2 and 3.1.1: the device uses no buffer before DRIVER_OK, and DRIVER_OK
/// counts only after negotiated features. A notify that comes too early is not lost: the
/// buffers are served once DRIVER_OK is set.
#[test]
fn queues_serve_nothing_before_driver_ok() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let image = &rig.images[0];
    let data = pattern(60, 4096);

    let mmio = rig.mmio(BLK, 0);
    negotiate(&mmio)?;
    let queue = mmio.setup_queue(0, 64, area(0))?;
    let mut driver = PolledBlk::new(mmio, queue, memory);
    let head = driver.post(BLK_T_OUT, 0, Payload::Out(&data))?;
    // Answered after the notify ahead of it in the ring was handled.
    assert_eq!(
        driver.mmio.read(reg::STATUS)?,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    );
    assert_nothing_served(memory, &driver.queue, image, "before DRIVER_OK")?;
    assert!(logged(&["QueueNotify for queue 0 before DRIVER_OK"]));
    driver.mmio.driver_ok()?;
    assert_eq!(driver.wait_used(head)?, 1, "served at DRIVER_OK");
    driver.acknowledge_interrupt()?;
    assert!(image_bytes(image, 0, 4096) == data);

    // DRIVER_OK without FEATURES_OK does not stick, and serves nothing either.
    File::options()
        .write(true)
        .open(image)?
        .write_all_at(&[0; 4096], 0)?;
    let mmio = rig.mmio(BLK, 0);
    begin_initialization(&mmio)?;
    let queue = mmio.setup_queue(0, 64, area(1))?;
    mmio.write(
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    )?;
    assert_eq!(mmio.read(reg::STATUS)?, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    assert!(logged(&["DRIVER_OK without negotiated features"]));
    let mut driver = PolledBlk::new(mmio, queue, memory);
    driver.post(BLK_T_OUT, 0, Payload::Out(&data))?;
    driver.mmio.read(reg::STATUS)?;
    assert_nothing_served(memory, &driver.queue, image, "without FEATURES_OK")?;

    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(2), 64)?;
    write_and_verify(&mut driver, image, 0, 61)?;
    Ok(rig.stop()?)
}

#[test]
fn accesses_where_no_device_is_are_answered_and_posted_ones_never() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let sim = &rig.sim;
    let nowhere = 0xa00_0000;
    assert_eq!(sim.access(0, ZONE, nowhere, 4, None, TIMEOUT)?, 0);
    sim.access(0, ZONE, nowhere, 4, Some(1), TIMEOUT)?;
    // Zone 7 is not configured; the address is zone 1's device.
    assert_eq!(sim.access(0, 7, BLK.addr, 4, None, TIMEOUT)?, 0);
    sim.access(0, 7, BLK.addr + reg::STATUS, 4, Some(0), TIMEOUT)?;

    // The simulator posts only notifies of configured devices, so these are pushed the way
    // hvisor would push a posted write to a region start with no device behind it.
    let hypervisor = HypervisorSide::new(sim.bridge());
    let cpu = 2;
    let flag = hypervisor.cfg_flag(cpu as usize);
    let posted = |zone, address| DeviceReq {
        src_cpu: u64::from(cpu),
        address,
        size: 4,
        value: 0,
        src_zone: zone,
        is_write: true,
        need_interrupt: true,
    };
    assert!(sim.publish_raw(&posted(ZONE, nowhere + reg::QUEUE_NOTIFY)));
    assert!(sim.publish_raw(&posted(7, BLK.addr + reg::QUEUE_NOTIFY)));
    assert!(sim.publish_raw(&posted(ZONE, BLK.addr + reg::QUEUE_NOTIFY)));
    // A synchronous request from a CPU the page has no entry for cannot be answered; it
    // must not take the daemon down.
    assert!(sim.publish_raw(&DeviceReq {
        src_cpu: 40,
        need_interrupt: false,
        is_write: false,
        ..posted(ZONE, BLK.addr)
    }));
    // Behind them in the ring, a read from another CPU (which also wakes the daemon): once
    // it is answered, the requests above were handled.
    assert_eq!(
        sim.access(3, ZONE, BLK.addr, 4, None, TIMEOUT)?,
        u64::from(MAGIC)
    );
    assert_eq!(
        hypervisor.cfg_flag(cpu as usize),
        flag,
        "a posted request was answered: cfg_flags[{cpu}] moved"
    );
    // With a stray answer, this read would return the stray 0 (hvisor-tool's bug 5.6#2).
    assert_eq!(
        sim.access(cpu, ZONE, BLK.addr, 4, None, TIMEOUT)?,
        u64::from(MAGIC)
    );

    let mut driver = PolledBlk::start(rig.mmio(BLK, cpu), area(0), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 0, 6)?;
    Ok(rig.stop()?)
}

#[test]
fn devices_of_two_zones_serve_interleaved_io_from_several_cpus() -> TestResult {
    const ROUNDS: u32 = 16;
    const LEN: usize = 8192;
    let devices = [BLK, BLK_B, BLK_ZONE2];
    let rig = Rig::start(RigOptions::new(&devices));
    let seed = |device: usize, round: u32| device as u32 * 1000 + round;
    thread::scope(|scope| -> TestResult {
        let drivers: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(n, &device)| {
                let rig = &rig;
                scope.spawn(move || -> TestResult {
                    // Each device gets its own vCPU; each CPU has one synchronous request
                    // in flight at most, as on hardware.
                    let mut driver =
                        PolledBlk::start(rig.mmio(device, n as u32 + 1), area(n as u64), 64)?;
                    for round in 0..ROUNDS {
                        let data = pattern(seed(n, round), LEN);
                        let sector = u64::from(round) * 16;
                        assert_eq!(driver.write(sector, &data)?, BLK_S_OK);
                        let (status, back) = driver.read(sector, LEN as u32)?;
                        assert_eq!(status, BLK_S_OK);
                        assert!(back == data, "device {n} round {round}: read back differs");
                    }
                    Ok(())
                })
            })
            .collect();
        for driver in drivers {
            driver.join().expect("driver thread panicked")?;
        }
        Ok(())
    })?;
    for (n, image) in rig.images.iter().enumerate() {
        for round in 0..ROUNDS {
            assert!(
                image_bytes(image, u64::from(round) * 16, LEN) == pattern(seed(n, round), LEN),
                "device {n}, round {round}: {} holds other data",
                image.display()
            );
        }
    }
    // Each request raised exactly one interrupt, into its own device's zone and irq.
    let expected = devices.len() * 2 * ROUNDS as usize;
    let mut interrupts = Vec::new();
    while interrupts.len() < expected {
        interrupts.push(rig.sim.wait_interrupt(TIMEOUT).ok_or_else(|| {
            format!(
                "{} interrupts of {expected}: {interrupts:?}",
                interrupts.len()
            )
        })?);
    }
    for device in devices {
        let line = DeviceRes {
            target_zone: device.zone,
            irq_id: device.irq,
        };
        let count = interrupts.iter().filter(|&&taken| taken == line).count();
        assert_eq!(count, 2 * ROUNDS as usize, "interrupts of {line:?}");
    }
    Ok(rig.stop()?)
}

/// docs/hypervisor-socket.md lets windows share one descriptor at different offsets: each
/// zone must be served from its own part of the file.
#[test]
fn zones_whose_ram_shares_one_file_are_served_from_their_own_part() -> TestResult {
    let rig = Rig::start(RigOptions {
        shared_ram_file: true,
        ..RigOptions::new(&[BLK, BLK_ZONE2])
    });
    // The same guest addresses in both zones: only the file offset tells them apart.
    let mut first = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    let mut second = PolledBlk::start(rig.mmio(BLK_ZONE2, 1), area(0), 64)?;
    for round in 0..4 {
        write_and_verify(&mut first, &rig.images[0], round * 8, 30 + round as u32)?;
        write_and_verify(&mut second, &rig.images[1], round * 8, 40 + round as u32)?;
    }
    Ok(rig.stop()?)
}

#[test]
fn a_descriptor_loop_is_returned_and_serving_goes_on() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    memory.write_slice(&blk::header(BLK_T_OUT, 0), driver.buffers.header)?;
    for length in [1, 2] {
        let buffers = vec![
            Buffer {
                addr: driver.buffers.header,
                len: 16,
                device_writable: false,
            };
            length
        ];
        let head = driver.queue.add(memory, &buffers)?;
        // Close the chain into a loop. The chain is already published, but the device
        // reads it only once notified.
        let descriptor = |index: u16| driver.queue.layout.descriptor(index);
        let mut last = head;
        for _ in 1..length {
            last = memory.read_obj(descriptor(last).unchecked_add(14))?;
        }
        memory.write_obj(DESC_F_NEXT, descriptor(last).unchecked_add(12))?;
        memory.write_obj(head, descriptor(last).unchecked_add(14))?;
        driver.mmio.notify(0)?;
        assert_eq!(
            driver.wait_used(head)?,
            0,
            "a loop of {length} has no status byte to count"
        );
        driver.acknowledge_interrupt()?;
    }
    assert!(
        logged(&["dropped without status", "flagged NEXT"]),
        "no warning about the loop"
    );
    write_and_verify(&mut driver, &rig.images[0], 0, 7)?;
    write_and_verify(&mut driver, &rig.images[0], 8, 8)?;
    Ok(rig.stop()?)
}

/// Fills the result ring with interrupts of `driver`'s device while the gate holds
/// FINISH_REQ back, then completes one more request, whose interrupt cannot be queued.
fn fill_the_result_ring(rig: &Rig, driver: &mut PolledBlk) -> TestResult {
    let bridge = rig.sim.bridge();
    let queued = || {
        let load = |index: &AtomicU32| index.load(Ordering::Acquire);
        load(&bridge.res_rear).wrapping_sub(load(&bridge.res_front)) & 31
    };
    rig.gate().pause();
    // Each request raises one interrupt: its driver acknowledges before the next.
    for round in 0..31 {
        assert_eq!(driver.write(round, &pattern(round as u32, 512))?, BLK_S_OK);
    }
    wait_until("31 results in the ring", || Ok(queued() == 31))?;
    let head = driver.post(BLK_T_OUT, 40, Payload::Out(&pattern(40, 512)))?;
    driver.wait_used(head)?;
    // The device has raised its line; the injector is now retrying against the full ring
    // (each retry signals FINISH_REQ, which the gate counts).
    wait_until("InterruptStatus of the 32nd completion", || {
        Ok(driver.mmio.read(reg::INTERRUPT_STATUS)? & 1 == 1)
    })?;
    // 31 signals came with the queued results; more are retries.
    wait_until("retries against the full ring", || {
        Ok(rig.gate().held() > 33)
    })?;
    assert_eq!(queued(), 31);
    assert!(rig.sim.take_interrupts().is_empty());
    Ok(())
}

#[test]
fn a_full_result_ring_delays_interrupts_but_not_register_answers() -> TestResult {
    let rig = Rig::start(RigOptions {
        gated_results: true,
        ..RigOptions::new(&[BLK, BLK_B])
    });
    let mut first = PolledBlk::start(rig.mmio(BLK, 1), area(0), 64)?;
    let mut second = PolledBlk::start(rig.mmio(BLK_B, 2), area(1), 64)?;
    fill_the_result_ring(&rig, &mut first)?;

    let slowest = (0..100)
        .map(|_| {
            let started = Instant::now();
            assert_eq!(second.mmio.read(reg::MAGIC_VALUE)?, MAGIC);
            assert_eq!(first.mmio.read(reg::INTERRUPT_STATUS)?, 1);
            Ok(started.elapsed())
        })
        .collect::<TestResult<Vec<Duration>>>()?
        .into_iter()
        .max()
        .unwrap_or_default();
    assert!(
        slowest < Duration::from_millis(250),
        "register answers waited behind the full result ring: {slowest:?}"
    );
    // The other device's data path goes on; only its interrupt has to wait.
    let data = pattern(50, 4096);
    let head = second.post(BLK_T_OUT, 0, Payload::Out(&data))?;
    assert_eq!(second.wait_used(head)?, 1);
    assert_eq!(
        rig.memory(ZONE).read_obj::<u8>(second.buffers.status)?,
        BLK_S_OK
    );
    assert!(image_bytes(&rig.images[1], 0, data.len()) == data);

    rig.gate().resume()?;
    // 31 queued and one waiting for the first device, then the second device's.
    let mut interrupts = Vec::new();
    while interrupts.len() < 33 {
        interrupts.push(
            rig.sim
                .wait_interrupt(TIMEOUT)
                .ok_or_else(|| format!("{} of 33 interrupts: {interrupts:?}", interrupts.len()))?,
        );
    }
    let first_line = DeviceRes {
        target_zone: BLK.zone,
        irq_id: BLK.irq,
    };
    let second_line = DeviceRes {
        target_zone: BLK_B.zone,
        irq_id: BLK_B.irq,
    };
    assert!(interrupts[..32].iter().all(|&taken| taken == first_line));
    assert_eq!(interrupts[32], second_line);
    let counted = rig.counters.snapshot(Reason::Signal);
    assert_eq!(
        counted.result_ring.full_waits, 1,
        "{:?}",
        counted.result_ring
    );
    assert!(
        counted.result_ring.full_wait_us > 0,
        "{:?}",
        counted.result_ring
    );
    first.acknowledge_interrupt()?;
    second.acknowledge_interrupt()?;
    write_and_verify(&mut first, &rig.images[0], 64, 9)?;
    write_and_verify(&mut second, &rig.images[1], 64, 10)?;
    Ok(rig.stop()?)
}

#[test]
fn the_daemon_stops_while_the_result_ring_is_full() -> TestResult {
    let rig = Rig::start(RigOptions {
        gated_results: true,
        ..RigOptions::new(&[BLK])
    });
    let mut driver = PolledBlk::start(rig.mmio(BLK, 1), area(0), 64)?;
    fill_the_result_ring(&rig, &mut driver)?;
    drop(driver);
    // Nobody will drain the ring again.
    Ok(rig.hang_up()?)
}

#[test]
fn a_reset_between_requests_gives_a_fresh_device() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    for round in 0..3 {
        write_and_verify(&mut driver, &rig.images[0], u64::from(round) * 8, round)?;
    }
    driver.mmio.write(reg::STATUS, 0)?;
    assert_eq!(driver.mmio.read(reg::STATUS)?, 0);
    driver.mmio.write(reg::QUEUE_SEL, 0)?;
    assert_eq!(driver.mmio.read(reg::QUEUE_READY)?, 0);
    assert_eq!(driver.mmio.read(reg::INTERRUPT_STATUS)?, 0);
    assert_eq!(driver_features(&driver.mmio)?, 0);

    // Fresh rings elsewhere, as a driver allocates after a reset; the library's driver
    // negotiates EVENT_IDX this time.
    let mut guest = BlkGuest::start(&rig.sim, ZONE, BLK.addr, area(1), 64, 4096)?;
    let data = pattern(20, 4096);
    assert_eq!(guest.write(200, &data)?, blk::S_OK);
    assert!(guest.read(200, 4096)? == (blk::S_OK, data.clone()));
    assert_eq!(
        used_index(memory, &guest.queue)?,
        2,
        "the used index did not start again from 0"
    );
    assert!(image_bytes(&rig.images[0], 200, data.len()) == data);

    // And once more, back to the first driver's rings and features.
    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 300, 21)?;
    Ok(rig.stop()?)
}

/// A 32 KiB write (of zeroes) laid out from `at` as [`RequestBuffers`] does: one chain to
/// publish many times over.
fn slow_write_request(
    memory: &vm_memory::GuestMemoryMmap,
    at: GuestAddress,
) -> TestResult<Vec<Buffer>> {
    const LEN: u32 = 0x8000;
    let payload = vec![0; LEN as usize];
    Ok(RequestBuffers::at(at, LEN).chain(memory, BLK_T_OUT, 0, Payload::Out(&payload))?)
}

/// Publishes `count` copies of `request` and resets the device once the first completed: the
/// worker is then in the middle of a batch, each request slowed down by write-through
/// (writeback byte 0).
fn reset_mid_batch(
    mmio: &MmioGuest,
    queue: &mut DriverQueue,
    memory: &vm_memory::GuestMemoryMmap,
    request: &[Buffer],
    count: usize,
) -> TestResult {
    mmio.write_sized(reg::CONFIG + 0x20, 1, 0)?;
    for _ in 0..count {
        queue.add(memory, request)?;
    }
    mmio.notify(0)?;
    wait_until(
        "the first completion",
        || Ok(used_index(memory, queue)? > 0),
    )?;
    mmio.write(reg::STATUS, 0)?;
    Ok(())
}

#[test]
fn a_reset_with_requests_in_flight_is_answered() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let request = slow_write_request(memory, area(4))?;
    for round in 0..3 {
        let mut guest = BlkGuest::start(&rig.sim, ZONE, BLK.addr, area(round % 2), 64, 4096)?;
        reset_mid_batch(&guest.mmio, &mut guest.queue, memory, &request, 20)?;
        assert_eq!(guest.mmio.read(reg::STATUS)?, 0, "round {round}");
    }
    let mut guest = BlkGuest::start(&rig.sim, ZONE, BLK.addr, area(2), 64, 4096)?;
    let data = pattern(22, 4096);
    assert_eq!(guest.write(200, &data)?, blk::S_OK);
    assert!(guest.read(200, 4096)? == (blk::S_OK, data));
    Ok(rig.stop()?)
}

/// Initializes the device as a driver does after it reset it itself: no reset of its own.
fn initialize_after_reset(mmio: MmioGuest<'_>, at: GuestAddress) -> TestResult<PolledBlk<'_>> {
    let memory = mmio.sim.memory(ZONE).ok_or("zone without RAM")?;
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE)?;
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
    assert_ne!(offer_features(&mmio, NEGOTIATED)? & STATUS_FEATURES_OK, 0);
    let queue = mmio.setup_queue(0, 64, at)?;
    mmio.driver_ok()?;
    Ok(PolledBlk::new(mmio, queue, memory))
}

/// virtio 1.2 2.4.1: once a reset completes, the device sends no notification of the old
/// driver's requests, and its interrupt line is clean for the next driver. Completions
/// signalled just before the reset used to become an interrupt just after it, leaving
/// InterruptStatus set and the line "asserted", so the next driver's first completion raised
/// no interrupt at all. The race needs a reset while the worker is completing requests, so
/// many rounds go through one.
#[test]
fn a_reset_with_writes_in_flight_leaves_no_interrupt_behind_and_loses_none() -> TestResult {
    const ROUNDS: u32 = 100;
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let bridge = rig.sim.bridge();
    let results_posted = || bridge.res_rear.load(Ordering::Acquire);
    let request = slow_write_request(memory, area(4))?;
    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    for round in 0..ROUNDS {
        reset_mid_batch(&driver.mmio, &mut driver.queue, memory, &request, 16)?;
        let posted_at_reset = results_posted();
        assert_eq!(
            driver.mmio.read(reg::INTERRUPT_STATUS)?,
            0,
            "round {round}: InterruptStatus right after the reset"
        );

        let at = area(1 + u64::from(round % 2));
        driver = initialize_after_reset(rig.mmio(BLK, 0), at)?;
        assert_eq!(
            driver.mmio.read(reg::INTERRUPT_STATUS)?,
            0,
            "round {round}: InterruptStatus after the re-initialization"
        );
        assert_eq!(
            results_posted(),
            posted_at_reset,
            "round {round}: an interrupt was posted after the reset"
        );
        rig.sim.take_interrupts();

        let head = driver.post(BLK_T_OUT, 0, Payload::Out(&pattern(round, 512)))?;
        driver.wait_used(head)?;
        wait_until("the new driver's interrupt", || {
            Ok(results_posted() != posted_at_reset)
        })
        .map_err(|error| format!("round {round}: {error}"))?;
        driver.acknowledge_interrupt()?;
    }
    write_and_verify(&mut driver, &rig.images[0], 64, 62)?;
    Ok(rig.stop()?)
}

/// Issue 12 item 10: a driver moves the avail index more than a ring ahead of the device. The
/// queue stops, Status shows DEVICE_NEEDS_RESET and one configuration-change interrupt is sent
/// (virtio 1.2, 2.1.2), however often the driver kicks; a reset clears it and the
/// re-initialised queue serves again.
#[test]
fn a_broken_ring_sets_needs_reset_until_the_device_is_reset() -> TestResult {
    const NEEDS_RESET: u32 = 0x40;
    const INT_CONFIG: u32 = 2;
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let memory = rig.memory(ZONE);
    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 0, 30)?;
    let mut taken = Vec::new();
    while let Some(interrupt) = rig.sim.wait_interrupt(Duration::from_millis(100)) {
        taken.push(interrupt);
    }
    assert_eq!(taken.len(), 2, "one interrupt per request");

    let broken = used_index(memory, &driver.queue)?.wrapping_add(64 + 8);
    memory.write_obj(broken, driver.queue.layout.avail_idx())?;
    for _ in 0..5 {
        driver.mmio.notify(0)?;
    }
    wait_until("DEVICE_NEEDS_RESET", || {
        Ok(driver.mmio.read(reg::STATUS)? & NEEDS_RESET != 0)
    })?;
    let running = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    assert_eq!(driver.mmio.read(reg::STATUS)?, running | NEEDS_RESET);
    assert_eq!(driver.mmio.read(reg::INTERRUPT_STATUS)?, INT_CONFIG);
    let line = DeviceRes {
        target_zone: BLK.zone,
        irq_id: BLK.irq,
    };
    assert_eq!(rig.sim.wait_interrupt(TIMEOUT), Some(line));
    driver.mmio.write(reg::INTERRUPT_ACK, INT_CONFIG)?;
    // More kicks on the stopped queue: no second interrupt, no more log lines.
    for _ in 0..5 {
        driver.mmio.notify(0)?;
    }
    assert_eq!(rig.sim.wait_interrupt(Duration::from_millis(200)), None);
    assert_eq!(driver.mmio.read(reg::STATUS)?, running | NEEDS_RESET);
    let fault = format!("avail index {broken} is 72 entries ahead");
    assert_eq!(logged_count(&[&fault, "queue stopped"]), 1);
    assert_eq!(logged_count(&[&fault, "DEVICE_NEEDS_RESET set"]), 1);
    let counted = &rig.counters.snapshot(Reason::Signal).devices[0];
    assert_eq!(counted.ring_faults, 1, "{counted:?}");
    assert_eq!(counted.config_signals, 1, "{counted:?}");
    assert_eq!(counted.interrupts, 3, "{counted:?}");

    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(1), 64)?;
    assert_eq!(driver.mmio.read(reg::STATUS)?, running);
    write_and_verify(&mut driver, &rig.images[0], 8, 31)?;
    assert_eq!(driver.mmio.read(reg::INTERRUPT_STATUS)?, 0);
    // The bit is the device's: a driver writing it does not set it.
    driver.mmio.write(reg::STATUS, running | NEEDS_RESET)?;
    assert_eq!(driver.mmio.read(reg::STATUS)?, running);
    Ok(rig.stop()?)
}

/// A ring breaks while the result ring is full and the line is free: the configuration-change
/// interrupt waits for room on the interrupt thread, not on the queue's worker, so a reset
/// (which waits for the worker's batch) is still answered at once, and drops the stale
/// interrupt.
#[test]
fn a_broken_ring_with_a_full_result_ring_does_not_hold_up_a_reset() -> TestResult {
    let rig = Rig::start(RigOptions {
        gated_results: true,
        ..RigOptions::new(&[BLK])
    });
    let memory = rig.memory(ZONE);
    let mut driver = PolledBlk::start(rig.mmio(BLK, 1), area(0), 64)?;
    fill_the_result_ring(&rig, &mut driver)?;
    driver.acknowledge_interrupt()?;
    let used = used_index(memory, &driver.queue)?;
    memory.write_obj(used.wrapping_add(64 + 8), driver.queue.layout.avail_idx())?;
    driver.mmio.notify(0)?;
    wait_until("DEVICE_NEEDS_RESET", || {
        Ok(driver.mmio.read(reg::STATUS)? & 0x40 != 0)
    })?;
    let started = Instant::now();
    driver.mmio.write(reg::STATUS, 0)?;
    let reset_took = started.elapsed();
    assert!(
        reset_took < Duration::from_millis(250),
        "the reset waited {reset_took:?} behind the full result ring"
    );
    assert_eq!(driver.mmio.read(reg::INTERRUPT_STATUS)?, 0);
    rig.gate().resume()?;
    let mut driver = PolledBlk::start(rig.mmio(BLK, 1), area(1), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 64, 32)?;
    Ok(rig.stop()?)
}

#[test]
fn the_daemon_stops_when_the_hypervisor_side_hangs_up() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    write_and_verify(&mut driver, &rig.images[0], 0, 11)?;
    drop(driver);
    Ok(rig.hang_up()?)
}

#[test]
fn requests_answer_through_the_ring_on_every_cpu() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    for cpu in 0..32 {
        assert_eq!(
            rig.mmio(BLK, cpu).read(reg::MAGIC_VALUE)?,
            MAGIC,
            "cpu {cpu}"
        );
    }
    Ok(rig.stop()?)
}
