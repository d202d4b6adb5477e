//! hvisor zones' devices served by vhost-user backends in other processes: the daemon is their
//! vhost-user frontend. Our own `hvisor-vhost blk` and `hvisor-vhost rng` play the external
//! backends, and so does qemu-storage-daemon's vhost-user-blk export (skipped, saying so, where
//! it is not installed); the simulator plays hvisor and a zone's driver. The data is checked where the
//! backend keeps it (the image file, the entropy source), and a backend that dies is either
//! reconnected with its rings where they were (and its inflight region, from which our blk
//! resubmits what the dead process left in flight) or reported to the driver as
//! DEVICE_NEEDS_RESET, while the other devices go on serving.

mod support;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hvisor_sim::guest::MmioGuest;
use hvisor_sim::{SimOptions, Simulator};
use hvisor_transport::abi::DeviceRes;
use hvisor_transport::config::VirtioConfig;
use hvisor_transport::mmio::reg;
use hvisor_transport::remote::{DEFAULT_QUEUE_SIZE, RECONNECT_WINDOW, REPLY_TIMEOUT};
use support::daemon::Daemon;
use support::hvisor::*;
use support::qsd::StorageDaemon;
use virtio_guest_driver::blk::{Payload, RequestBuffers, T_FLUSH};
use vm_memory::GuestAddress;

const ZONE: u32 = 1;
/// Where the external device sits, and a built-in one next to it.
const EXTERNAL: BlkSpec = BlkSpec {
    zone: ZONE,
    addr: 0xa00_3c00,
    irq: 78,
};
const BUILT_IN: BlkSpec = BlkSpec {
    zone: ZONE,
    addr: 0xa00_3800,
    irq: 77,
};
const VIRTIO_ID_RNG: u32 = 4;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_CONFIG: u32 = 2;
const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");

/// `hvisor-vhost blk` serving `image` on `socket` with `options` added, logging to `log`.
fn blk_backend(socket: &Path, image: &Path, options: &[&str], log: &Path) -> Daemon {
    let mut args = vec![OsStr::new("--image"), image.as_os_str()];
    args.extend(options.iter().map(OsStr::new));
    Daemon::serve_on(BINARY, "blk", socket, &args, log, TIMEOUT)
}

/// `hvisor-vhost blk` serving an image on a socket, both in a temporary directory. The fields
/// drop in this order: the process before its directory.
struct Backend {
    daemon: Daemon,
    socket: PathBuf,
    image: PathBuf,
    dir: tempfile::TempDir,
}

impl Backend {
    /// The backend of a zeroed image of [`IMAGE_SIZE`] bytes on a socket named `socket_name`,
    /// which the test's log checks look for (tests run in parallel and share the log).
    fn start(socket_name: &str) -> TestResult<Backend> {
        Self::start_with(socket_name, &vec![0; IMAGE_SIZE as usize], &[])
    }

    /// The backend of an image holding `content`, started with `options`.
    fn start_with(socket_name: &str, content: &[u8], options: &[&str]) -> TestResult<Backend> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join(socket_name);
        let image = dir.path().join("external.img");
        std::fs::write(&image, content)?;
        let daemon = blk_backend(&socket, &image, options, &dir.path().join("blk.log"));
        Ok(Backend {
            daemon,
            socket,
            image,
            dir,
        })
    }
}

/// The entry fields of a vhost-user device with blk's device id.
fn vhost_user_blk() -> serde_json::Value {
    serde_json::json!({"type": "vhost-user", "device_id": 2})
}

/// A rig whose device at [`EXTERNAL`] is served by the backend on `socket` (entry fields
/// `fields`, `socket` added), with a built-in blk at [`BUILT_IN`] if `built_in`.
fn rig(socket: &Path, mut fields: serde_json::Value, built_in: bool) -> Rig {
    fields["socket"] = serde_json::json!(socket);
    Rig::start(RigOptions {
        other_devices: vec![DeviceSpec {
            zone: EXTERNAL.zone,
            addr: EXTERNAL.addr,
            irq: EXTERNAL.irq,
            fields,
        }],
        ..RigOptions::new(if built_in { &[BUILT_IN] } else { &[] })
    })
}

