//! One run of one daemon: a fresh image and configuration, the simulator playing hvisor and the
//! guest, the measured phases, and the daemon stopped again.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hvisor_sim::guest::BlkGuest;
use hvisor_sim::{SimOptions, Simulator};
use hvisor_transport::config::VirtioConfig;
use hvisor_transport::mmio::{MAGIC_VALUE, reg};
use virtio_guest_driver::blk;
use vm_memory::GuestAddress;

use crate::Error;
use crate::daemon::{self, Daemon, Launch, Template};

const ZONE: u32 = 1;
const RAM_BASE: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 16 << 20;
/// Where the guest lays out its queue and buffers.
const SCRATCH: GuestAddress = GuestAddress(RAM_BASE + 0x10_0000);
const BLK_ADDR: u64 = 0xa00_3c00;
const BLK_IRQ: u32 = 78;
const QUEUE_SIZE: u16 = 64;
const LARGE: u32 = 64 * 1024;
const SMALL: u32 = 4096;
/// The 64 KiB rounds write the first 64 blocks of 64 KiB; the 4 KiB reads stay above them, where
/// the image still holds the pattern it was created with.
const WRITTEN_BY_ROUNDS: u64 = 64 * LARGE as u64;
/// Synchronous reads discarded before each series: caches, page faults, CPU frequency.
const WARM_UP: usize = 200;
/// How long a daemon may take to connect, reply, and announce it is waiting for requests.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of each phase a run does.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub busy_reads: usize,
    pub idle_reads: usize,
    pub idle_gap: Duration,
    pub small_reads: usize,
    pub large_rounds: u32,
    pub idle_after: Duration,
    pub image_bytes: u64,
    /// Confine the daemon to this CPU and the guest (this thread) to the other.
    pub pin: Option<(usize, usize)>,
}

/// The median and 99th percentile of a series: a daemon that is descheduled now and then
/// keeps a good median and shows it in the tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub median: Duration,
    pub p99: Duration,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        let at = |quantile: f64| {
            let rank = (quantile * samples.len() as f64).ceil() as usize;
            samples
                .get(rank.clamp(1, samples.len().max(1)) - 1)
                .copied()
                .unwrap_or_default()
        };
        Latency {
            median: at(0.5),
            p99: at(0.99),
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    /// Round trip of a MagicValue read, back to back.
    pub sync_busy: Latency,
    /// Round trip of a MagicValue read after the guest was idle for the gap.
    pub sync_idle: Latency,
    /// A 4 KiB read, from the guest's QueueNotify to the used ring reaped after the interrupt
    /// was taken and acknowledged.
    pub small_read: Latency,
    /// Time per request of the 64 KiB write + read-back rounds.
    pub large_per_request: Duration,
    pub small_cpu_per_request: Duration,
    pub large_cpu: Duration,
    pub large_cpu_per_request: Duration,
    /// Each thread's CPU during the 64 KiB rounds.
    pub large_threads: HashMap<String, Duration>,
    /// Wake-ups the simulator sent per request in the 64 KiB rounds.
    pub large_wakeups_per_request: f64,
    /// CPU used over `idle_after` after the last request.
    pub idle_cpu: Duration,
    pub counters: Option<String>,
    /// The daemon never set `need_wakeup` before the guest started: it was measured anyway.
    pub never_slept: bool,
}

/// The files of one run.
struct Files {
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    strace: PathBuf,
}

/// The byte at `offset` of a fresh image: each 8-byte word holds its index, scrambled.
fn pattern_word(index: u64) -> [u8; 8] {
    index.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()
}

fn write_image(path: &Path, bytes: u64) -> Result<(), Error> {
    let mut writer = BufWriter::with_capacity(1 << 20, File::create(path)?);
    for index in 0..bytes / 8 {
        writer.write_all(&pattern_word(index))?;
    }
    writer.flush()?;
    Ok(())
}

