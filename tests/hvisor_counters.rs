//! The hvisor daemon's counters (README.md, "Counters"): each request, answer, notify, chain,
//! byte and interrupt the simulator causes is counted exactly once, in the right place; and
//! the daemon binary prints them on SIGUSR1 and at exit, on stderr and in `--counters-file`.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use hvisor_sim::guest::BlkGuest;
use hvisor_sim::{SimOptions, Simulator};
use hvisor_transport::abi::DeviceReq;
use hvisor_transport::config::VirtioConfig;
use hvisor_transport::counters::{Reason, RingSnapshot, Snapshot};
use hvisor_transport::mmio::reg;
use serde_json::{Value, json};
use support::daemon::Daemon;
use support::hvisor::*;
use vm_memory::GuestAddress;

const ZONE: u32 = 1;
const BLK: BlkSpec = BlkSpec {
    zone: ZONE,
    addr: 0xa00_3c00,
    irq: 78,
};
const MAGIC: u32 = 0x7472_6976;
/// A blk request header: type, reserved, sector.
const HEADER: u64 = 16;

fn snapshot(rig: &Rig) -> Snapshot {
    rig.counters.snapshot(Reason::Signal)
}

fn sent_by_simulator(rig: &Rig) -> (u64, u64) {
    let stats = &rig.sim.stats;
    (
        stats.requests.load(Relaxed),
        stats.wakeups_sent.load(Relaxed),
    )
}

/// Sleeps and wake-ups pair up: every wake-up (the hypervisor's, or a posted interrupt's) ends
/// a sleep, and only the current sleep may be still waiting for its own.
fn assert_sleeps_pair_with_wakeups(ring: &RingSnapshot, wakeups_sent: u64) {
    let ended = ring.wakeups + ring.interrupt_wakeups;
    assert!(ended <= ring.sleeps, "{ring:?}");
    assert!(ring.sleeps - ended <= 1, "{ring:?}");
    assert!(
        ring.wakeups <= wakeups_sent,
        "{ring:?}, {wakeups_sent} sent"
    );
}

