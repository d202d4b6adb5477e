//! Round-trip latency of a synchronous request through the hvisor request ring, in each of the
//! daemon's waiting modes, next to the physical floors measured in the same run:
//!
//! - busy-poll (a poll window longer than the run), against a spin-polled shared-memory
//!   ping-pong between two threads;
//! - the default hybrid (`server::DEFAULT_POLL`, then sleep) and sleep-only (poll 0), against
//!   an eventfd ping-pong;
//! - a virtio-blk 4 KiB read, from the guest's QueueNotify to the interrupt arriving at the
//!   simulated hypervisor (`FINISH_REQ`);
//! - then the daemon idle: how soon it goes to sleep after a request, and the CPU time its
//!   threads use in two idle seconds.
//!
//! The measuring thread plays the vCPU and runs on CPU 1; its partner (the daemon's request
//! loop, or the floors' other side) on CPU 0. On hvisor a zone's vCPUs never share a CPU with
//! root Linux's daemon; left to the scheduler, the two threads can land on one CPU of a loaded
//! two-CPU machine, where the busy-poll window keeps the vCPU thread off that CPU. One extra
//! row shows that case.
//!
//! `cargo run --release --example ring_latency`. Measurements on a shared or loaded machine
//! are noisy, the tails most of all; compare runs made on a quiet one.

#[allow(dead_code)]
#[path = "../tests/support/hvisor.rs"]
mod rig;
#[allow(dead_code)]
#[path = "../tests/support/stress.rs"]
mod stress;

use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hvisor_sim::guest::MmioGuest;
use hvisor_transport::mmio::{MAGIC_VALUE, reg};
use hvisor_transport::server::DEFAULT_POLL;
use virtio_guest_driver::blk::{self, Payload, RequestBuffers};
use vmm_sys_util::eventfd::EventFd;

use rig::{BlkSpec, Rig, RigOptions};
use stress::{Answer, OnStall, Target};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

const BLK: BlkSpec = BlkSpec {
    zone: 1,
    addr: 0xa00_3c00,
    irq: 78,
};
const TARGET: Target = Target {
    zone: BLK.zone,
    base: BLK.addr,
};
/// Samples per mode: enough for a p99.9 resting on 100 samples.
const SAMPLES: usize = 100_000;
/// Each blk request crosses several threads; fewer samples keep the run short.
const BLK_SAMPLES: usize = 20_000;
/// Discarded round trips before each series: caches, page faults, CPU frequency.
const WARM_UP: usize = 2_000;
/// A request unanswered this long is checked for a lost wake-up (see `stress::OnStall`).
const STALL: Duration = Duration::from_millis(100);
/// A poll window no run of this benchmark outlasts: the daemon never sleeps.
const BUSY_POLL: Duration = Duration::from_secs(3600);
/// Samples of the case where the vCPU thread shares the daemon's CPU, which is slow.
const SHARED_CPU_SAMPLES: usize = 20_000;
const IDLE: Duration = Duration::from_secs(2);
const VCPU_CPU: usize = 1;
const PARTNER_CPU: usize = 0;
/// The daemon's threads may use at most this share of one CPU while idle.
const IDLE_CPU_LIMIT: f64 = 0.01;

/// One of the two ping-pong sides on its own cache line, so the two do not share one.
#[repr(align(128))]
struct Line(AtomicU64);

/// Confines thread `tid` (0: the calling thread) to `cpu`. A failure (a machine with one CPU,
/// or a CPU set that excludes it) leaves the thread where it is, with a note.
fn pin(tid: libc::pid_t, cpu: usize) {
    // SAFETY: `cpu_set_t` is a plain bit array, all zeroes is the empty set, CPU_SET only
    // writes inside it (it ignores a `cpu` beyond its size), and sched_setaffinity reads
    // exactly `size_of::<cpu_set_t>()` bytes of it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if result != 0 {
        println!(
            "note: cannot pin thread {tid} to CPU {cpu} ({}); it runs where the scheduler puts it",
            std::io::Error::last_os_error()
        );
    }
}

