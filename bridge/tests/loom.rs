//! Model checking of the ring protocol with loom: every interleaving and every weak-memory
//! outcome loom can produce for the code in `src/ring.rs`, built against loom's atomics.
//!
//! Run with `scripts/loom`, which builds this with `--cfg loom` and then once per mutant
//! (`--cfg hvisor_mutant="..."`, each switching off one fence). In a mutant build, the models
//! that the missing fence breaks must fail, and this file asserts that loom reports it.
#![cfg(loom)]

use hvisor_bridge::abi::{DeviceReq, DeviceRes, VirtioBridge};
use hvisor_bridge::ring::{HypervisorSide, RequestConsumer, answer, push_result};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};

/// The mutant this build was made with, if any.
fn active_mutant() -> Option<&'static str> {
    if cfg!(hvisor_mutant = "no_consumer_fence") {
        Some("no_consumer_fence")
    } else if cfg!(hvisor_mutant = "no_producer_fence") {
        Some("no_producer_fence")
    } else if cfg!(hvisor_mutant = "no_acquire_per_item") {
        Some("no_acquire_per_item")
    } else {
        None
    }
}

/// Runs `model` in the normal build. In a mutant build it runs only the models the mutant
/// breaks, and requires loom to report the failure; the others are skipped (their state space
/// grows without the fence, and they prove nothing about it).
fn check(model: fn(), breaking_mutants: &[&str]) {
    match active_mutant() {
        None => model(),
        Some(mutant) if breaking_mutants.contains(&mutant) => {
            let outcome = std::panic::catch_unwind(model);
            assert!(outcome.is_err(), "loom did not catch the {mutant} mutant");
            eprintln!("loom caught the {mutant} mutant, as it must");
        }
        Some(mutant) => {
            eprintln!("skipped in the {mutant} build: that fence is not what it checks")
        }
    }
}

fn model(body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(body);
}

fn request(cpu: u64, address: u64, posted: bool) -> DeviceReq {
    DeviceReq {
        src_cpu: cpu,
        address,
        size: 4,
        value: 0,
        src_zone: 1,
        is_write: posted,
        need_interrupt: posted,
    }
}

/// hvisor's side of one trapped access: publish under the request lock, then the wake-up check.
fn publish(bridge: &VirtioBridge, rear: &Mutex<u32>, request: &DeviceReq, woken: &AtomicBool) {
    let hypervisor = HypervisorSide::new(bridge);
    {
        let mut rear = rear.lock().unwrap();
        assert!(hypervisor.try_push(&mut rear, request));
    }
    if hypervisor.needs_wakeup() {
        // The IPI: modelled as a flag the test reads after the threads are done.
        woken.store(true, Ordering::SeqCst);
    }
}

/// The daemon's drain-until-it-may-sleep round; returns how many requests it handled.
fn drain_until_asleep(consumer: &mut RequestConsumer<'_>) -> usize {
    consumer.announce_awake();
    let mut handled = 0;
    loop {
        while consumer.pop().is_some() {
            handled += 1;
        }
        if consumer.prepare_to_sleep() {
            return handled;
        }
    }
}

/// Whatever the interleaving, a daemon that goes to sleep has either handled every request or
/// been sent a wake-up (vCPUs on two CPUs publishing concurrently).
fn no_lost_wakeup() {
    model(|| {
        let bridge = Arc::new(VirtioBridge::default());
        let lock = Arc::new(Mutex::new(HypervisorSide::new(&bridge).request_rear()));
        let woken = Arc::new(AtomicBool::new(false));
        let vcpus: Vec<_> = (0..2u64)
            .map(|cpu| {
                let (bridge, lock, woken) = (bridge.clone(), lock.clone(), woken.clone());
                loom::thread::spawn(move || {
                    publish(&bridge, &lock, &request(cpu, 0x50 + cpu, true), &woken)
                })
            })
            .collect();
        let mut consumer = RequestConsumer::new(&bridge);
        let handled = drain_until_asleep(&mut consumer);
        for vcpu in vcpus {
            vcpu.join().unwrap();
        }
        assert!(
            handled == 2 || woken.load(Ordering::SeqCst),
            "lost wake-up: the daemon sleeps with {} request(s) pending and no IPI was sent",
            2 - handled
        );
    });
}

/// A vCPU that sees its `cfg_flags` entry change reads the answer to its own request, never a
/// stale value, and the daemon answers the request as published. Each side acts once (no spin
/// loops), which keeps the state space small while covering every order of the two.
fn answers_are_never_stale() {
    model(|| {
        let bridge = Arc::new(VirtioBridge::default());
        // Read at start-up, before any vCPU runs, as the simulator does.
        let mut rear = HypervisorSide::new(&bridge).request_rear();
        let vcpu = {
            let bridge = bridge.clone();
            loom::thread::spawn(move || {
                let hypervisor = HypervisorSide::new(&bridge);
                let before = hypervisor.cfg_flag(3);
                assert!(hypervisor.try_push(&mut rear, &request(3, 0xa003c00, false)));
                if hypervisor.cfg_flag(3) != before {
                    assert_eq!(hypervisor.cfg_value(3), 0xa003c00 ^ 0xffff, "stale answer");
                }
            })
        };
        let mut consumer = RequestConsumer::new(&bridge);
        if let Some(request) = consumer.pop() {
            assert_eq!(request, self::request(3, 0xa003c00, false), "torn request");
            assert!(answer(&bridge, request.src_cpu, request.address ^ 0xffff));
        }
        vcpu.join().unwrap();
    });
}

/// Interrupts pushed by the daemon reach the hypervisor intact, whenever it looks.
fn results_arrive_intact() {
    model(|| {
        let bridge = Arc::new(VirtioBridge::default());
        let daemon = {
            let bridge = bridge.clone();
            loom::thread::spawn(move || {
                assert!(push_result(
                    &bridge,
                    DeviceRes {
                        target_zone: 1,
                        irq_id: 78
                    }
                ));
            })
        };
        if let Some(result) = HypervisorSide::new(&bridge).pop_result() {
            assert_eq!(
                result,
                DeviceRes {
                    target_zone: 1,
                    irq_id: 78
                }
            );
        }
        daemon.join().unwrap();
    });
}

#[test]
fn no_interleaving_loses_a_wakeup() {
    check(no_lost_wakeup, &["no_consumer_fence", "no_producer_fence"]);
}

#[test]
fn synchronous_answers_are_never_stale() {
    check(answers_are_never_stale, &["no_acquire_per_item"]);
}

#[test]
fn result_ring_entries_arrive_intact() {
    check(results_arrive_intact, &[]);
}