#[test]
fn every_request_answer_notify_chain_byte_and_interrupt_is_counted_once() -> TestResult {
    const READS: u64 = 40;
    const ROUNDS: u64 = 8;
    const LEN: usize = 4096;
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let start = snapshot(&rig);
    assert_eq!(start.version, 1);
    // Idle so far: it may have polled and gone to sleep, nothing else.
    let idle = RingSnapshot {
        poll_misses: start.ring.poll_misses,
        sleeps: start.ring.sleeps,
        ..RingSnapshot::default()
    };
    assert_eq!(start.ring, idle);
    let device = &start.devices[..];
    assert_eq!(device.len(), 1);
    assert_eq!(device[0].name, "zone1-blk0@0xa003c00");
    assert_eq!((device[0].kind.as_str(), device[0].zone), ("blk", ZONE));
    assert_eq!(device[0].addr, BLK.addr);

    let mmio = rig.mmio(BLK, 0);
    for _ in 0..READS {
        assert_eq!(mmio.read(reg::MAGIC_VALUE)?, MAGIC);
    }
    // Counted before the answer: no wait needed.
    let reads = snapshot(&rig);
    assert_eq!(reads.ring.requests, READS);
    assert_eq!(reads.ring.sync_answers, READS);
    assert_eq!(reads.ring.posted_notifies, 0);
    assert_eq!(reads.devices[0].reads, READS);
    assert_eq!(reads.devices[0].writes, 0);

    let mut driver = PolledBlk::start(rig.mmio(BLK, 0), area(0), 64)?;
    for round in 0..ROUNDS {
        let data = pattern(round as u32, LEN);
        assert_eq!(driver.write(round * 8, &data)?, BLK_S_OK);
        let (status, read) = driver.read(round * 8, LEN as u32)?;
        assert_eq!(status, BLK_S_OK);
        assert!(read == data, "round {round} read back other data");
    }
    let requests = 2 * ROUNDS;
    for taken in 0..requests {
        rig.sim
            .wait_interrupt(TIMEOUT)
            .ok_or_else(|| format!("interrupt {taken} of {requests} not delivered"))?;
    }
    assert_eq!(rig.sim.wait_interrupt(Duration::from_millis(50)), None);
    // Requests are handled in ring order: once this read is answered, the posted notifies
    // before it were handled too.
    assert_eq!(driver.mmio.read(reg::MAGIC_VALUE)?, MAGIC);
    wait_until("the last interrupt counted", || {
        Ok(snapshot(&rig).devices[0].interrupts == requests)
    })?;

    let end = snapshot(&rig);
    let (sent, wakeups_sent) = sent_by_simulator(&rig);
    assert_eq!(end.ring.requests, sent);
    assert_eq!(end.ring.posted_notifies, requests);
    assert_eq!(end.ring.sync_answers, sent - requests);
    assert_eq!(end.ring.errors, 0);
    assert_sleeps_pair_with_wakeups(&end.ring, wakeups_sent);
    assert!(end.ring.poll_misses <= end.ring.sleeps, "{:?}", end.ring);
    assert!(end.ring.poll_hits <= end.ring.requests, "{:?}", end.ring);
    assert_eq!(end.result_ring.full_waits, 0);

    let device = &end.devices[0];
    assert_eq!(
        device.reads + device.writes,
        sent,
        "every access was the device's"
    );
    assert_eq!(device.notifies, requests);
    assert_eq!(device.chains_taken, requests);
    assert_eq!(device.chains_used, requests);
    let len = LEN as u64;
    // A write sends header and data and gets the status byte; a read sends the header and
    // gets data and status.
    assert_eq!(device.bytes_to_device, ROUNDS * (HEADER + len + HEADER));
    assert_eq!(device.bytes_to_driver, ROUNDS * (1 + len + 1));
    // The driver takes each interrupt before it sends the next request.
    assert_eq!(device.signals, requests);
    // The rig's image is a buffered file on io_uring: its page-cache requests are served on
    // the ring thread, and DRIVER_OK's kick wakes the worker.
    assert!(device.inline_kicks >= 1, "{device:?}");
    assert!(
        device.inline_kicks + device.busy_worker_kicks <= device.notifies,
        "{device:?}"
    );
    assert!(device.worker_wakeups >= 1, "{device:?}");
    let problems = [
        device.refused_accesses,
        device.event_errors,
        device.ring_faults,
        device.config_signals,
        device.interrupts_dropped,
    ];
    assert_eq!(problems, [0; 5], "{device:?}");
    Ok(rig.stop()?)
}

/// With a window longer than the test, the daemon never sleeps: every request it did not find
/// right after the previous one is a poll hit.
#[test]
fn a_poll_window_that_never_ends_finds_requests_without_sleeping() -> TestResult {
    const READS: u64 = 20;
    let rig = Rig::start(RigOptions {
        poll: Duration::from_secs(60),
        ..RigOptions::new(&[BLK])
    });
    let mmio = rig.mmio(BLK, 0);
    for _ in 0..READS {
        assert_eq!(mmio.read(reg::MAGIC_VALUE)?, MAGIC);
    }
    let ring = snapshot(&rig).ring;
    assert_eq!(ring.requests, READS);
    assert!((1..=READS).contains(&ring.poll_hits), "{ring:?}");
    assert_eq!((ring.poll_misses, ring.sleeps, ring.wakeups), (0, 0, 0));
    assert_eq!(
        sent_by_simulator(&rig).1,
        0,
        "the daemon asked for a wake-up"
    );
    Ok(rig.stop()?)
}