/// Pins the daemon's request loop (the rig's thread named "daemon") to `cpu`.
fn pin_daemon(cpu: usize) -> Result<()> {
    // A new thread names itself once it runs, which may be a little after the rig started.
    let started = Instant::now();
    loop {
        let daemon = thread_cpu_times()?
            .into_iter()
            .find_map(|(tid, (name, _))| (name == "daemon").then_some(tid));
        if let Some(tid) = daemon {
            pin(libc::pid_t::try_from(tid)?, cpu);
            return Ok(());
        }
        if started.elapsed() > stress::WATCHDOG {
            return Err("no thread named daemon".into());
        }
        thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Clone, Copy)]
struct Percentiles {
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "a series without samples");
        samples.sort_unstable();
        let at = |quantile: f64| {
            let rank = (quantile * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }

    /// Whether no percentile is above `other`'s.
    fn never_worse_than(&self, other: &Percentiles) -> bool {
        self.p50 <= other.p50 && self.p99 <= other.p99 && self.p999 <= other.p999
    }
}

fn micros(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1e6)
}

/// Times `round_trip` `samples` times after a warm-up.
fn series(samples: usize, mut round_trip: impl FnMut(u64) -> Result<()>) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(samples);
    for n in 0..(WARM_UP + samples) as u64 {
        let started = Instant::now();
        round_trip(n)?;
        let elapsed = started.elapsed();
        if n >= WARM_UP as u64 {
            times.push(elapsed);
        }
    }
    Ok(times)
}

/// The floor of busy-polling: a thread stores a number, another spinning on it stores it back.
fn spin_ping_pong() -> Result<Vec<Duration>> {
    const STOP: u64 = u64::MAX;
    let ping = Line(AtomicU64::new(0));
    let pong = Line(AtomicU64::new(0));
    thread::scope(|scope| {
        scope.spawn(|| {
            pin(0, PARTNER_CPU);
            let mut seen = 0;
            loop {
                let value = ping.0.load(Ordering::Acquire);
                if value == seen {
                    std::hint::spin_loop();
                } else if value == STOP {
                    return;
                } else {
                    seen = value;
                    pong.0.store(value, Ordering::Release);
                }
            }
        });
        let times = series(SAMPLES, |n| {
            ping.0.store(n + 1, Ordering::Release);
            while pong.0.load(Ordering::Acquire) != n + 1 {
                std::hint::spin_loop();
            }
            Ok(())
        });
        ping.0.store(STOP, Ordering::Release);
        times
    })
}