#[test]
fn an_external_blk_backend_serves_the_zone_and_survives_driver_resets() -> TestResult {
    let backend = Backend::start("resets.sock")?;
    let rig = rig(&backend.socket, vhost_user_blk(), false);
    let mmio = rig.mmio(EXTERNAL, 0);
    assert_eq!(mmio.probe()?, 2, "the configured device id");
    let offered = mmio.device_features()?;
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0, "{offered:#x}");
    assert_eq!(
        offered & (1 << 30),
        0,
        "vhost-user's PROTOCOL_FEATURES offered to the driver: {offered:#x}"
    );
    mmio.write(reg::QUEUE_SEL, 0)?;
    assert_eq!(
        mmio.read(reg::QUEUE_NUM_MAX)?,
        u32::from(DEFAULT_QUEUE_SIZE)
    );
    // The capacity in config space comes from the backend: the image's sectors.
    let capacity = mmio.read_sized(reg::CONFIG, 8)?;
    assert_eq!(capacity, IMAGE_SIZE / SECTOR);

    for round in 0..3u32 {
        // Each round resets the device and sets it up again (GET_VRING_BASE stops the ring,
        // the new one starts at index 0 over zeroed rings).
        let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), 64)?;
        for request in 0..8u32 {
            let seed = round * 100 + request;
            write_and_verify(&mut blk, &backend.image, u64::from(seed) * 8, seed)?;
        }
    }
    assert!(!logged(&["resets.sock"]), "no warning about this backend");
    Ok(rig.stop()?)
}

#[test]
fn a_backend_that_dies_leaves_needs_reset_and_the_other_devices_serving() -> TestResult {
    let backend = Backend::start("dying.sock")?;
    let rig = rig(
        &backend.socket,
        serde_json::json!({"type": "blk", "img": "unused"}),
        true,
    );
    let mut external = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), 64)?;
    write_and_verify(&mut external, &backend.image, 0, 1)?;
    let mut built_in = PolledBlk::start(rig.mmio(BUILT_IN, 1), area(4), 64)?;
    write_and_verify(&mut built_in, &rig.images[0], 0, 2)?;
    rig.sim.take_interrupts();

    drop(backend.daemon);
    let killed = Instant::now();
    let mmio = rig.mmio(EXTERNAL, 0);
    let mut status = 0;
    wait_until_within(RECONNECT_WINDOW + TIMEOUT, "DEVICE_NEEDS_RESET", || {
        status = mmio.read(reg::STATUS)?;
        Ok(status & STATUS_NEEDS_RESET != 0)
    })?;
    assert!(
        killed.elapsed() >= RECONNECT_WINDOW,
        "DEVICE_NEEDS_RESET before the backend had {RECONNECT_WINDOW:?} to come back"
    );
    assert_eq!(
        status & STATUS_DRIVER_OK,
        STATUS_DRIVER_OK,
        "the driver's bits stay"
    );
    let interrupt = rig
        .sim
        .wait_interrupt(TIMEOUT)
        .ok_or("no configuration-change interrupt")?;
    assert_eq!(
        interrupt,
        DeviceRes {
            target_zone: ZONE,
            irq_id: EXTERNAL.irq
        }
    );
    assert_eq!(mmio.read(reg::INTERRUPT_STATUS)? & INT_CONFIG, INT_CONFIG);
    mmio.write(reg::INTERRUPT_ACK, INT_CONFIG)?;
    assert!(logged(&[
        "zone1-blk1@0xa003c00",
        "did not come back",
        "dying.sock"
    ]));
    // Accesses to the dead device are still answered: config space reads 0.
    assert_eq!(mmio.read_sized(reg::CONFIG, 8)?, 0);
    // A request to it is taken but never completed, while the built-in device goes on.
    external.post(BLK_T_OUT, 0, Payload::Out(&pattern(3, 512)))?;
    for seed in 10..20 {
        write_and_verify(&mut built_in, &rig.images[0], u64::from(seed), seed)?;
    }
    // The driver's reset clears the bit; with no backend it comes back at FEATURES_OK.
    mmio.write(reg::STATUS, 0)?;
    assert_eq!(mmio.read(reg::STATUS)?, 0);
    Ok(rig.stop()?)
}

