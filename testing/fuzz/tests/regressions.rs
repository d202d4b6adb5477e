//! Replays, on stable `cargo test`, every stored input of every target through the harness
//! the fuzzer runs: the curated seeds, the kept corpora (`corpus/<target>/`) and the inputs of
//! crashes that were fixed (`regressions/<target>/`, each named after what it found).

use std::path::{Path, PathBuf};
use std::sync::Once;

use hvisor_vhost_fuzz::{TARGETS, devices, harness, mmio, seeds};

/// A panic on any thread (a relay or a queue worker, not only the test's) fails the run, as
/// libFuzzer's hook makes it do under the fuzzer.
fn abort_on_panic() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            std::process::abort();
        }));
    });
}

fn stored_inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        inputs.extend(entries.map(|entry| entry.expect("directory entry").path()));
    }
    inputs.sort();
    inputs
}

fn replay(target: &str) {
    abort_on_panic();
    let run = harness(target).expect("a target");
    let seeds = seeds::seeds(target);
    assert!(!seeds.is_empty(), "{target} has no seeds");
    for seed in &seeds {
        run(seed);
    }
    let stored = stored_inputs(target);
    for path in &stored {
        eprintln!("{target}: {}", path.display());
        run(&std::fs::read(path).expect("stored input"));
    }
    eprintln!(
        "{target}: {} seeds and {} stored inputs replayed",
        seeds.len(),
        stored.len()
    );
}

#[test]
fn every_target_has_a_test_here() {
    let names: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "blk",
            "net",
            "console",
            "rng",
            "mmio",
            "virtio_cfg",
            "handoff",
            "vhost_user"
        ]
    );
}

#[test]
fn blk() {
    replay("blk");
}

#[test]
fn net() {
    replay("net");
}

#[test]
fn console() {
    replay("console");
}

#[test]
fn rng() {
    replay("rng");
}

#[test]
fn mmio() {
    replay("mmio");
}

#[test]
fn virtio_cfg() {
    replay("virtio_cfg");
}

#[test]
fn handoff() {
    replay("handoff");
}

#[test]
fn vhost_user() {
    replay("vhost_user");
}

/// The device and mmio targets keep their devices, guest memory and queues from one input to
/// the next and reset them in between: what an input does must not depend on what ran before
/// it. Every stored input is run after a different predecessor in each order (seeds first,
/// then the stored inputs forwards, then all of them backwards) and must have the same digest
/// (guest memory after it; for mmio the register values it read) both times.
fn independent_of_order(target: &str, digest: impl Fn(&[u8]) -> Option<u64>) {
    abort_on_panic();
    let mut inputs = seeds::seeds(target);
    inputs.extend(
        stored_inputs(target)
            .iter()
            .map(|path| std::fs::read(path).expect("stored input")),
    );
    let forwards: Vec<Option<u64>> = inputs.iter().map(|input| digest(input)).collect();
    let backwards: Vec<Option<u64>> = inputs.iter().rev().map(|input| digest(input)).collect();
    let differing: Vec<usize> = (0..inputs.len())
        .filter(|&i| forwards[i] != backwards[inputs.len() - 1 - i])
        .collect();
    assert!(
        differing.is_empty(),
        "{target}: inputs {differing:?} (of {}) had different effects after different \
         predecessors",
        inputs.len()
    );
    assert!(
        forwards.iter().filter(|digest| digest.is_some()).count() > 1,
        "{target}: too few inputs ran"
    );
}

#[test]
fn rng_inputs_are_independent() {
    independent_of_order("rng", |input| devices::digest("rng", input));
}

#[test]
fn blk_inputs_are_independent() {
    independent_of_order("blk", |input| devices::digest("blk", input));
}

#[test]
fn net_inputs_are_independent() {
    independent_of_order("net", |input| devices::digest("net", input));
}

#[test]
fn console_inputs_are_independent() {
    independent_of_order("console", |input| devices::digest("console", input));
}

#[test]
fn mmio_inputs_are_independent() {
    independent_of_order("mmio", mmio::digest);
}