/// The floor of sleeping: each side blocks reading its eventfd until the other writes it.
/// With `spin_reply`, the answer comes back through spun-on memory instead, as the ring's
/// answers do: one sleep and wake-up per round trip rather than two.
fn eventfd_ping_pong(spin_reply: bool) -> Result<Vec<Duration>> {
    let there = EventFd::new(0)?;
    let back = EventFd::new(0)?;
    let pong = Line(AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| {
            pin(0, PARTNER_CPU);
            let mut answered = 0;
            while there.read().is_ok() && !stop.load(Ordering::Relaxed) {
                answered += 1;
                let sent = if spin_reply {
                    pong.0.store(answered, Ordering::Release);
                    Ok(())
                } else {
                    back.write(1)
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        let times = series(SAMPLES, |n| {
            there.write(1)?;
            if spin_reply {
                while pong.0.load(Ordering::Acquire) != n + 1 {
                    std::hint::spin_loop();
                }
            } else {
                back.read()?;
            }
            Ok(())
        });
        stop.store(true, Ordering::Relaxed);
        // Wakes the partner to see `stop`.
        there.write(1)?;
        times
    })
}

/// A daemon with busy-poll window `poll`, serving one blk device on a temporary image, its
/// request loop on `cpu`.
fn start_daemon(poll: Duration, cpu: usize) -> Result<Rig> {
    let rig = Rig::start(RigOptions {
        poll,
        ..RigOptions::new(&[BLK])
    });
    pin_daemon(cpu)?;
    Ok(rig)
}

struct RingSeries {
    times: Vec<Duration>,
    /// Requests that needed a wake-up sent by hand: lost wake-ups.
    rescues: u64,
    /// Wake-ups the protocol sent per request.
    wakeups_per_request: f64,
}

/// `samples` synchronous MagicValue reads by vCPU 0, back to back.
fn ring_round_trips(rig: &Rig, samples: usize) -> Result<RingSeries> {
    let wakeups_before = rig.sim.stats.wakeups_sent.load(Ordering::Relaxed);
    let mut rescues = 0;
    let times = series(samples, |_| {
        let (value, answer) = stress::read_register(
            &rig.sim,
            0,
            TARGET,
            reg::MAGIC_VALUE,
            STALL,
            OnStall::Rescue,
        )?;
        if value != u64::from(MAGIC_VALUE) {
            return Err(format!("MagicValue read {value:#x}").into());
        }
        rescues += u64::from(answer == Answer::Rescued);
        Ok(())
    })?;
    let wakeups = rig.sim.stats.wakeups_sent.load(Ordering::Relaxed) - wakeups_before;
    Ok(RingSeries {
        times,
        rescues,
        wakeups_per_request: wakeups as f64 / (WARM_UP + samples) as f64,
    })
}

/// 4 KiB reads of a blk device, one at a time: from the QueueNotify write (a posted request)
/// to the interrupt reaching the simulator's pending list. Polled (with yields) rather than
/// waited for, so the time does not include waking a sleeping vCPU thread.
fn blk_notify_to_interrupt(rig: &Rig) -> Result<Vec<Duration>> {
    const QUEUE_SIZE: u16 = 64;
    const READ_LEN: u32 = 4096;
    let memory = rig.memory(BLK.zone);
    let mmio = MmioGuest::new(&rig.sim, BLK.zone, BLK.addr);
    let device = mmio.probe()?;
    if device != blk::DEVICE_ID {
        return Err(format!("device id {device} is not blk").into());
    }
    mmio.initialize(rig::VIRTIO_F_VERSION_1)?;
    let at = rig::area(0);
    let mut queue = mmio.setup_queue(0, QUEUE_SIZE, at)?;
    mmio.driver_ok()?;
    let buffers = RequestBuffers::at(queue.layout.end(), READ_LEN);
    rig.sim.take_interrupts();
    let mut times = Vec::with_capacity(BLK_SAMPLES);
    for n in 0..WARM_UP + BLK_SAMPLES {
        // The same request every time: a read of sector 0, which stays in the page cache.
        let chain = buffers.chain(memory, blk::T_IN, 0, Payload::In(READ_LEN))?;
        let head = queue.add(memory, &chain)?;
        let notified = Instant::now();
        mmio.notify(0)?;
        while rig.sim.take_interrupts().is_empty() {
            if notified.elapsed() > stress::WATCHDOG {
                return Err(format!(
                    "blk request {n}: no interrupt within {:?}; ring state: {}",
                    stress::WATCHDOG,
                    rig.sim.ring_state(0)
                )
                .into());
            }
            thread::yield_now();
        }
        let elapsed = notified.elapsed();
        if n >= WARM_UP {
            times.push(elapsed);
        }
        mmio.acknowledge_interrupt()?;
        match queue.pop_used(memory)? {
            Some((used, _)) if used == head => {}
            other => return Err(format!("blk request {n}: used ring shows {other:?}").into()),
        }
        let written = buffers.status(memory)?;
        if written != blk::S_OK {
            return Err(format!("blk request {n}: status {written}").into());
        }
    }
    Ok(times)
}

/// How long after answering a request the daemon announces it is going to sleep.
fn idle_transitions(rig: &Rig, count: usize) -> Result<Vec<Duration>> {
    let need_wakeup = &rig.sim.bridge().need_wakeup;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        stress::read_register(&rig.sim, 0, TARGET, reg::MAGIC_VALUE, STALL, OnStall::Fail)?;
        // The daemon cleared `need_wakeup` before answering, so it stays 0 until it sleeps.
        let answered = Instant::now();
        while need_wakeup.load(Ordering::Relaxed) != 1 {
            if answered.elapsed() > stress::WATCHDOG {
                return Err("the daemon did not go to sleep within a second".into());
            }
            std::hint::spin_loop();
        }
        times.push(answered.elapsed());
        // Let it fall asleep for real before the next request.
        thread::sleep(Duration::from_millis(1));
    }
    Ok(times)
}

/// CPU time each thread of this process has used so far, by thread id: (name, time).
fn thread_cpu_times() -> Result<HashMap<u32, (String, Duration)>> {
    let mut times = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let path = entry?.path();
        let Some(tid) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        // A thread that ended meanwhile has no files left: skip it.
        let (Ok(name), Ok(schedstat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        // schedstat: nanoseconds on the CPU, then waiting, then time slices.
        let on_cpu: u64 = schedstat
            .split_whitespace()
            .next()
            .and_then(|field| field.parse().ok())
            .ok_or("unreadable schedstat")?;
        times.insert(tid, (name.trim().to_owned(), Duration::from_nanos(on_cpu)));
    }
    Ok(times)
}

/// CPU time of the daemon's threads (every thread but this one and the simulator's) while
/// nothing happens for [`IDLE`]; prints each busy thread.
fn idle_cpu() -> Result<Duration> {
    let before = thread_cpu_times()?;
    thread::sleep(IDLE);
    let after = thread_cpu_times()?;
    let main = std::process::id();
    let mut total = Duration::ZERO;
    for (tid, (name, time)) in &after {
        if *tid == main || name == "sim-results" {
            continue;
        }
        let used = time.saturating_sub(before.get(tid).map_or(Duration::ZERO, |(_, time)| *time));
        if !used.is_zero() {
            println!("  thread {tid} ({name}): {} us", micros(used));
        }
        total += used;
    }
    Ok(total)
}

struct Row {
    name: String,
    samples: usize,
    percentiles: Percentiles,
    /// The floor's name and p50, for the ratio.
    floor: Option<(&'static str, Duration)>,
    wakeups_per_request: Option<f64>,
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<44} {:>7} {:>9} {:>9} {:>9}  {:<9} {:>9} {:>8}",
        "mode (times in us)", "samples", "p50", "p99", "p99.9", "floor", "p50/floor", "wake/req"
    );
    for row in rows {
        let (floor, ratio) = row
            .floor
            .map_or((String::new(), String::new()), |(name, p50)| {
                (
                    name.to_owned(),
                    format!(
                        "{:.2}x",
                        row.percentiles.p50.as_secs_f64() / p50.as_secs_f64()
                    ),
                )
            });
        let wakeups = row
            .wakeups_per_request
            .map_or(String::new(), |wakeups| format!("{wakeups:.3}"));
        println!(
            "{:<44} {:>7} {:>9} {:>9} {:>9}  {floor:<9} {ratio:>9} {wakeups:>8}",
            row.name,
            row.samples,
            micros(row.percentiles.p50),
            micros(row.percentiles.p99),
            micros(row.percentiles.p999),
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn main() -> Result<()> {
    let started = Instant::now();
    println!(
        "ring latency on {} CPUs; the machine's other load shows in the numbers, the tails most",
        thread::available_parallelism().map_or(0, usize::from)
    );
    pin(0, VCPU_CPU);
    let spin = Percentiles::of(spin_ping_pong()?);
    let eventfd = Percentiles::of(eventfd_ping_pong(false)?);
    let wake_spin = Percentiles::of(eventfd_ping_pong(true)?);

    let mut ring = Vec::new();
    for (name, poll) in [("busy-poll", BUSY_POLL), ("sleep-only", Duration::ZERO)] {
        let daemon = start_daemon(poll, PARTNER_CPU)?;
        let measured = ring_round_trips(&daemon, SAMPLES);
        // Before anything else runs: a busy-polling daemon takes a CPU.
        daemon.stop()?;
        ring.push((name, poll, measured?));
    }
    let shared_cpu = {
        let daemon = start_daemon(DEFAULT_POLL, VCPU_CPU)?;
        let measured = ring_round_trips(&daemon, SHARED_CPU_SAMPLES);
        daemon.stop()?;
        measured?
    };
    // The default daemon stays up for the blk and idle measurements.
    let daemon = start_daemon(DEFAULT_POLL, PARTNER_CPU)?;
    ring.push(("hybrid", DEFAULT_POLL, ring_round_trips(&daemon, SAMPLES)?));
    let blk_times = blk_notify_to_interrupt(&daemon)?;
    let transitions = Percentiles::of(idle_transitions(&daemon, 200)?);
    println!("\nidle: CPU time of the default-mode daemon's threads over {IDLE:?}:");
    let idle = idle_cpu()?;
    let idle_share = idle.as_secs_f64() / IDLE.as_secs_f64();
    daemon.stop()?;

    let mut rows = vec![
        Row {
            name: "floor: spin-polled shared-memory ping-pong".into(),
            samples: SAMPLES,
            percentiles: spin,
            floor: None,
            wakeups_per_request: None,
        },
        Row {
            name: "floor: eventfd ping-pong".into(),
            samples: SAMPLES,
            percentiles: eventfd,
            floor: None,
            wakeups_per_request: None,
        },
        Row {
            name: "reference: eventfd wake-up, spin-polled reply".into(),
            samples: SAMPLES,
            percentiles: wake_spin,
            floor: Some(("eventfd", eventfd.p50)),
            wakeups_per_request: None,
        },
    ];
    let mut percentiles = HashMap::new();
    let mut rescues = 0;
    for (name, poll, measured) in &ring {
        let floor = if *name == "busy-poll" {
            ("spin", spin.p50)
        } else {
            ("eventfd", eventfd.p50)
        };
        let shown = Percentiles::of(measured.times.clone());
        percentiles.insert(*name, shown);
        rescues += measured.rescues;
        rows.push(Row {
            name: format!("ring {name} (poll {poll:?})"),
            samples: measured.times.len(),
            percentiles: shown,
            floor: Some(floor),
            wakeups_per_request: Some(measured.wakeups_per_request),
        });
    }
    rows.push(Row {
        name: "reference: hybrid, vCPU on the daemon's CPU".into(),
        samples: shared_cpu.times.len(),
        percentiles: Percentiles::of(shared_cpu.times),
        floor: Some(("eventfd", eventfd.p50)),
        wakeups_per_request: Some(shared_cpu.wakeups_per_request),
    });
    rescues += shared_cpu.rescues;
    rows.push(Row {
        name: "blk 4 KiB read: QueueNotify -> interrupt".into(),
        samples: blk_times.len(),
        percentiles: Percentiles::of(blk_times),
        floor: None,
        wakeups_per_request: None,
    });
    print_table(&rows);
    println!(
        "\nidle: the daemon announced sleep {} us (p50; p99 {}, max of 200 {}) after its last \
         answer (poll window {DEFAULT_POLL:?}); its threads used {} us of CPU in {IDLE:?} \
         ({:.3}% of one CPU)",
        micros(transitions.p50),
        micros(transitions.p99),
        micros(transitions.p999),
        micros(idle),
        idle_share * 100.0
    );

    let busy = percentiles["busy-poll"];
    let sleep_only = percentiles["sleep-only"];
    let hybrid = percentiles["hybrid"];
    println!("\ntargets:");
    println!(
        "  busy-poll p50 within 2x of the spin floor: {:.2}x, {}",
        busy.p50.as_secs_f64() / spin.p50.as_secs_f64(),
        verdict(busy.p50 <= spin.p50 * 2)
    );
    println!(
        "  sleep-only p50 within 1.5x of the eventfd floor: {:.2}x, {}",
        sleep_only.p50.as_secs_f64() / eventfd.p50.as_secs_f64(),
        verdict(sleep_only.p50.as_secs_f64() <= 1.5 * eventfd.p50.as_secs_f64())
    );
    println!(
        "  hybrid never worse than sleep-only (p50, p99, p99.9): {}",
        verdict(hybrid.never_worse_than(&sleep_only))
    );
    println!(
        "  zero lost wake-ups (requests rescued by hand, all ring modes): {rescues}, {}",
        verdict(rescues == 0)
    );
    println!(
        "  idle daemon asleep (under {:.0}% of one CPU): {}",
        IDLE_CPU_LIMIT * 100.0,
        verdict(idle_share < IDLE_CPU_LIMIT)
    );
    println!("\nwhole run: {:.1?}", started.elapsed());
    Ok(())
}
