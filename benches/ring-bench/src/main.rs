//! ring-bench: daemons that speak the hand-off socket (docs/hypervisor-socket.md), driven side
//! by side through the hvisor simulator, which plays hvisor and a zone's virtio-mmio blk driver.
//!
//! Each `--daemon` is a command line with `{CONFIG}` and `{SOCKET}` placeholders: the bench
//! writes a virtio_cfg.json with one blk device on a fresh image, listens on the socket, starts
//! the daemon, and measures, in rounds that alternate the daemons (A B A B ...):
//!
//! - the round trip of a synchronous register read (MagicValue), back to back and after an idle
//!   gap of the guest;
//! - 4 KiB QD1 reads of random blocks, each checked against the image's pattern;
//! - 64 KiB write + read-back rounds (the workload of `hvisor-vhost simulate --rounds`), each
//!   read checked against what was written;
//! - the daemon's CPU time (/proc/PID/stat, and per thread from /proc/PID/task/*/stat) during
//!   the 64 KiB rounds and over a few idle seconds afterwards;
//! - with `--strace`, system calls per request, from two extra runs under `strace -f -c`.
//!
//! Data is verified, so a daemon that answers wrongly fails the run instead of scoring. Counter
//! lines a daemon prints on standard error (`hvisor-vhost-counters {...}`) are shown.
//!
//! It is a separate workspace member, outside the default members, like blk-bench.

mod daemon;
mod report;
mod strace;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use daemon::Template;
use workload::{Plan, RunResult, Workspace};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    about = "A/B benchmark of hvisor ring daemons through the simulator's hypervisor side",
    after_help = "Example:\n  ring-bench \\\n    --daemon 'ours: target/release/hvisor-vhost hvisor --hypervisor-socket {SOCKET} --config {CONFIG}' \\\n    --daemon 'c: env HVISOR_SHIM_SOCKET={SOCKET} LD_PRELOAD=$PWD/target/release/libdevhvisor_shim.so /work/ext/hvisor-tool/build/hvisor-virtio virtio start {CONFIG}'"
)]
struct Args {
    /// A daemon: `[LABEL: ]COMMAND`, run by `sh -c "exec COMMAND"` with {CONFIG} and {SOCKET}
    /// replaced. Repeat for each daemon to compare (use `env VAR=VALUE ...` for variables).
    #[arg(long = "daemon", required = true)]
    daemons: Vec<String>,
    /// Rounds: each daemon runs this many times, the daemons alternating.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Synchronous register reads back to back, per run.
    #[arg(long, default_value_t = 20_000)]
    busy_reads: usize,
    /// Synchronous register reads after an idle gap, per run.
    #[arg(long, default_value_t = 200)]
    idle_reads: usize,
    /// The idle gap before each of those reads, in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    idle_gap_ms: f64,
    /// 4 KiB reads (queue depth 1), per run.
    #[arg(long, default_value_t = 2000)]
    small_reads: usize,
    /// 64 KiB write + read-back rounds (two requests each), per run.
    #[arg(long, default_value_t = 2000)]
    large_rounds: u32,
    /// Seconds of daemon CPU measured after the last request.
    #[arg(long, default_value_t = 3.0)]
    idle_seconds: f64,
    /// Size of the image each run creates, in MiB (at least 8).
    #[arg(long, default_value_t = 64)]
    image_mib: u64,
    /// Count system calls per request: two more runs of each daemon under `strace -f -c`.
    #[arg(long)]
    strace: bool,
    /// 64 KiB rounds of the traced run.
    #[arg(long, default_value_t = 200)]
    strace_rounds: u32,
    /// Confine the daemon to CPU 0 and the guest to the last CPU, as on hvisor, where a zone's
    /// vCPUs do not share root Linux's CPUs.
    #[arg(long)]
    pin: bool,
    /// Folder for each run's image, configuration, socket and daemon log.
    #[arg(long, default_value = "/tmp/ring-bench")]
    work_dir: PathBuf,
}

