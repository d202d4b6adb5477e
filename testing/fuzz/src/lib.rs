//! Fuzz harnesses of hvisor-vhost: one function per target, taking the fuzzer's bytes.
//!
//! The cargo-fuzz targets in `fuzz/` call these under libFuzzer (nightly, `scripts/fuzz`);
//! `tests/regressions.rs` replays the stored corpora and crash inputs through the same
//! functions on stable `cargo test`. Every harness checks what the code under test did, not
//! only that it returned: see each module.

pub mod config;
pub mod devices;
pub mod guest;
pub mod handoff;
pub mod mmio;
pub mod seeds;
pub mod vhost_user;

/// A harness: the bytes of one input.
pub type Harness = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz target and corpus directory.
pub const TARGETS: &[(&str, Harness)] = &[
    ("blk", devices::blk),
    ("net", devices::net),
    ("console", devices::console),
    ("rng", devices::rng),
    ("mmio", mmio::mmio),
    ("virtio_cfg", config::virtio_cfg),
    ("handoff", handoff::handoff_hello),
    ("vhost_user", vhost_user::vhost_user),
];

/// The harness of target `name`.
pub fn harness(name: &str) -> Option<Harness> {
    TARGETS
        .iter()
        .find(|(target, _)| *target == name)
        .map(|(_, harness)| *harness)
}
