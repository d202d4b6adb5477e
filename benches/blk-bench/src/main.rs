//! Side-by-side benchmark of `hvisor-vhost blk` and qemu-storage-daemon, without a VM.
//!
//! Both daemons serve the same image; the `blkio` crate's virtio-blk-vhost-user driver is the
//! client for both, so the only difference is the backend. Runs alternate A/B/A/B so that a
//! noisy machine penalises both sides alike, and fio (io_uring) on the same file gives the
//! host's own numbers as the ceiling.
//!
//! This is a separate workspace member, outside the default members, so that blkio and its
//! dependencies never burden builds and tests of the device crates.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::Parser;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(about = "A/B benchmark: hvisor-vhost blk vs qemu-storage-daemon, blkio as the client")]
struct Args {
    /// The hvisor-vhost binary under test.
    #[arg(long, default_value = "target/release/hvisor-vhost")]
    hvisor_vhost: PathBuf,
    /// Image served by both daemons; created and filled with data when missing.
    #[arg(long, default_value = "/var/tmp/blk-bench.img")]
    image: PathBuf,
    /// Size of a newly created image, in MiB.
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds per workload: each backend runs this many times, the order rotating per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Queue counts to test; each queue gets its own client thread.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queues: Vec<u16>,
    /// Cache modes: `cached` (page cache) and `direct` (O_DIRECT on every side).
    #[arg(long, value_delimiter = ',', default_value = "cached,direct")]
    modes: Vec<String>,
    /// Workloads by name (see the table), default all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Sides to run: host (fio), qsd, ours.
    #[arg(long, value_delimiter = ',', default_value = "host,qsd,ours")]
    sides: Vec<String>,
    /// qemu-storage-daemon's `aio=` engines; each runs as a side of its own.
    #[arg(long, value_delimiter = ',', default_value = "io_uring,threads")]
    qsd_aio: Vec<String>,
    /// Extra arguments for `hvisor-vhost blk`, e.g. `--ours-args=--poll-us=0`.
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    ours_args: Vec<String>,
    /// More hvisor-vhost sides, as NAME=ARGS (e.g. `--variant "sync=--io-engine=sync"`), to
    /// see what an optimisation contributes: the ratio columns then compare the plain side
    /// with each variant. Repeatable.
    #[arg(long = "variant", allow_hyphen_values = true, value_parser = parse_variant)]
    variants: Vec<(String, Vec<String>)>,
    /// Folder for the sockets.
    #[arg(long, default_value = "/tmp")]
    socket_dir: PathBuf,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    block_size: usize,
    depth: usize,
    random: bool,
    write: bool,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randread-4k-qd1",
        block_size: 4096,
        depth: 1,
        random: true,
        write: false,
    },
    Workload {
        name: "randread-4k-qd32",
        block_size: 4096,
        depth: 32,
        random: true,
        write: false,
    },
    Workload {
        name: "randwrite-4k-qd1",
        block_size: 4096,
        depth: 1,
        random: true,
        write: true,
    },
    Workload {
        name: "randwrite-4k-qd32",
        block_size: 4096,
        depth: 32,
        random: true,
        write: true,
    },
    Workload {
        name: "seqread-1m-qd8",
        block_size: 1 << 20,
        depth: 8,
        random: false,
        write: false,
    },
    Workload {
        name: "seqwrite-1m-qd8",
        block_size: 1 << 20,
        depth: 8,
        random: false,
        write: true,
    },
];

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    iops: f64,
    mib_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Outcome {
    /// The median of each field: the virtual disks this runs on have bimodal phases (the same
    /// side's runs differ up to 2x), which a mean smears into both neighbours' results.
    fn median(runs: &[Outcome]) -> Outcome {
        let median = |field: fn(&Outcome) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(field).collect();
            values.sort_by(f64::total_cmp);
            match values.len() {
                0 => 0.0,
                n if n % 2 == 1 => values[n / 2],
                n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
            }
        };
        Outcome {
            iops: median(|o| o.iops),
            mib_per_s: median(|o| o.mib_per_s),
            p50_us: median(|o| o.p50_us),
            p99_us: median(|o| o.p99_us),
        }
    }
}

