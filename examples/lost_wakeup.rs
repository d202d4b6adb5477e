//! The lost wake-up that the daemon's SeqCst fence in `RequestConsumer::prepare_to_sleep`
//! prevents, seen on real cores. It runs the ring stress of `tests/ring_stress.rs` (vCPU
//! threads reading registers back to back, the daemon sleeping whenever the ring is empty) and
//! counts stalls: requests not answered within 50 ms. A stalled request still unanswered a
//! second later is a lost wake-up (a daemon that was merely not scheduled has answered by
//! then): the example wakes the daemon by hand, as an operator would, and carries on.
//!
//! Against the mutant without the fence (a separate target directory keeps the main build
//! cache):
//!
//! ```text
//! RUSTFLAGS='--cfg hvisor_mutant="no_consumer_fence"' CARGO_TARGET_DIR=target/mutant \
//!     cargo run --release --example lost_wakeup -- [--seconds 60] [--requests 10000000] [--vcpus 2]
//! ```
//!
//! Without the RUSTFLAGS it runs the daemon as shipped, where a lost wake-up is a bug: it then
//! exits with status 1 if it saw any.
//!
//! One vCPU by default. With two or more, a request whose wake-up was lost is rescued within
//! microseconds by another vCPU's next request (the daemon's `need_wakeup = 1` is visible by
//! then, so that vCPU sends a wake-up), and nothing shows unless every vCPU is caught at once:
//! `--vcpus 2` is the stress of `tests/ring_stress.rs` exactly.

#[allow(dead_code)]
#[path = "../tests/support/hvisor.rs"]
mod rig;
#[allow(dead_code)]
#[path = "../tests/support/stress.rs"]
mod stress;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rig::{BlkSpec, Rig, RigOptions};
use stress::{OnStall, StressPlan, Target};

const BLK: BlkSpec = BlkSpec {
    zone: 1,
    addr: 0xa00_3c00,
    irq: 78,
};
/// A request unanswered for this long counts as a stall: a round trip takes microseconds.
const STALL: Duration = Duration::from_millis(50);

struct Args {
    seconds: u64,
    requests: u64,
    vcpus: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 60,
        requests: 10_000_000,
        vcpus: 1,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|error| format!("{what} {value}: {error}"))
        };
        match flag.as_str() {
            "--seconds" => args.seconds = number("--seconds")?,
            "--requests" => args.requests = number("--requests")?,
            "--vcpus" => {
                args.vcpus = u32::try_from(number("--vcpus")?)
                    .ok()
                    .filter(|vcpus| (1..=32).contains(vcpus))
                    .ok_or("--vcpus must be 1 to 32")?;
            }
            _ => {
                return Err(format!(
                    "unknown argument {flag}; usage: lost_wakeup [--seconds S] [--requests N] \
                     [--vcpus V]"
                ));
            }
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let mutant = cfg!(hvisor_mutant = "no_consumer_fence");
    if mutant {
        println!("build: MUTANT without the consumer's SeqCst fence (no_consumer_fence)");
    } else {
        println!(
            "build: all fences in place (no mutant cfg). Lost wake-ups must be 0 here; for the mutant \
             run with RUSTFLAGS='--cfg hvisor_mutant=\"no_consumer_fence\"' \
             CARGO_TARGET_DIR=target/mutant"
        );
    }
    println!(
        "{} vCPU(s), up to {} requests or {} s, daemon busy-poll window 0, stall = no answer \
         within {STALL:?}",
        args.vcpus, args.requests, args.seconds
    );
    let rig = Rig::start(RigOptions {
        poll: Duration::ZERO,
        ..RigOptions::new(&[BLK])
    });
    let outcome = stress::run(
        &rig.sim,
        &StressPlan {
            target: Target {
                zone: BLK.zone,
                base: BLK.addr,
            },
            vcpus: args.vcpus,
            requests_per_vcpu: args.requests.div_ceil(u64::from(args.vcpus)),
            time_limit: Some(Duration::from_secs(args.seconds)),
            stall: STALL,
            on_stall: OnStall::Rescue,
        },
    );
    let wakeups = rig.sim.stats.wakeups_sent.load(Ordering::Relaxed);
    let stopped = rig.stop();
    let totals = match outcome {
        Ok(totals) => totals,
        Err(message) => {
            eprintln!("the stress failed: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = stopped {
        eprintln!("the daemon did not stop cleanly: {error}");
        return ExitCode::FAILURE;
    }
    println!(
        "requests {}  stalls {} (answered late without help {}, lost wake-ups {})  wake-ups \
         sent by the protocol {}, by hand {}  in {:.1?} ({:.1} us per request)",
        totals.requests,
        totals.late + totals.rescues,
        totals.late,
        totals.rescues,
        wakeups,
        totals.rescues,
        totals.elapsed,
        totals.elapsed.as_secs_f64() * 1e6 / totals.requests.max(1) as f64
    );
    if !mutant && totals.rescues > 0 {
        eprintln!(
            "FAIL: the daemon as shipped lost {} wake-up(s)",
            totals.rescues
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
