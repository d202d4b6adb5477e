//! Proves the test frontend in `support::frontend` against a vhost-user
//! backend we did not write: qemu-storage-daemon exporting a raw image as
//! vhost-user-blk. If these pass, a failure of the same driver against our
//! own daemon points at the daemon.

mod support;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use support::frontend::{Buffer, DriverConfig, POISON_BYTE, UsedBuffer, VhostUserDriver};
use support::qsd::StorageDaemon;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_guest_driver::blk;

const SECTOR_SIZE: u64 = 512;
const IMAGE_SIZE: u64 = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);
/// Offset of `writeback` in `struct virtio_blk_config`.
const CONFIG_WRITEBACK_OFFSET: u32 = 32;

/// A distinct, non-repeating-per-sector pattern, so misplaced sectors show.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
        .collect()
}

fn write_request(driver: &mut VhostUserDriver, sector: u64, data: &[u8]) -> u16 {
    driver
        .enqueue(0, &[&blk::header(VIRTIO_BLK_T_OUT, sector), data], &[1])
        .expect("enqueue write")
}

fn read_request(driver: &mut VhostUserDriver, sector: u64, len: u32) -> u16 {
    driver
        .enqueue(0, &[&blk::header(VIRTIO_BLK_T_IN, sector)], &[len, 1])
        .expect("enqueue read")
}

fn status(used: &UsedBuffer) -> u8 {
    used.writable.last().expect("status buffer")[0]
}

fn capacity_sectors(driver: &mut VhostUserDriver) -> u64 {
    let config = driver.get_config(0, 8).expect("GET_CONFIG");
    u64::from_le_bytes(config.try_into().unwrap())
}

fn image_bytes(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    File::open(image)
        .and_then(|f| f.read_exact_at(&mut data, offset))
        .expect("read image");
    data
}

#[test]
fn blk_write_read_back_and_reconnect() {
    let Some(qsd) = StorageDaemon::start(IMAGE_SIZE) else {
        return;
    };
    let config = DriverConfig {
        device_features: 1 << VIRTIO_BLK_F_CONFIG_WCE,
        ..DriverConfig::default()
    };
    let mut driver = VhostUserDriver::connect(&qsd.socket, &config).expect("connect");
    assert!(
        driver
            .acked_protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG)
    );
    assert_eq!(capacity_sectors(&mut driver), IMAGE_SIZE / SECTOR_SIZE);

    // SET_CONFIG round trip through the one field virtio-blk lets a driver
    // write (writeback cache mode). Read back from offset 0 because
    // libvhost-user ignores the GET_CONFIG offset (QEMU always reads from 0).
    assert_ne!(driver.acked_features() & (1 << VIRTIO_BLK_F_CONFIG_WCE), 0);
    let writeback = CONFIG_WRITEBACK_OFFSET as usize;
    for mode in [1u8, 0] {
        driver
            .set_config(CONFIG_WRITEBACK_OFFSET, &[mode])
            .expect("SET_CONFIG");
        let config = driver.get_config(0, CONFIG_WRITEBACK_OFFSET + 1).unwrap();
        assert_eq!(config[writeback], mode);
    }

    let sector = 8;
    let data = pattern(64 << 10, 0x5c);
    let header = blk::header(VIRTIO_BLK_T_OUT, sector);
    let head = driver
        .submit(0, &[&header, &data], &[1])
        .expect("submit write");
    let used = driver.wait_used(0, TIMEOUT).expect("write completion");
    assert_eq!(used.head, head);
    assert_eq!(used.len, 1, "a write only writes the status byte");
    assert_eq!(status(&used), VIRTIO_BLK_S_OK as u8);
    assert!(
        driver.poll_used(0).unwrap().is_none(),
        "one request, one completion"
    );
    assert_eq!(
        driver.stats(0).unwrap().kicks,
        1,
        "an idle device wants a kick"
    );

    // A kick with nothing new in the ring must be harmless.
    driver.kick(0).unwrap();

    let head = read_request(&mut driver, sector, data.len() as u32);
    driver.notify(0).unwrap();
    let used = driver.wait_used(0, TIMEOUT).expect("read completion");
    assert_eq!(used.head, head);
    assert_eq!(used.len as usize, data.len() + 1);
    assert_eq!(status(&used), VIRTIO_BLK_S_OK as u8);
    assert!(used.writable[0] == data, "read back differs from written");
    assert!(
        image_bytes(&qsd.image, sector * SECTOR_SIZE, data.len()) == data,
        "image file differs from written"
    );

    // The same read with caller-owned buffers, read back by address.
    let header = driver.alloc(16).unwrap();
    let buffer = driver.alloc(4096).unwrap();
    let status_byte = driver.alloc(1).unwrap();
    driver
        .write_memory(header, &blk::header(VIRTIO_BLK_T_IN, sector))
        .unwrap();
    driver.write_memory(status_byte, &[POISON_BYTE]).unwrap();
    let chain = [
        Buffer {
            addr: header,
            len: 16,
            device_writable: false,
        },
        Buffer {
            addr: buffer,
            len: 4096,
            device_writable: true,
        },
        Buffer {
            addr: status_byte,
            len: 1,
            device_writable: true,
        },
    ];
    let head = driver.enqueue_raw(0, &chain).unwrap();
    driver.notify(0).unwrap();
    let used = driver.wait_used(0, TIMEOUT).expect("raw read completion");
    assert_eq!((used.head, used.len), (head, 4097));
    assert!(used.writable.is_empty());
    assert_eq!(driver.read_memory(status_byte, 1).unwrap(), [0]);
    assert!(driver.read_memory(buffer, 4096).unwrap() == data[..4096]);
    for addr in [header, buffer, status_byte] {
        driver.free(addr).unwrap();
    }
    assert_eq!(driver.in_flight(0).unwrap(), 0);
    // Stopping the ring reports how far the device consumed it.
    assert_eq!(driver.get_vring_base(0).unwrap(), 3);

    // The daemon keeps serving after a frontend goes away.
    driver.disconnect();
    let mut driver = VhostUserDriver::connect(&qsd.socket, &config).expect("reconnect");
    read_request(&mut driver, sector, 512);
    driver.notify(0).unwrap();
    let used = driver.wait_used(0, TIMEOUT).expect("read after reconnect");
    assert!(used.writable[0] == data[..512]);
}