/// A daemon serving the image, killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(mut command: Command, socket: PathBuf) -> Result<Daemon, Error> {
        let _ = std::fs::remove_file(&socket);
        let child = command.stdout(Stdio::null()).spawn()?;
        let mut daemon = Daemon { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                return Err(format!("{command:?} exited: {status}").into());
            }
            if Instant::now() > deadline {
                return Err(format!("{command:?}: no socket after 10 s").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn ensure_image(path: &Path, mib: u64) -> Result<u64, Error> {
    if let Ok(metadata) = std::fs::metadata(path) {
        return Ok(metadata.len());
    }
    // Real data, not a sparse file: holes would make O_DIRECT reads free.
    let file = OpenOptions::new().create_new(true).write(true).open(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    for mib_index in 0..mib {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = (i as u64 ^ mib_index.wrapping_mul(0x9e37_79b9)) as u8;
        }
        file.write_all_at(&chunk, mib_index << 20)?;
    }
    file.sync_all()?;
    Ok(mib << 20)
}

/// Reads the whole image so that a cached run starts from a warm page cache. Done before every
/// cached run: the host may reclaim cold page-cache pages within seconds (DAMON here).
fn warm_page_cache(path: &Path) -> Result<(), Error> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            return Ok(());
        }
        offset += n as u64;
    }
}

/// A daemon under test, started once per (mode, queue count) and driven by every workload.
#[derive(Clone, Debug, PartialEq)]
enum Backend {
    /// qemu-storage-daemon with this `aio=` engine.
    Qsd { aio: String },
    /// hvisor-vhost with extra arguments; `name` is empty for the plain side.
    Ours { name: String, args: Vec<String> },
}

fn parse_variant(text: &str) -> Result<(String, Vec<String>), String> {
    let (name, args) = text
        .split_once('=')
        .ok_or_else(|| format!("variant {text:?} is not NAME=ARGS"))?;
    if name.is_empty() {
        return Err(format!("variant {text:?} has no name"));
    }
    Ok((
        name.to_owned(),
        args.split_whitespace().map(str::to_owned).collect(),
    ))
}

impl Backend {
    fn label(&self) -> String {
        match self {
            Backend::Qsd { aio } => format!("qsd aio={aio}"),
            Backend::Ours { name, .. } if name.is_empty() => "hvisor-vhost".to_owned(),
            Backend::Ours { name, .. } => format!("hvisor-vhost {name}"),
        }
    }

    fn command(&self, args: &Args, socket: &Path, queues: u16, direct: bool) -> Command {
        match self {
            Backend::Ours { args: extra, .. } => {
                let mut command = Command::new(&args.hvisor_vhost);
                command
                    .arg("blk")
                    .arg("--socket-path")
                    .arg(socket)
                    .arg("--image")
                    .arg(&args.image)
                    .arg("--num-queues")
                    .arg(queues.to_string());
                if direct {
                    command.arg("--direct");
                }
                command.args(extra);
                command
            }
            Backend::Qsd { aio } => {
                let mut blockdev = format!(
                    "driver=file,node-name=f0,filename={},aio={aio}",
                    args.image.display()
                );
                if direct {
                    blockdev.push_str(",cache.direct=on");
                }
                let export = format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                     writable=on,num-queues={queues}",
                    socket.display()
                );
                let mut command = Command::new("qemu-storage-daemon");
                command
                    .arg("--blockdev")
                    .arg(blockdev)
                    .arg("--export")
                    .arg(export);
                command
            }
        }
    }
}

/// A pointer into the shared memory region, handed to one client thread.
#[derive(Clone, Copy)]
struct RegionSlice(*mut u8);
// SAFETY: each client thread gets a disjoint part of the region, which outlives the threads.
unsafe impl Send for RegionSlice {}

