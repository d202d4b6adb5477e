//! hvisor's `virtio_bridge`: the page shared by the hypervisor, `hvisor.ko` and the virtio
//! daemon ([`abi`]), and both halves of the protocol that moves requests and interrupts through
//! it ([`ring`]).
//!
//! The crate has no dependencies so that `RUSTFLAGS="--cfg loom"` builds it against loom's
//! atomics ([`sync`]) and the model-checking tests check the very code the daemon runs.

pub mod abi;
pub mod ring;
pub mod sync;