#[test]
fn a_backend_that_comes_back_gets_its_rings_where_they_were() -> TestResult {
    let backend = Backend::start("restart.sock")?;
    let rig = rig(&backend.socket, vhost_user_blk(), false);
    let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), 64)?;
    for seed in 0..5 {
        write_and_verify(&mut blk, &backend.image, u64::from(seed) * 8, seed)?;
    }
    drop(backend.daemon);
    // Posted while no backend runs: served by the next one.
    let data = pattern(77, 4096);
    let head = blk.post(BLK_T_OUT, 200, Payload::Out(&data))?;
    std::thread::sleep(Duration::from_millis(200));
    let _backend = blk_backend(
        &backend.socket,
        &backend.image,
        &[],
        &backend.dir.path().join("blk2.log"),
    );
    let (status, _) = blk.complete(head)?;
    assert_eq!(status, BLK_S_OK);
    assert!(image_bytes(&backend.image, 200, data.len()) == data);
    for seed in 5..10 {
        write_and_verify(&mut blk, &backend.image, u64::from(seed) * 8, seed)?;
    }
    let mmio = rig.mmio(EXTERNAL, 0);
    assert_eq!(
        mmio.read(reg::STATUS)? & STATUS_NEEDS_RESET,
        0,
        "a backend back in time needs no reset"
    );
    assert!(logged(&[
        "zone1-vhost-user0@0xa003c00",
        "hung up",
        "reconnecting"
    ]));
    Ok(rig.stop()?)
}

/// The requests of one batch of [`kill_mid_flight`]:
/// one per slot, each with buffers of its own. Writes go to one half of the image, reads to
/// the other, so a request served twice or late cannot change what another one reads.
struct KillBatch {
    /// Head -> slot.
    heads: HashMap<u16, usize>,
    /// The used index before the batch.
    used_before: u16,
    number: usize,
}

impl KillBatch {
    const SLOTS: usize = 40;
    /// The largest request, and each slot's stretch of one half of the image.
    const CHUNK: usize = 64 << 10;
    const IMAGE_LEN: usize = 2 * Self::SLOTS * Self::CHUNK;

    fn buffers(slot: usize) -> RequestBuffers {
        let stride = 4096 + Self::CHUNK as u64;
        RequestBuffers::at(
            GuestAddress(area(1).0 + slot as u64 * stride),
            Self::CHUNK as u32,
        )
    }

    /// Whether slot `slot` of batch `number` reads, and its length: 4 to 64 KiB, so that the
    /// requests taken together complete in another order.
    fn request(number: usize, slot: usize) -> (bool, usize) {
        (slot % 3 == 0, 4096 * (1 + (slot * 7 + number) % 16))
    }

    /// Where slot `slot` writes (`written` half) or reads (the other half) in batch `number`.
    fn offset(number: usize, slot: usize, written: bool) -> usize {
        let half = (number + usize::from(!written)) % 2;
        (half * Self::SLOTS + slot) * Self::CHUNK
    }

    fn data(number: usize, slot: usize, len: usize) -> Vec<u8> {
        pattern((number * Self::SLOTS + slot) as u32, len)
    }