/// Drives one queue at `depth` until `deadline`; returns (I/Os, latencies in ns).
fn drive_queue(
    queue: &mut Blkioq,
    buffers: RegionSlice,
    workload: Workload,
    capacity: u64,
    first_block: u64,
    deadline: Instant,
) -> Result<(u64, Vec<u32>), Error> {
    let size = workload.block_size;
    let blocks = capacity / size as u64;
    let mut next_block = first_block;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ first_block.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut next_offset = move || {
        let block = if workload.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let block = next_block % blocks;
            next_block += 1;
            block
        };
        block * size as u64
    };
    let submit = |queue: &mut Blkioq, slot: usize, offset: u64| {
        // SAFETY: slot < depth, and the thread's part of the region holds depth buffers.
        let buf = unsafe { buffers.0.add(slot * size) };
        if workload.write {
            queue.write(offset, buf, size, slot, ReqFlags::empty());
        } else {
            queue.read(offset, buf, size, slot, ReqFlags::empty());
        }
    };
    let mut started = vec![Instant::now(); workload.depth];
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..workload.depth).map(|_| MaybeUninit::uninit()).collect();
    for (slot, start) in started.iter_mut().enumerate() {
        *start = Instant::now();
        submit(queue, slot, next_offset());
    }
    let mut in_flight = workload.depth;
    let mut done = 0u64;
    while in_flight > 0 {
        let got = queue.do_io(&mut completions, 1, None, None)?;
        let now = Instant::now();
        let more = now < deadline;
        for completion in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let completion = unsafe { completion.assume_init_ref() };
            if completion.ret != 0 {
                return Err(format!("I/O error {} in {}", completion.ret, workload.name).into());
            }
            let slot = completion.user_data;
            latencies.push((now - started[slot]).as_nanos().min(u128::from(u32::MAX)) as u32);
            done += 1;
            if more {
                started[slot] = Instant::now();
                submit(queue, slot, next_offset());
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok((done, latencies))
}

/// One run of `workload` through blkio against the daemon on `socket`.
fn run_client(
    socket: &Path,
    queues: u16,
    workload: Workload,
    seconds: f64,
) -> Result<Outcome, Error> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", socket.to_str().ok_or("socket path is not UTF-8")?)?;
    blkio.connect()?;
    blkio.set_i32("num-queues", i32::from(queues))?;
    let started = blkio.start()?;
    let capacity = blkio.get_u64("capacity")?;
    let per_queue = workload.depth * workload.block_size;
    let region = blkio.alloc_mem_region(per_queue * usize::from(queues))?;
    blkio.map_mem_region(&region)?;
    let base = region.addr as *mut u8;
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs_f64(seconds);
    let blocks = capacity / workload.block_size as u64;
    let results: Vec<Result<(u64, Vec<u32>), Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(index, mut queue)| {
                // SAFETY: the region holds `queues` parts of `per_queue` bytes.
                let buffers = RegionSlice(unsafe { base.add(index * per_queue) });
                // Sequential streams start at different places so queues do not share blocks.
                let first_block = blocks / u64::from(queues) * index as u64;
                scope.spawn(move || {
                    drive_queue(
                        &mut queue,
                        buffers,
                        workload,
                        capacity,
                        first_block,
                        deadline,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("client thread panicked"))
            .collect()
    });
    let elapsed = begin.elapsed().as_secs_f64();
    let mut total = 0;
    let mut latencies = Vec::new();
    for result in results {
        let (done, mut lat) = result?;
        total += done;
        latencies.append(&mut lat);
    }
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |&ns| f64::from(ns) / 1000.0)
    };
    Ok(Outcome {
        iops: total as f64 / elapsed,
        mib_per_s: total as f64 * workload.block_size as f64 / elapsed / f64::from(1 << 20),
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
    })
}

/// Writes a pattern through the daemon, reads it back and compares, so that a fast but wrong
/// backend cannot win. Uses the last MiB of the disk.
fn verify_round_trip(socket: &Path) -> Result<(), Error> {
    const LEN: usize = 1 << 20;
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", socket.to_str().ok_or("socket path is not UTF-8")?)?;
    blkio.connect()?;
    blkio.set_i32("num-queues", 1)?;
    let mut queue = blkio.start()?.queues.remove(0);
    let offset = blkio.get_u64("capacity")? - LEN as u64;
    let region = blkio.alloc_mem_region(2 * LEN)?;
    blkio.map_mem_region(&region)?;
    // SAFETY: the region is 2 MiB of memory mapped for this process until it is freed below.
    let (written, read) = unsafe {
        let base = region.addr as *mut u8;
        (
            std::slice::from_raw_parts_mut(base, LEN),
            std::slice::from_raw_parts_mut(base.add(LEN), LEN),
        )
    };
    let seed = std::process::id() as u8;
    for (i, byte) in written.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    let mut completions = [const { MaybeUninit::<Completion>::uninit() }; 1];
    let mut wait_ok = |queue: &mut Blkioq| -> Result<(), Error> {
        queue.do_io(&mut completions, 1, None, None)?;
        // SAFETY: do_io returned with one completion filled in.
        let ret = unsafe { completions[0].assume_init_ref() }.ret;
        if ret == 0 {
            Ok(())
        } else {
            Err(format!("verify I/O failed: {ret}").into())
        }
    };
    queue.write(offset, written.as_mut_ptr(), LEN, 0, ReqFlags::empty());
    wait_ok(&mut queue)?;
    queue.flush(0, ReqFlags::empty());
    wait_ok(&mut queue)?;
    queue.read(offset, read.as_mut_ptr(), LEN, 0, ReqFlags::empty());
    wait_ok(&mut queue)?;
    let same = written == read;
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
    if same {
        Ok(())
    } else {
        Err(format!(
            "{}: data read back differs from data written",
            socket.display()
        )
        .into())
    }
}