fn write_config(dir: &Path, image: &Path) -> Result<(PathBuf, VirtioConfig), Error> {
    // hvisor-tool's format: addresses as hex strings, which both daemons read.
    let json = serde_json::json!({
        "zones": [{
            "id": ZONE,
            "memory_region": [{
                "zone0_ipa": format!("{RAM_BASE:#x}"),
                "zonex_ipa": format!("{RAM_BASE:#x}"),
                "size": format!("{RAM_SIZE:#x}"),
            }],
            "devices": [{
                "type": "blk",
                "addr": format!("{BLK_ADDR:#x}"),
                "len": "0x200",
                "irq": BLK_IRQ,
                "img": image.display().to_string(),
                "status": "enable",
            }],
        }],
    });
    let path = dir.join("virtio_cfg.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    let config = VirtioConfig::from_file(&path)?;
    Ok((path, config))
}

/// Accepts the daemon's connection, failing early if it exits instead.
fn accept(listener: &UnixListener, daemon: &mut Daemon) -> Result<UnixStream, Error> {
    listener.set_nonblocking(true)?;
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
        if let Some(status) = daemon.exited()? {
            return Err(daemon
                .failure(&format!("exited ({status}) before connecting"))
                .into());
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(daemon
                .failure(&format!("did not connect within {START_TIMEOUT:?}"))
                .into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for the daemon to set `need_wakeup`, i.e. to wait for requests. hvisor-tool's daemon
/// does not look at the ring before its first sleep, so a request published before then would
/// never be answered (on hvisor the daemon starts before the zone). False if it never did.
fn wait_until_waiting(sim: &Simulator, daemon: &mut Daemon) -> Result<bool, Error> {
    let started = Instant::now();
    while sim.bridge().need_wakeup.load(Ordering::Relaxed) == 0 {
        if let Some(status) = daemon.exited()? {
            return Err(daemon
                .failure(&format!("exited ({status}) after the hand-off"))
                .into());
        }
        if started.elapsed() > START_TIMEOUT {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(true)
}

fn per_request(total: Duration, requests: usize) -> Duration {
    total / u32::try_from(requests.max(1)).unwrap_or(u32::MAX)
}

/// xorshift64: the sectors of the 4 KiB reads, the same in every run.
struct Sectors(u64);

impl Sectors {
    fn next_in(&mut self, first: u64, count: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        first + self.0 % count
    }
}

/// The guest's side of one run, with the daemon attached.
struct Guest<'a> {
    sim: &'a Simulator,
    blk: BlkGuest<'a>,
    daemon_pid: libc::pid_t,
}

impl Guest<'_> {
    fn magic_read(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let value = self.blk.mmio.read(reg::MAGIC_VALUE)?;
        let elapsed = started.elapsed();
        if value != MAGIC_VALUE {
            return Err(format!("MagicValue read {value:#x}, expected {MAGIC_VALUE:#x}").into());
        }
        Ok(elapsed)
    }

    fn busy_reads(&self, count: usize) -> Result<Latency, Error> {
        for _ in 0..WARM_UP {
            self.magic_read()?;
        }
        let samples = (0..count)
            .map(|_| self.magic_read())
            .collect::<Result<_, _>>()?;
        Ok(Latency::of(samples))
    }

    fn idle_reads(&self, count: usize, gap: Duration) -> Result<Latency, Error> {
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            std::thread::sleep(gap);
            samples.push(self.magic_read()?);
        }
        Ok(Latency::of(samples))
    }

    /// 4 KiB reads of random blocks above the area the 64 KiB rounds write, each checked
    /// against the pattern the image was created with; returns (time, CPU per read).
    fn small_reads(
        &mut self,
        count: usize,
        image_bytes: u64,
    ) -> Result<(Latency, Duration), Error> {
        let blocks = (image_bytes - WRITTEN_BY_ROUNDS) / u64::from(SMALL);
        let mut sectors = Sectors(0x2545_f491_4f6c_dd1d);
        let mut samples = Vec::with_capacity(count);
        let cpu_before = daemon::process_cpu(self.daemon_pid)?;
        for _ in 0..count {
            let block = sectors.next_in(WRITTEN_BY_ROUNDS / u64::from(SMALL), blocks);
            let offset = block * u64::from(SMALL);
            let started = Instant::now();
            let (status, data) = self.blk.read(offset / 512, SMALL)?;
            samples.push(started.elapsed());
            if status != blk::S_OK {
                return Err(format!("4 KiB read at byte {offset:#x}: status {status}").into());
            }
            for (word, chunk) in data.chunks_exact(8).enumerate() {
                if chunk != pattern_word(offset / 8 + word as u64) {
                    return Err(format!(
                        "4 KiB read at byte {offset:#x}: wrong data at byte {:#x}",
                        offset + 8 * word as u64
                    )
                    .into());
                }
            }
        }
        let cpu = daemon::process_cpu(self.daemon_pid)?.saturating_sub(cpu_before);
        Ok((Latency::of(samples), per_request(cpu, count)))
    }

    fn large_rounds(&mut self, rounds: u32, result: &mut RunResult) -> Result<(), Error> {
        let requests = 2 * rounds as usize;
        let wakeups_before = self.sim.stats.wakeups_sent.load(Ordering::Relaxed);
        let threads_before = daemon::thread_cpu(self.daemon_pid)?;
        let cpu_before = daemon::process_cpu(self.daemon_pid)?;
        let started = Instant::now();
        self.blk.write_read_rounds(rounds)?;
        let elapsed = started.elapsed();
        result.large_cpu = daemon::process_cpu(self.daemon_pid)?.saturating_sub(cpu_before);
        result.large_threads =
            daemon::thread_delta(&threads_before, &daemon::thread_cpu(self.daemon_pid)?);
        result.large_per_request = per_request(elapsed, requests);
        result.large_cpu_per_request = per_request(result.large_cpu, requests);
        let wakeups = self.sim.stats.wakeups_sent.load(Ordering::Relaxed) - wakeups_before;
        result.large_wakeups_per_request = wakeups as f64 / requests.max(1) as f64;
        Ok(())
    }
}

/// Where the runs keep their files.
pub struct Workspace {
    pub dir: PathBuf,
}

impl Workspace {
    fn files(&self, name: &str) -> Result<Files, Error> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Files {
            config: dir.join("virtio_cfg.json"),
            socket: dir.join("hv.sock"),
            log: dir.join("daemon.log"),
            strace: dir.join("strace.txt"),
        })
    }

    /// Runs `template` through `plan` in a fresh directory `name`. With `trace`, the daemon
    /// runs under `strace -f -c` and the path of its summary is returned with the result.
    pub fn run(
        &self,
        name: &str,
        template: &Template,
        plan: &Plan,
        trace: bool,
    ) -> Result<(RunResult, Option<PathBuf>), Error> {
        let files = self.files(name)?;
        let image = files.config.with_file_name("disk.img");
        write_image(&image, plan.image_bytes)?;
        let (config_path, config) = write_config(
            files.config.parent().expect("a file in the run directory"),
            &image,
        )?;
        let simulator = Simulator::new(&config, SimOptions::default())?;
        let _ = std::fs::remove_file(&files.socket);
        let listener = UnixListener::bind(&files.socket)?;
        let mut daemon = Daemon::spawn(&Launch {
            template,
            config: &config_path,
            socket: &files.socket,
            log: &files.log,
            strace_summary: trace.then_some(files.strace.as_path()),
            cpu: plan.pin.map(|(daemon_cpu, _)| daemon_cpu),
        })?;
        let measured = measure(&simulator, &listener, &mut daemon, plan);
        // Closing the connection tells a daemon that speaks the hand-off to stop.
        simulator.detach();
        let stopped = daemon.stop(Duration::from_secs(3));
        let mut result = measured?;
        result.counters = stopped?.counters;
        Ok((result, trace.then_some(files.strace)))
    }
}

fn measure(
    simulator: &Arc<Simulator>,
    listener: &UnixListener,
    daemon: &mut Daemon,
    plan: &Plan,
) -> Result<RunResult, Error> {
    let stream = accept(listener, daemon)?;
    stream.set_read_timeout(Some(START_TIMEOUT))?;
    simulator
        .attach(stream)
        .map_err(|error| daemon.failure(&format!("hand-off failed: {error}")))?;
    let mut result = RunResult {
        never_slept: !wait_until_waiting(simulator, daemon)?,
        ..RunResult::default()
    };
    let blk = BlkGuest::start(simulator, ZONE, BLK_ADDR, SCRATCH, QUEUE_SIZE, LARGE)
        .map_err(|error| daemon.failure(&format!("blk set-up: {error}")))?;
    let mut guest = Guest {
        sim: simulator,
        blk,
        daemon_pid: daemon.pid(),
    };
    let failed = |phase: &str, error: Error| -> Error {
        daemon.failure(&format!("{phase}: {error}")).into()
    };
    if plan.busy_reads > 0 {
        result.sync_busy = guest
            .busy_reads(plan.busy_reads)
            .map_err(|error| failed("back-to-back register reads", error))?;
    }
    if plan.idle_reads > 0 {
        result.sync_idle = guest
            .idle_reads(plan.idle_reads, plan.idle_gap)
            .map_err(|error| failed("register reads after an idle gap", error))?;
    }
    if plan.small_reads > 0 {
        (result.small_read, result.small_cpu_per_request) = guest
            .small_reads(plan.small_reads, plan.image_bytes)
            .map_err(|error| failed("4 KiB reads", error))?;
    }
    guest
        .large_rounds(plan.large_rounds, &mut result)
        .map_err(|error| failed("64 KiB write + read-back rounds", error))?;
    if !plan.idle_after.is_zero() {
        let before = daemon::process_cpu(guest.daemon_pid)?;
        std::thread::sleep(plan.idle_after);
        result.idle_cpu = daemon::process_cpu(guest.daemon_pid)?.saturating_sub(before);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_takes_the_median_and_the_tail() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let latency = Latency::of(samples);
        assert_eq!(latency.median, Duration::from_micros(50));
        assert_eq!(latency.p99, Duration::from_micros(99));
        assert_eq!(Latency::of(Vec::new()), Latency::default());
    }

    #[test]
    fn the_pattern_differs_from_word_to_word() {
        assert_ne!(pattern_word(0), pattern_word(1));
        assert_ne!(pattern_word(1), pattern_word(2));
        assert_eq!(pattern_word(7), pattern_word(7));
    }
}