    /// Batch `number` made available all at once, with one notification.
    fn submit(blk: &mut PolledBlk, number: usize) -> TestResult<Self> {
        let used_before = blk.queue.device_used_idx(blk.memory)?;
        let mut heads = HashMap::new();
        for slot in 0..Self::SLOTS {
            let (read, len) = Self::request(number, slot);
            let offset = Self::offset(number, slot, !read);
            let data = Self::data(number, slot, len);
            let (request_type, payload) = if read {
                (BLK_T_IN, Payload::In(len as u32))
            } else {
                (BLK_T_OUT, Payload::Out(&data))
            };
            let chain = Self::buffers(slot).chain(
                blk.memory,
                request_type,
                (offset as u64) / SECTOR,
                payload,
            )?;
            heads.insert(blk.queue.add(blk.memory, &chain)?, slot);
        }
        blk.mmio.notify(0)?;
        Ok(KillBatch {
            heads,
            used_before,
            number,
        })
    }

    /// Requests of the batch the device has put in the used ring.
    fn answered(&self, blk: &PolledBlk) -> TestResult<usize> {
        let used = blk.queue.device_used_idx(blk.memory)?;
        Ok(usize::from(used.wrapping_sub(self.used_before)))
    }

    /// Reaps the whole batch: every request must come back once, OK, reads with what `image`
    /// (the expected content) holds, and nothing after it; then applies its writes to `image`.
    fn complete(mut self, blk: &mut PolledBlk, image: &mut [u8]) -> TestResult {
        let deadline = Instant::now() + TIMEOUT;
        while !self.heads.is_empty() {
            let Some((head, _)) = blk.queue.take_used(blk.memory).map_err(|error| {
                format!("batch {}: a request came back twice: {error}", self.number)
            })?
            else {
                if Instant::now() > deadline {
                    let mut lost: Vec<usize> = self.heads.values().copied().collect();
                    lost.sort_unstable();
                    return Err(format!(
                        "batch {}: slots {lost:?} never completed (lost)",
                        self.number
                    )
                    .into());
                }
                std::thread::yield_now();
                continue;
            };
            let slot = self.heads.remove(&head).expect("take_used knows the head");
            let buffers = Self::buffers(slot);
            assert_eq!(
                buffers.status(blk.memory)?,
                BLK_S_OK,
                "batch {} slot {slot}",
                self.number
            );
            let (read, len) = Self::request(self.number, slot);
            if read {
                let offset = Self::offset(self.number, slot, false);
                assert!(
                    buffers.data(blk.memory, len as u32)? == image[offset..offset + len],
                    "batch {} slot {slot}: the read returned other data",
                    self.number
                );
            }
        }
        // A request served twice would show up after the batch.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            self.answered(blk)?,
            Self::SLOTS,
            "batch {}: more used entries than requests",
            self.number
        );
        for slot in 0..Self::SLOTS {
            let (read, len) = Self::request(self.number, slot);
            if !read {
                let offset = Self::offset(self.number, slot, true);
                image[offset..offset + len].copy_from_slice(&Self::data(self.number, slot, len));
            }
        }
        blk.mmio.acknowledge_interrupt()?;
        Ok(())
    }
}