/// The host's own numbers: fio with io_uring on the same file, one job per queue.
fn run_fio(args: &Args, queues: u16, workload: Workload, direct: bool) -> Result<Outcome, Error> {
    let rw = match (workload.random, workload.write) {
        (true, false) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (false, true) => "write",
    };
    let output = Command::new("fio")
        .args([
            "--name=host",
            "--ioengine=io_uring",
            "--thread",
            "--group_reporting",
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
            "--lat_percentiles=1",
            "--invalidate=0",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", args.image.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", workload.block_size))
        .arg(format!("--iodepth={}", workload.depth))
        .arg(format!("--numjobs={queues}"))
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--runtime={}ms", (args.seconds * 1000.0) as u64))
        .output()?;
    if !output.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let side = &report["jobs"][0][if workload.write { "write" } else { "read" }];
    let percentile = |p: &str| {
        ["lat_ns", "clat_ns"]
            .iter()
            .find_map(|key| side[key]["percentile"][p].as_f64())
            .unwrap_or(0.0)
            / 1000.0
    };
    Ok(Outcome {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mib_per_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
        p50_us: percentile("50.000000"),
        p99_us: percentile("99.000000"),
    })
}

/// Results of one (mode, queues, workload) cell.
struct Row {
    queues: u16,
    workload: Workload,
    host: Option<Outcome>,
    /// Every run of each backend, in the order of the backend list.
    runs: Vec<Vec<Outcome>>,
}

impl Row {
    fn median(&self, backend: usize) -> Option<Outcome> {
        let runs = &self.runs[backend];
        (!runs.is_empty()).then(|| Outcome::median(runs))
    }
}

const CELL: usize = 31;
const RATIO: usize = 7;

fn cell(outcome: Option<Outcome>, big_blocks: bool) -> String {
    match outcome {
        None => format!("{:>CELL$}", "-"),
        Some(o) if big_blocks => format!(
            "{:>8.0} MiB/s {:>7.0} {:>8.0}",
            o.mib_per_s, o.p50_us, o.p99_us
        ),
        Some(o) => format!("{:>8.0} IOPS  {:>7.1} {:>8.1}", o.iops, o.p50_us, o.p99_us),
    }
}

fn ratio(numerator: Option<Outcome>, denominator: Option<Outcome>) -> String {
    match (numerator, denominator) {
        (Some(a), Some(b)) if b.iops > 0.0 => format!("{:>RATIO$.2}", a.iops / b.iops),
        _ => format!("{:>RATIO$}", "-"),
    }
}

fn spread(runs: &[Outcome]) -> String {
    runs.iter()
        .map(|o| format!("{:.0}", o.iops))
        .collect::<Vec<_>>()
        .join("/")
}