/// Without a window, the daemon sleeps after every request and polls never.
#[test]
fn without_a_poll_window_every_idle_ring_is_slept_on() -> TestResult {
    const READS: u64 = 20;
    let rig = Rig::start(RigOptions {
        poll: Duration::ZERO,
        ..RigOptions::new(&[BLK])
    });
    let mmio = rig.mmio(BLK, 0);
    for _ in 0..READS {
        assert_eq!(mmio.read(reg::MAGIC_VALUE)?, MAGIC);
        thread::sleep(Duration::from_millis(1));
    }
    let ring = snapshot(&rig).ring;
    assert_eq!(ring.requests, READS);
    assert_eq!((ring.poll_hits, ring.poll_misses), (0, 0), "{ring:?}");
    assert!(ring.sleeps >= 1 && ring.wakeups >= 1, "{ring:?}");
    assert_sleeps_pair_with_wakeups(&ring, sent_by_simulator(&rig).1);
    Ok(rig.stop()?)
}

#[test]
fn stray_accesses_and_refused_register_accesses_are_counted_as_errors() -> TestResult {
    let rig = Rig::start(RigOptions::new(&[BLK]));
    let sim = &rig.sim;
    let nowhere = 0xa00_0000;
    for _ in 0..3 {
        assert_eq!(sim.access(0, ZONE, nowhere, 4, None, TIMEOUT)?, 0);
    }
    // No access is 3 bytes wide.
    assert_eq!(sim.access(0, ZONE, BLK.addr, 3, None, TIMEOUT)?, 0);
    // A CPU the bridge has no answer slot for.
    assert!(sim.publish_raw(&DeviceReq {
        src_cpu: 40,
        address: BLK.addr,
        size: 4,
        value: 0,
        src_zone: ZONE,
        is_write: false,
        need_interrupt: false,
    }));
    let mmio = rig.mmio(BLK, 1);
    // An unknown register, half a register, a read-only one, a queue that is not ready.
    assert_eq!(mmio.read(0x0f0)?, 0);
    assert_eq!(mmio.read_sized(reg::STATUS, 2)?, 0);
    mmio.write(reg::MAGIC_VALUE, 0)?;
    mmio.notify(0)?;
    assert_eq!(mmio.read(reg::MAGIC_VALUE)?, MAGIC);

    let end = snapshot(&rig);
    let (sent, _) = sent_by_simulator(&rig);
    // `publish_raw` bypasses the simulator's request count.
    assert_eq!(end.ring.requests, sent + 1);
    assert_eq!(end.ring.errors, 3 + 1 + 1);
    assert_eq!(end.ring.posted_notifies, 1);
    assert_eq!(end.ring.sync_answers, end.ring.requests - 1 - 1);
    let device = &end.devices[0];
    assert_eq!(device.refused_accesses, 4, "{device:?}");
    assert_eq!(device.notifies, 0);
    // The unanswerable read still reached the device.
    assert_eq!((device.reads, device.writes), (4, 2));
    Ok(rig.stop()?)
}

/// A `virtio_cfg.json` with one blk device at [`BLK`], on `image`.
fn write_config(dir: &Path, image: &Path) -> std::path::PathBuf {
    let path = dir.join("virtio_cfg.json");
    let config = json!({"zones": [{
        "id": ZONE,
        "memory_region": [{"zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000",
                           "size": "0x400000"}],
        "devices": [{"type": "blk", "addr": format!("{:#x}", BLK.addr), "len": "0x200",
                     "irq": BLK.irq, "status": "enable", "img": image}],
    }]});
    std::fs::write(&path, config.to_string()).expect("writing the configuration");
    path
}

/// The counters reports in the daemon's log, in order.
fn reports(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| line.strip_prefix("hvisor-vhost-counters "))
        .map(|json| serde_json::from_str(json).expect("a report is one JSON object"))
        .collect()
}

