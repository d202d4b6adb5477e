//! Atomics used on the shared page: std's normally, loom's when model checking (`cfg(loom)`),
//! so the ring protocol is checked in exactly the form that runs.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering, fence};