fn pinning(pin: bool) -> Option<(usize, usize)> {
    if !pin {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    match usize::try_from(cpus) {
        Ok(cpus) if cpus >= 2 => Some((0, cpus - 1)),
        _ => {
            println!("note: --pin needs two CPUs; nothing pinned");
            None
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(error) = run(&args) {
        eprintln!("ring-bench: {error}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Error> {
    let templates = args
        .daemons
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let label = char::from(b'A' + u8::try_from(index % 26).unwrap_or(0)).to_string();
            Template::parse(text, label)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.image_mib < 8 {
        return Err("--image-mib must be at least 8 (the 64 KiB rounds use the first 4)".into());
    }
    let pin = pinning(args.pin);
    if let Some((_, guest_cpu)) = pin {
        daemon::pin_to(0, guest_cpu)?;
    }
    let plan = Plan {
        busy_reads: args.busy_reads,
        idle_reads: args.idle_reads,
        idle_gap: Duration::from_secs_f64(args.idle_gap_ms / 1000.0),
        small_reads: args.small_reads,
        large_rounds: args.large_rounds,
        idle_after: Duration::from_secs_f64(args.idle_seconds),
        image_bytes: args.image_mib << 20,
        pin,
    };
    let workspace = Workspace {
        dir: args.work_dir.clone(),
    };
    println!(
        "ring-bench: {} rounds, daemons alternating; per run {} busy and {} idle-gap ({} ms) \
         register reads, {} 4 KiB reads, {} 64 KiB write + read-back rounds, {} s idle{}",
        args.rounds,
        args.busy_reads,
        args.idle_reads,
        args.idle_gap_ms,
        args.small_reads,
        args.large_rounds,
        args.idle_seconds,
        if pin.is_some() {
            "; daemon on CPU 0, guest on the last CPU"
        } else {
            ""
        }
    );
    for template in &templates {
        println!("  {} = {}", template.label, template.command);
    }
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); templates.len()];
    for round in 0..args.rounds {
        for (index, template) in templates.iter().enumerate() {
            let name = format!("{}-{}", template.label, round + 1);
            let (result, _) = workspace.run(&name, template, &plan, false)?;
            println!(
                "round {}/{} {}: {}",
                round + 1,
                args.rounds,
                template.label,
                report::one_line(&result)
            );
            results[index].push(result);
        }
    }
    println!();
    report::summary(&templates, &results, &plan);
    if args.strace {
        println!();
        count_system_calls(&workspace, &templates, &plan, args.strace_rounds)?;
    }
    Ok(())
}

fn count_system_calls(
    workspace: &Workspace,
    templates: &[Template],
    plan: &Plan,
    rounds: u32,
) -> Result<(), Error> {
    if !strace::available() {
        println!("system calls: strace is not on the PATH (or does not run); not counted");
        return Ok(());
    }
    let traced = |large_rounds| Plan {
        busy_reads: 0,
        idle_reads: 0,
        small_reads: 0,
        large_rounds,
        idle_after: Duration::ZERO,
        ..*plan
    };
    println!(
        "system calls per 64 KiB request (strace -f -c; a run of {rounds} rounds minus a run of \
         none, so start-up and exit cancel; strace slows the daemon, so only counts are shown):"
    );
    for template in templates {
        let summary = |name: &str, large_rounds| -> Result<_, Error> {
            let (_, path) = workspace.run(name, template, &traced(large_rounds), true)?;
            strace::read_summary(&path.expect("a traced run has a summary"))
        };
        let loaded = summary(&format!("{}-strace", template.label), rounds)?;
        let baseline = summary(&format!("{}-strace-baseline", template.label), 0)?;
        let rates = strace::per_request(&loaded, &baseline, 2 * u64::from(rounds));
        let total: f64 = rates.iter().map(|(_, rate)| rate).sum();
        let top: Vec<String> = rates
            .iter()
            .take(6)
            .map(|(name, rate)| format!("{name} {rate:.2}"))
            .collect();
        println!(
            "  {}: {total:.2} in all; {}",
            template.label,
            top.join(", ")
        );
    }
    Ok(())
}
