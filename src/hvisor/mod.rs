//! The hvisor transport: serve guests of hvisor's non-root zones from the `virtio_bridge`
//! request ring, emulating virtio-mmio for the device crates.

pub mod abi;
pub mod ring;
pub mod sync;