/// Many small requests through a 16-entry ring in every combination of
/// EVENT_IDX and indirect descriptors: the indices wrap several times,
/// kicks and calls go through the suppression logic, and heads are recycled.
/// One daemon serves all four connections in turn.
#[test]
fn blk_ring_wrap_with_event_idx_and_indirect_combinations() {
    let Some(qsd) = StorageDaemon::start(IMAGE_SIZE) else {
        return;
    };
    for (round, (event_idx, indirect)) in
        [(false, false), (true, false), (false, true), (true, true)]
            .into_iter()
            .enumerate()
    {
        let config = DriverConfig {
            queue_size: 16,
            event_idx,
            indirect,
            ..DriverConfig::default()
        };
        let mut driver = VhostUserDriver::connect(&qsd.socket, &config).expect("connect");
        // A new seed each round, so data left by the previous one can't pass.
        let seed = round as u8 * 64;
        ring_wrap_round(&mut driver, seed, &qsd.image)
            .unwrap_or_else(|e| panic!("event_idx={event_idx} indirect={indirect}: {e}"));
        driver.disconnect();
    }
}

fn ring_wrap_round(driver: &mut VhostUserDriver, seed: u8, image: &Path) -> Result<(), String> {
    const REQUESTS: u64 = 100;
    // Five 3-descriptor chains fill 15 of the 16 entries without indirect.
    const MAX_IN_FLIGHT: usize = 5;
    const LEN: usize = 4096;
    let sectors_per_request = LEN as u64 / SECTOR_SIZE;
    let data = |request: u64| pattern(LEN, seed.wrapping_add(request as u8));
    let mut notifies = 0;

    let mut next = 0;
    for _ in 0..REQUESTS {
        // Top the queue up and notify once, as a guest driver under load does.
        while next < REQUESTS && driver.in_flight(0).unwrap() < MAX_IN_FLIGHT {
            write_request(driver, next * sectors_per_request, &data(next));
            next += 1;
        }
        driver.notify(0).unwrap();
        notifies += 1;
        let used = driver
            .wait_used(0, TIMEOUT)
            .map_err(|e| format!("write: {e}"))?;
        if status(&used) != VIRTIO_BLK_S_OK as u8 {
            return Err(format!("write status {}", status(&used)));
        }
    }
    if driver.in_flight(0).unwrap() != 0 {
        return Err("writes still in flight".into());
    }

    for request in 0..REQUESTS {
        read_request(driver, request * sectors_per_request, LEN as u32);
        driver.notify(0).unwrap();
        notifies += 1;
        let used = driver
            .wait_used(0, TIMEOUT)
            .map_err(|e| format!("read: {e}"))?;
        if status(&used) != VIRTIO_BLK_S_OK as u8 || used.writable[0] != data(request) {
            return Err(format!("request {request} read back wrong"));
        }
    }

    // Calls are not required: a fast backend may complete each request before the driver
    // sleeps, and a missed call is caught by `wait_used` itself (MissedInterrupt).
    let stats = driver.stats(0).unwrap();
    if stats.kicks + stats.suppressed_kicks != notifies || stats.kicks == 0 {
        return Err(format!("{notifies} notifies gave {stats:?}"));
    }
    let image = fs::read(image).unwrap();
    for request in 0..REQUESTS {
        let offset = request as usize * LEN;
        if image[offset..offset + LEN] != data(request) {
            return Err(format!("image differs at request {request}"));
        }
    }
    Ok(())
}