/// Our blk on an O_DIRECT image (io_uring: requests taken together complete out of order) is
/// SIGKILLed with many requests in flight, several times, and restarted on the same socket. The
/// daemon hands each new process the inflight region the first one gave, so that it resubmits
/// what its predecessor left in flight: every request completes exactly once, with the right
/// data. (Resuming at the used index alone would serve completed requests again and never serve
/// some that were taken before them.) After the driver's reset, a fresh region does the same.
#[test]
fn a_backend_killed_mid_flight_completes_every_request_once() -> TestResult {
    let mut image = pattern(5, KillBatch::IMAGE_LEN);
    let mut backend = Backend::start_with("inflight.sock", &image, &["--direct"])?;
    let rig = rig(&backend.socket, vhost_user_blk(), false);
    let mut batches = 0;
    let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), DEFAULT_QUEUE_SIZE)?;
    kill_mid_flight(&mut blk, &mut backend, &mut image, &mut batches, 3)?;
    let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), DEFAULT_QUEUE_SIZE)?;
    kill_mid_flight(&mut blk, &mut backend, &mut image, &mut batches, 1)?;
    write_and_verify(&mut blk, &backend.image, 0, 99)?;
    image[..4096].copy_from_slice(&pattern(99, 4096));
    assert!(
        std::fs::read(&backend.image)? == image,
        "the image differs from what was written"
    );
    let resubmitted = (1..=batches)
        .filter_map(|n| {
            std::fs::read_to_string(backend.dir.path().join(format!("blk{n}.log"))).ok()
        })
        .filter(|log| log.contains("resubmitting"))
        .count();
    assert!(resubmitted > 0, "no restarted backend resubmitted anything");
    assert!(!logged(&["inflight.sock", "no inflight region"]));
    assert_eq!(
        blk.mmio.read(reg::STATUS)? & STATUS_NEEDS_RESET,
        0,
        "a backend back in time needs no reset"
    );
    Ok(rig.stop()?)
}

/// Runs batches through `blk` until `kills` of them have had `backend` SIGKILLed (and restarted
/// on its socket) with requests in flight, checking each batch against `image` and applying its
/// writes; `batches` counts the batches of the test, which name the restarted backends' logs.
fn kill_mid_flight(
    blk: &mut PolledBlk,
    backend: &mut Backend,
    image: &mut [u8],
    batches: &mut usize,
    kills: usize,
) -> TestResult {
    let first = *batches;
    let mut killed = 0;
    while killed < kills {
        assert!(
            *batches - first < 40,
            "{killed} kill(s) mid-flight in {} batches",
            *batches - first
        );
        let batch = KillBatch::submit(blk, *batches)?;
        *batches += 1;
        // Once a quarter is answered, most of the rest is in flight.
        let deadline = Instant::now() + TIMEOUT;
        while batch.answered(blk)? < KillBatch::SLOTS / 4 {
            assert!(
                Instant::now() < deadline,
                "batch {} not served",
                batch.number
            );
            std::hint::spin_loop();
        }
        backend.daemon.signal(libc::SIGKILL);
        backend
            .daemon
            .wait_exit(TIMEOUT)
            .ok_or("SIGKILL did not end the backend")?;
        let answered = batch.answered(blk)?;
        if answered < KillBatch::SLOTS {
            killed += 1;
            eprintln!(
                "batch {}: killed with {answered} of {} requests answered",
                batch.number,
                KillBatch::SLOTS
            );
        }
        backend.daemon = blk_backend(
            &backend.socket,
            &backend.image,
            &["--direct"],
            &backend.dir.path().join(format!("blk{batches}.log")),
        );
        batch.complete(blk, image)?;
    }
    Ok(())
}

/// qemu-storage-daemon's export does not track in-flight requests (it does not offer
/// INFLIGHT_SHMFD): killed and restarted, it gets its ring back at the used index, which serves
/// a request it left in flight exactly once when that is the only one.
#[test]
fn qemu_storage_daemon_restarted_resumes_at_the_used_index() -> TestResult {
    let Some(mut qsd) = StorageDaemon::start_on(IMAGE_SIZE, "qsd-restarted.sock") else {
        return Ok(());
    };
    let rig = rig(&qsd.socket, vhost_user_blk(), false);
    let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), DEFAULT_QUEUE_SIZE)?;
    write_and_verify(&mut blk, &qsd.image, 0, 1)?;
    for round in 0..3u32 {
        let sector = 8 * u64::from(round + 1);
        let data = pattern(round + 10, 64 << 10);
        let head = blk.post(BLK_T_OUT, sector, Payload::Out(&data))?;
        qsd.restart();
        let (status, _) = blk.complete(head)?;
        assert_eq!(status, BLK_S_OK, "round {round}");
        assert!(
            image_bytes(&qsd.image, sector, data.len()) == data,
            "round {round}: the write is not in the image"
        );
        write_and_verify(&mut blk, &qsd.image, 1000 + sector, round)?;
    }
    assert_eq!(blk.mmio.read(reg::STATUS)? & STATUS_NEEDS_RESET, 0);
    Ok(rig.stop()?)
}

