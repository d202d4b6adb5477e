//! Synchronous register reads from several simulated vCPUs at once, each issued as soon as the
//! previous one is answered: the stress of the request ring's sleep/wake handshake. Shared by
//! `tests/ring_stress.rs` and the `lost_wakeup` and `ring_latency` examples, which include this
//! file by path, so it depends on nothing else under `tests/support`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hvisor_sim::{SimError, Simulator};
use hvisor_transport::mmio::{MAGIC_VALUE, VERSION, reg};
use hvisor_transport::ring::HypervisorSide;

/// The bound of every request of a run that fails on a stall; in a run that rescues, how long
/// a stalled request may take to come late, and then to come after its rescue.
pub const WATCHDOG: Duration = Duration::from_secs(1);

/// What a vCPU does when the daemon has not answered its request within the stall bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStall {
    /// Give up: the request's [`SimError::NoAnswer`], which shows the ring state, is the result.
    Fail,
    /// Wait up to [`WATCHDOG`] more for the answer: a daemon that was merely not scheduled
    /// answers meanwhile. A daemon that still has not answered slept through the request (a
    /// lost wake-up): send the wake-up by hand and wait up to [`WATCHDOG`] again.
    Rescue,
}

/// How the daemon answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Within the stall bound.
    InTime,
    /// After the stall bound, without help: the daemon ran late.
    Late,
    /// Only after a wake-up sent by hand: the protocol lost the wake-up.
    Rescued,
}

/// A device window of a zone.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub zone: u32,
    pub base: u64,
}

/// Reads the 32-bit register at `offset` of `target` as the vCPU on `cpu`, waiting `stall` for
/// the answer before acting as `on_stall` says. Returns the value and how it came.
pub fn read_register(
    sim: &Simulator,
    cpu: u32,
    target: Target,
    offset: u64,
    stall: Duration,
    on_stall: OnStall,
) -> Result<(u64, Answer), SimError> {
    let hypervisor = HypervisorSide::new(sim.bridge());
    let index = cpu as usize;
    // Only this vCPU's requests move its flag, so the value before the access tells when the
    // answer to a late request has come.
    let before = hypervisor.cfg_flag(index);
    let address = target.base + offset;
    let answered_within = |bound: Duration| {
        let since = Instant::now();
        while hypervisor.cfg_flag(index) == before {
            if since.elapsed() > bound {
                return false;
            }
            thread::yield_now();
        }
        true
    };
    match sim.access(cpu, target.zone, address, 4, None, stall) {
        Ok(value) => Ok((value, Answer::InTime)),
        Err(SimError::NoAnswer { .. }) if on_stall == OnStall::Rescue => {
            if answered_within(WATCHDOG) {
                return Ok((hypervisor.cfg_value(index), Answer::Late));
            }
            if let Err(error) = sim.kick_daemon() {
                eprintln!("rescue of cpu {cpu}: the wake-up failed: {error}");
            }
            if answered_within(WATCHDOG) {
                return Ok((hypervisor.cfg_value(index), Answer::Rescued));
            }
            Err(SimError::NoAnswer {
                timeout: stall + WATCHDOG * 2,
                access: format!(
                    "read of 4 bytes at {address:#x} by zone {} cpu {cpu}, even after a \
                     wake-up sent by hand",
                    target.zone
                ),
                state: sim.ring_state(index),
            })
        }
        Err(error) => Err(error),
    }
}

/// One stress run: `vcpus` vCPUs (physical CPUs 0..vcpus) each read registers of one device
/// back to back.
#[derive(Clone, Copy, Debug)]
pub struct StressPlan {
    pub target: Target,
    pub vcpus: u32,
    pub requests_per_vcpu: u64,
    /// Ends the run earlier once this much time has passed.
    pub time_limit: Option<Duration>,
    pub stall: Duration,
    pub on_stall: OnStall,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StressTotals {
    /// Requests answered, with the right value.
    pub requests: u64,
    /// Requests answered after the stall bound without help.
    pub late: u64,
    /// Requests the daemon answered only after a wake-up sent by hand: lost wake-ups.
    pub rescues: u64,
    pub elapsed: Duration,
}

/// The registers a vCPU alternates between, with the value each must read. Neighbouring
/// vCPUs read different ones at the same step, so an answer given to the wrong CPU shows.
const REGISTERS: [(u64, u64); 2] = [
    (reg::MAGIC_VALUE, MAGIC_VALUE as u64),
    (reg::VERSION, VERSION as u64),
];

/// Runs `plan`; the first failure (no answer in time, or a wrong value) ends every vCPU's run
/// and is the result.
pub fn run(sim: &Simulator, plan: &StressPlan) -> Result<StressTotals, String> {
    let started = Instant::now();
    let abort = AtomicBool::new(false);
    let outcomes: Vec<Result<StressTotals, String>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..plan.vcpus)
            .map(|cpu| {
                let abort = &abort;
                thread::Builder::new()
                    .name(format!("vcpu{cpu}"))
                    .spawn_scoped(scope, move || {
                        let outcome = vcpu(sim, plan, cpu, started, abort);
                        if outcome.is_err() {
                            abort.store(true, Ordering::Relaxed);
                        }
                        outcome
                    })
                    .expect("spawning a vCPU thread")
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err("a vCPU thread panicked".into()))
            })
            .collect()
    });
    let mut totals = StressTotals {
        elapsed: started.elapsed(),
        ..StressTotals::default()
    };
    for outcome in outcomes {
        let vcpu = outcome?;
        totals.requests += vcpu.requests;
        totals.late += vcpu.late;
        totals.rescues += vcpu.rescues;
    }
    Ok(totals)
}

fn vcpu(
    sim: &Simulator,
    plan: &StressPlan,
    cpu: u32,
    started: Instant,
    abort: &AtomicBool,
) -> Result<StressTotals, String> {
    /// Requests between looks at the clock and at the other vCPUs' failures.
    const CHECK_EVERY: u64 = 1024;
    let mut totals = StressTotals::default();
    for request in 0..plan.requests_per_vcpu {
        if request % CHECK_EVERY == 0
            && (abort.load(Ordering::Relaxed)
                || plan
                    .time_limit
                    .is_some_and(|limit| started.elapsed() >= limit))
        {
            break;
        }
        let (offset, expected) = REGISTERS[((request + u64::from(cpu)) % 2) as usize];
        let (value, answer) =
            read_register(sim, cpu, plan.target, offset, plan.stall, plan.on_stall)
                .map_err(|error| format!("cpu {cpu}, request {request} of this vCPU: {error}"))?;
        if value != expected {
            return Err(format!(
                "cpu {cpu}, request {request}: register {offset:#x} read {value:#x}, \
                 {expected:#x} expected; ring state: {}",
                sim.ring_state(cpu as usize)
            ));
        }
        totals.requests += 1;
        totals.late += u64::from(answer == Answer::Late);
        totals.rescues += u64::from(answer == Answer::Rescued);
    }
    Ok(totals)
}
