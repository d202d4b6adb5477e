//! virtio-blk for hvisor-vhost.
//!
//! [`BlkBackend`] implements `vhost_user_backend::VhostUserBackend` and knows nothing of the
//! transport that drives it: the vhost-user daemon and the hvisor ring both run it unchanged.
//!
//! Layers, from the wire down:
//! - [`backend`]: queues, notifications, worker threads, config space;
//! - [`request`]: descriptor chains to validated requests, started on the queue's engine and
//!   answered when their operations end;
//! - [`device`]: request semantics (ranges, read-only, cache mode), checked before any I/O;
//! - [`engine`]: the operations of one queue, as the storage carries them out: [`SyncEngine`]
//!   on the queue's thread, or [`uring`]'s engine, which runs a kick's operations concurrently;
//! - [`storage`]: image files, block devices and in-memory disks, each handing out the
//!   engines of its queues.

pub mod backend;
pub mod config;
pub mod device;
pub mod engine;
pub mod request;
pub mod storage;
#[cfg(test)]
mod testing;
pub mod uring;
pub mod virtio_blk;

pub use backend::{BlkBackend, BlkError};
pub use config::{Backing, BlkConfig, ConfigError, IoEngine};
pub use engine::{Engine, FileEngine, Outcome, SyncEngine};
pub use storage::{EngineOptions, FileStorage, Storage};