fn wait_for_reports(daemon: &Daemon, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let found = reports(&daemon.log());
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{count} counters reports expected within {TIMEOUT:?}:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_daemon_reports_its_counters_on_sigusr1_and_at_exit() -> TestResult {
    const READS: u64 = 25;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)?.set_len(IMAGE_SIZE)?;
    let config_path = write_config(dir.path(), &image);
    let config = VirtioConfig::from_file(&config_path)?;
    let sim = Simulator::new(&config, SimOptions::default())?;
    let socket = dir.path().join("hv.sock");
    let attaching = {
        let (sim, socket) = (sim.clone(), socket.clone());
        thread::spawn(move || sim.listen_and_attach(&socket))
    };
    while !socket.exists() {
        assert!(!attaching.is_finished(), "the simulator stopped listening");
        thread::sleep(Duration::from_millis(5));
    }
    let counters_file = dir.path().join("counters.jsonl");
    let mut command = Command::new(env!("CARGO_BIN_EXE_hvisor-vhost"));
    command
        .arg("hvisor")
        .arg("--config")
        .arg(&config_path)
        .arg("--hypervisor-socket")
        .arg(&socket)
        .arg("--counters-file")
        .arg(&counters_file)
        // Reports do not depend on the log level.
        .env("RUST_LOG", "warn");
    let mut daemon = Daemon::spawn(command, &dir.path().join("daemon.log"));
    join_within(attaching, "the hand-off")?;

    let mmio = hvisor_sim::guest::MmioGuest::new(&sim, ZONE, BLK.addr);
    for _ in 0..READS {
        assert_eq!(mmio.read(reg::MAGIC_VALUE)?, MAGIC);
    }
    daemon.signal(libc::SIGUSR1);
    let first = wait_for_reports(&daemon, 1).remove(0);
    assert_eq!(first["version"], 1);
    assert_eq!(first["reason"], "signal");
    assert_eq!(first["ring"]["requests"], READS);
    assert_eq!(first["ring"]["sync_answers"], READS);
    let device = &first["devices"][0];
    assert_eq!(device["name"], "zone1-blk0@0xa003c00");
    assert_eq!(device["type"], "blk");
    assert_eq!(device["reads"], READS);

    let mut blk = BlkGuest::start(&sim, ZONE, BLK.addr, GuestAddress(0x5010_0000), 64, 4096)?;
    assert_eq!(blk.write(0, &pattern(1, 4096))?, BLK_S_OK);
    let (status, data) = blk.read(0, 4096)?;
    assert_eq!(status, BLK_S_OK);
    assert!(data == pattern(1, 4096));
    drop(blk);
    let sent = sim.stats.requests.load(Relaxed);

    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(TIMEOUT)
        .ok_or("the daemon did not stop on SIGTERM")?;
    assert!(status.success(), "{status}:\n{}", daemon.log());
    sim.detach();
    let log = daemon.log();
    let all = reports(&log);
    assert_eq!(
        all.len(),
        2,
        "one report per SIGUSR1 and one at exit:\n{log}"
    );
    let last = &all[1];
    assert_eq!(last["reason"], "exit");
    assert_eq!(last["ring"]["requests"], sent);
    assert_eq!(last["ring"]["posted_notifies"], 2);
    let device = &last["devices"][0];
    assert_eq!(device["chains_used"], 2);
    assert_eq!(device["interrupts"], 2);
    assert_eq!(device["bytes_to_driver"], 1 + 4096 + 1);
    // Every field of the README's table, and no other.
    let shape = |value: &Value| -> Vec<String> {
        let mut keys: Vec<String> = value
            .as_object()
            .map(|object| object.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    };
    assert_eq!(
        shape(last),
        [
            "devices",
            "elapsed_ms",
            "reason",
            "result_ring",
            "ring",
            "version"
        ]
    );
    assert_eq!(shape(&last["ring"]).len(), 9);
    assert_eq!(shape(&last["result_ring"]).len(), 2);
    assert_eq!(shape(device).len(), 22);
    // The file holds the same reports, plain JSON one per line.
    let file = std::fs::read_to_string(&counters_file)?;
    let in_file: Vec<Value> = file
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(in_file, all);
    Ok(())
}