/// A backend that stops answering (SIGSTOP) is cut off after the reply timeout: the access
/// waiting on it is answered, and once the backend runs again it is reconnected with its ring.
#[test]
fn a_backend_that_stops_answering_is_cut_off_and_reconnected() -> TestResult {
    let backend = Backend::start("paused.sock")?;
    let rig = rig(&backend.socket, vhost_user_blk(), false);
    let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), 64)?;
    write_and_verify(&mut blk, &backend.image, 0, 1)?;
    backend.daemon.signal(libc::SIGSTOP);
    wait_until("the backend to stop", || {
        Ok(all_threads_stopped(backend.daemon.pid()))
    })?;
    let mmio = rig.mmio(EXTERNAL, 0);
    let asked = Instant::now();
    assert_eq!(
        mmio.read_sized(reg::CONFIG, 8)?,
        0,
        "a config read the backend does not answer"
    );
    let waited = asked.elapsed();
    assert!(
        waited >= REPLY_TIMEOUT && waited < REPLY_TIMEOUT + Duration::from_secs(2),
        "answered after {waited:?}"
    );
    backend.daemon.signal(libc::SIGCONT);
    // Config reads are answered 0 at once while the daemon reconnects.
    wait_until("the reconnection", || {
        Ok(mmio.read_sized(reg::CONFIG, 8)? == IMAGE_SIZE / SECTOR)
    })?;
    write_and_verify(&mut blk, &backend.image, 8, 2)?;
    assert_eq!(mmio.read(reg::STATUS)? & STATUS_NEEDS_RESET, 0);
    assert!(logged(&[
        "paused.sock",
        "GET_CONFIG failed",
        "no answer within 2s"
    ]));
    Ok(rig.stop()?)
}

/// A ring the backend refuses (larger than it takes) sets DEVICE_NEEDS_RESET with the
/// connection kept: after the driver's reset a ring it takes works.
#[test]
fn a_refused_ring_sets_needs_reset_and_keeps_the_connection() -> TestResult {
    let backend = Backend::start("refusing.sock")?;
    // `hvisor-vhost blk` takes rings of up to 256 entries.
    let rig = rig(
        &backend.socket,
        serde_json::json!({"type": "vhost-user", "device_id": 2, "queue_size": 512}),
        false,
    );
    let mmio = rig.mmio(EXTERNAL, 0);
    mmio.initialize(VIRTIO_F_VERSION_1)?;
    mmio.write(reg::QUEUE_SEL, 0)?;
    assert_eq!(mmio.read(reg::QUEUE_NUM_MAX)?, 512);
    mmio.setup_queue(0, 512, area(0))?;
    assert_eq!(
        mmio.read(reg::STATUS)? & STATUS_NEEDS_RESET,
        STATUS_NEEDS_RESET
    );
    let interrupt = rig.sim.wait_interrupt(TIMEOUT).ok_or("no interrupt")?;
    assert_eq!(interrupt.irq_id, EXTERNAL.irq);
    assert_eq!(mmio.acknowledge_interrupt()?, INT_CONFIG);
    assert!(logged(&[
        "zone1-vhost-user0@0xa003c00",
        "refusing.sock refused SET_VRING_NUM",
        "DEVICE_NEEDS_RESET set"
    ]));
    // Nor does it make an inflight region for rings that large: not tracked, and no error.
    assert!(logged(&[
        "refusing.sock offers INFLIGHT_SHMFD but gave no inflight region for 1 queue(s) of \
         512 entries"
    ]));
    let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), 256)?;
    write_and_verify(&mut blk, &backend.image, 0, 5)?;
    assert_eq!(mmio.read(reg::STATUS)? & STATUS_NEEDS_RESET, 0);
    assert!(!logged(&["refusing.sock", "reconnecting"]));
    Ok(rig.stop()?)
}

