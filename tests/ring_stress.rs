//! The request ring's sleep/wake handshake on real cores: two vCPU threads read registers of a
//! blk device back to back while the daemon, with no busy-poll window, goes to sleep whenever
//! the ring is empty. A million round trips, each of which must be answered within a second:
//! a lost wake-up (docs/hvisor-abi.md section 5) leaves a vCPU spinning, and the watchdog fails the test
//! with the ring state.
//!
//! Timed on real threads, so it runs in release builds only:
//! `cargo test --release --test ring_stress`.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::hvisor::{BlkSpec, Rig, RigOptions, TestResult};
use support::stress::{self, OnStall, StressPlan, Target, WATCHDOG};

const BLK: BlkSpec = BlkSpec {
    zone: 1,
    addr: 0xa00_3c00,
    irq: 78,
};
const VCPUS: u32 = 2;
const ROUND_TRIPS: u64 = 1_000_000;

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "run in release: scripts/test runs cargo test --release --test ring_stress"
)]
fn a_million_round_trips_through_the_sleep_wake_path_are_all_answered() -> TestResult {
    // A zero poll window: the daemon offers to sleep every time it finds the ring empty, so
    // every request races the handshake.
    let rig = Rig::start(RigOptions {
        poll: Duration::ZERO,
        ..RigOptions::new(&[BLK])
    });
    let totals = stress::run(
        &rig.sim,
        &StressPlan {
            target: Target {
                zone: BLK.zone,
                base: BLK.addr,
            },
            vcpus: VCPUS,
            requests_per_vcpu: ROUND_TRIPS / u64::from(VCPUS),
            time_limit: None,
            stall: WATCHDOG,
            on_stall: OnStall::Fail,
        },
    )?;
    let wakeups = rig.sim.stats.wakeups_sent.load(Ordering::Relaxed);
    eprintln!(
        "{} round trips from {VCPUS} vCPUs in {:.2?} ({:.1} us each); {wakeups} wake-ups sent",
        totals.requests,
        totals.elapsed,
        totals.elapsed.as_secs_f64() * 1e6 / totals.requests as f64
    );
    assert_eq!(totals.requests, ROUND_TRIPS);
    // The daemon really slept between requests; otherwise the handshake was never exercised.
    assert!(
        wakeups >= ROUND_TRIPS / 100,
        "only {wakeups} wake-ups for {ROUND_TRIPS} requests"
    );
    Ok(rig.stop()?)
}
