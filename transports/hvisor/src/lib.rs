//! The hvisor transport: serve guests of hvisor's non-root zones from the `virtio_bridge`
//! request ring, emulating virtio-mmio in front of the device crates.
//!
//! - [`abi`]: the shared page and ioctl numbers;
//! - [`ring`]: both halves of the ring protocol and its wake-up handshake;
//! - [`port`]: `/dev/hvisor`, or a hypervisor in another process ([`handoff`]);
//! - [`config`]: hvisor-tool's `virtio_cfg.json`;
//! - [`server`]: the request loop, which [`poll`] tells when to poll; [`mmio`]: the register
//!   file, in front of a backend of this process ([`local`]) or of a vhost-user backend in
//!   another one ([`remote`]); [`interrupt`]: IRQ delivery;
//!   [`counters`]: what each of them counts, read as one snapshot;
//! - [`devices`]: the devices of the configuration, opened before the hand-off and started
//!   behind virtio-mmio once zone RAM is mapped.
//!
//! hvisor's side played in software, for tests and workstations, is the `hvisor-sim` crate
//! under `testing/`.

pub use hvisor_bridge::{abi, ring, sync};

pub mod config;
pub mod counters;
pub mod devices;
mod file_kind;
pub mod handoff;
pub mod interrupt;
pub mod local;
pub mod mmio;
pub mod poll;
pub mod port;
pub mod remote;
pub mod server;