#[test]
fn an_external_rng_backend_fills_buffers_from_its_source() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (source, content) = entropy_source(dir.path())?;
    let socket = dir.path().join("rng.sock");
    let _backend = Daemon::serve_on(
        BINARY,
        "rng",
        &socket,
        &[OsStr::new("--source"), source.as_os_str()],
        &dir.path().join("rng.log"),
        TIMEOUT,
    );
    // hvisor-tool has no rng type; any type takes "socket".
    let rig = rig(&socket, serde_json::json!({"type": "rng"}), false);
    let mmio = MmioGuest::new(&rig.sim, ZONE, EXTERNAL.addr);
    assert_eq!(mmio.probe()?, VIRTIO_ID_RNG);
    mmio.initialize(VIRTIO_F_VERSION_1)?;
    let mut queue = mmio.setup_queue(0, 64, area(0))?;
    mmio.driver_ok()?;
    check_rng_requests(&rig, &mmio, EXTERNAL.irq, &mut queue, &content)?;
    Ok(rig.stop()?)
}

/// The guest-visible part of a feature negotiation the backend does not accept: DriverFeatures
/// beyond the offer are refused by the registers, before any message.
#[test]
fn features_are_checked_against_the_backend_offer() -> TestResult {
    let backend = Backend::start("features.sock")?;
    let rig = rig(&backend.socket, vhost_user_blk(), false);
    let mmio = rig.mmio(EXTERNAL, 0);
    mmio.write(reg::STATUS, 0)?;
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
    mmio.write(reg::DRIVER_FEATURES_SEL, 0)?;
    mmio.write(reg::DRIVER_FEATURES, 1 << 30)?;
    mmio.write(reg::DRIVER_FEATURES_SEL, 1)?;
    mmio.write(reg::DRIVER_FEATURES, 1)?;
    mmio.write(
        reg::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    )?;
    assert_eq!(mmio.read(reg::STATUS)? & STATUS_FEATURES_OK, 0);
    Ok(rig.stop()?)
}

/// `hvisor-vhost hvisor` as a separate process between the simulator (`hvisor-vhost
/// simulate`'s guest, its write/read/verify rounds) and `hvisor-vhost blk`.
#[test]
fn three_processes_simulator_daemon_and_backend() -> TestResult {
    let backend = Backend::start("blk.sock")?;
    simulated_rounds_through_a_daemon(backend.dir.path(), &backend.socket, &backend.image)
}

/// The same three processes with qemu-storage-daemon as the backend.
#[test]
fn three_processes_with_qemu_storage_daemon() -> TestResult {
    let Some(qsd) = StorageDaemon::start(IMAGE_SIZE) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    simulated_rounds_through_a_daemon(dir.path(), &qsd.socket, &qsd.image)
}