/// The table of one cache mode: a column per side, then ours over each other side.
fn render(mode: &str, backends: &[Backend], rows: &[Row]) -> String {
    let ours = backends
        .iter()
        .position(|b| matches!(b, Backend::Ours { name, .. } if name.is_empty()));
    let others: Vec<usize> = (0..backends.len()).filter(|&i| Some(i) != ours).collect();
    let short = |backend: &Backend| match backend {
        Backend::Qsd { aio } => format!("/{}", aio.trim_start_matches("io_"))
            .chars()
            .take(RATIO)
            .collect::<String>(),
        Backend::Ours { name, .. } => format!("/{name}").chars().take(RATIO).collect(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n[{mode}] median of the rounds; latency p50/p99 in us, submit to completion as the \
         client sees it; ratios are ours over the side named"
    );
    let mut header = format!(
        "{:<18} {:>2} | {:^CELL$} |",
        "workload", "q", "host (fio io_uring)"
    );
    for backend in backends {
        let _ = write!(header, " {:^CELL$} |", backend.label());
    }
    if ours.is_some() {
        for &other in &others {
            let _ = write!(header, " {:>RATIO$}", short(&backends[other]));
        }
        let _ = write!(header, " {:>RATIO$} |", "/host");
    }
    let _ = writeln!(header, " IOPS of each run");
    out.push_str(&header);
    for row in rows {
        let big = row.workload.block_size >= 1 << 20;
        let _ = write!(
            out,
            "{:<18} {:>2} | {} |",
            row.workload.name,
            row.queues,
            cell(row.host, big)
        );
        for backend in 0..backends.len() {
            let _ = write!(out, " {} |", cell(row.median(backend), big));
        }
        if let Some(ours) = ours {
            for &other in &others {
                let _ = write!(out, " {}", ratio(row.median(ours), row.median(other)));
            }
            let _ = write!(out, " {} |", ratio(row.median(ours), row.host));
        }
        let runs: Vec<String> = row.runs.iter().map(|runs| spread(runs)).collect();
        let _ = writeln!(out, " {}", runs.join(" ; "));
    }
    out
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let command_line = std::env::args()
        .map(|arg| {
            if arg.contains(char::is_whitespace) {
                format!("'{arg}'")
            } else {
                arg
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let size = ensure_image(&args.image, args.image_mib)?;
    eprintln!("image {} ({} MiB)", args.image.display(), size >> 20);
    let workloads: Vec<Workload> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
        .collect();
    let side = |name: &str| args.sides.iter().any(|s| s == name);
    let mut backends = Vec::new();
    if side("qsd") {
        backends.extend(
            args.qsd_aio
                .iter()
                .map(|aio| Backend::Qsd { aio: aio.clone() }),
        );
    }
    if side("ours") {
        backends.push(Backend::Ours {
            name: String::new(),
            args: args
                .ours_args
                .iter()
                .filter(|arg| !arg.is_empty())
                .cloned()
                .collect(),
        });
        backends.extend(args.variants.iter().map(|(name, extra)| Backend::Ours {
            name: name.clone(),
            args: extra.clone(),
        }));
    }
    for mode in &args.modes {
        let direct = match mode.as_str() {
            "cached" => false,
            "direct" => true,
            other => return Err(format!("unknown mode {other:?}").into()),
        };
        let mut rows = Vec::new();
        for &queues in &args.queues {
            let pid = std::process::id();
            let mut daemons = Vec::new();
            for (index, backend) in backends.iter().enumerate() {
                let socket = args
                    .socket_dir
                    .join(format!("blk-bench-{pid}-{index}.sock"));
                let daemon =
                    Daemon::start(backend.command(&args, &socket, queues, direct), socket)?;
                verify_round_trip(&daemon.socket)?;
                daemons.push(daemon);
            }
            for &workload in &workloads {
                let host = if side("host") {
                    if !direct {
                        warm_page_cache(&args.image)?;
                    }
                    Some(run_fio(&args, queues, workload, direct)?)
                } else {
                    None
                };
                let mut row = Row {
                    queues,
                    workload,
                    host,
                    runs: vec![Vec::new(); backends.len()],
                };
                for round in 0..args.rounds {
                    // The order rotates every round, so that no side always runs first.
                    for turn in 0..daemons.len() {
                        let index = (turn + round) % daemons.len();
                        if !direct {
                            warm_page_cache(&args.image)?;
                        }
                        let outcome =
                            run_client(&daemons[index].socket, queues, workload, args.seconds)?;
                        eprintln!(
                            "{mode} q{queues} {} {}: {:.0} IOPS {:.0} MiB/s p50 {:.1} p99 {:.1}",
                            workload.name,
                            backends[index].label(),
                            outcome.iops,
                            outcome.mib_per_s,
                            outcome.p50_us,
                            outcome.p99_us
                        );
                        row.runs[index].push(outcome);
                    }
                }
                rows.push(row);
            }
        }
        print!("{}", render(mode, &backends, &rows));
        std::io::stdout().flush()?;
    }
    println!("\ncommand: {command_line}");
    Ok(())
}