/// Runs `hvisor-vhost hvisor` (working in `dir`) for a zone whose blk device is served by the
/// backend on `socket`, drives it with the simulator's guest (32 rounds of 64 KiB written, read
/// back and compared), checks the last round's data in `image`, and stops the daemon.
fn simulated_rounds_through_a_daemon(dir: &Path, socket: &Path, image: &Path) -> TestResult {
    let config_path = dir.join("virtio_cfg.json");
    let config = serde_json::json!({"zones": [{
        "id": ZONE,
        "memory_region": [{"zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000",
                           "size": "0x1000000"}],
        "devices": [{"type": "blk", "img": "ignored.img", "socket": socket,
                     "addr": "0xa003c00", "len": "0x200", "irq": 78, "status": "enable"}],
    }]});
    std::fs::write(&config_path, config.to_string())?;
    let config = VirtioConfig::from_file(&config_path)?;
    let sim = Simulator::new(&config, SimOptions::default())?;
    let hypervisor = dir.join("hv.sock");
    let attaching = {
        let (sim, hypervisor) = (sim.clone(), hypervisor.clone());
        std::thread::spawn(move || sim.listen_and_attach(&hypervisor))
    };
    while !hypervisor.exists() {
        assert!(!attaching.is_finished(), "the simulator stopped listening");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut command = Command::new(BINARY);
    command
        .arg("hvisor")
        .arg("--config")
        .arg(&config_path)
        .arg("--hypervisor-socket")
        .arg(&hypervisor)
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn(command, &dir.join("daemon.log"));
    join_within(attaching, "the hand-off")?;
    hvisor_sim::guest::exercise_all(&sim, &config, 32)?;
    // The last round's pattern is in the image: round 31 wrote 64 KiB at block 31.
    let round = 31u32;
    let expected: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i ^ round.wrapping_mul(0x9e37_79b9)) as u8)
        .collect();
    assert!(image_bytes(image, u64::from(round) * 128, expected.len()) == expected);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(TIMEOUT).ok_or("the daemon did not stop")?;
    assert!(status.success(), "{status}:\n{}", daemon.log());
    sim.detach();
    let log = daemon.log();
    assert!(
        log.contains("zone1-blk0@0xa003c00: vhost-user backend at") && log.contains("device id 2"),
        "{log}"
    );
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
    Ok(())
}

/// qemu-storage-daemon's vhost-user-blk export (QEMU's libvhost-user, which answers GET_CONFIG
/// from the start of config space whatever offset is asked for) serves the zone next to a
/// built-in blk: config fields read at their own offsets, write/read/verify rounds and flushes
/// across driver resets, the data checked in its image.
#[test]
fn qemu_storage_daemon_serves_the_zone_across_driver_resets() -> TestResult {
    let Some(qsd) = StorageDaemon::start(IMAGE_SIZE) else {
        return Ok(());
    };
    let rig = rig(
        &qsd.socket,
        serde_json::json!({"type": "blk", "img": "unused"}),
        true,
    );
    let mmio = rig.mmio(EXTERNAL, 0);
    assert_eq!(mmio.probe()?, 2);
    let offered = mmio.device_features()?;
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0, "{offered:#x}");
    assert_eq!(mmio.read_sized(reg::CONFIG, 8)?, IMAGE_SIZE / SECTOR);
    // blk_size (offset 20) and num_queues (offset 34), behind the capacity.
    assert_ne!(offered & VIRTIO_BLK_F_BLK_SIZE, 0, "{offered:#x}");
    assert_eq!(mmio.read(reg::CONFIG + 20)?, SECTOR as u32);
    assert_ne!(offered & VIRTIO_BLK_F_MQ, 0, "{offered:#x}");
    assert_eq!(mmio.read_sized(reg::CONFIG + 34, 2)?, 1);
    for round in 0..3u32 {
        let mut blk = PolledBlk::start(rig.mmio(EXTERNAL, 0), area(0), 128)?;
        for request in 0..8u32 {
            let seed = round * 100 + request;
            write_and_verify(&mut blk, &qsd.image, u64::from(seed) * 8, seed)?;
        }
        let flush = blk.post(T_FLUSH, 0, Payload::None)?;
        assert_eq!(blk.complete(flush)?.0, BLK_S_OK, "flush status");
    }
    let mut built_in = PolledBlk::start(rig.mmio(BUILT_IN, 1), area(4), 64)?;
    write_and_verify(&mut built_in, &rig.images[0], 0, 7)?;
    assert!(!logged(&["vhost-user-blk.sock"]), "no warning about qsd");
    Ok(rig.stop()?)
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/PID/task/*/stat`):
/// `kill` returns before the threads of a process sent SIGSTOP have all stopped.
fn all_threads_stopped(pid: libc::pid_t) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}
