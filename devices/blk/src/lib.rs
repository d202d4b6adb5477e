//! virtio-blk for hvisor-vhost.
//!
//! [`BlkBackend`] implements `vhost_user_backend::VhostUserBackend` and knows nothing of the
//! transport that drives it: the vhost-user daemon and the hvisor ring both run it unchanged.
//!
//! Layers, from the wire down:
//! - [`backend`]: queues, notifications, worker threads, config space;
//! - [`request`]: descriptor chains to validated requests;
//! - [`device`]: request semantics (ranges, read-only, flush, discard) over a [`Storage`];
//! - [`uring`]: the io_uring data path, which runs a kick's requests concurrently;
//! - [`storage`]: image files, block devices and in-memory disks.

pub mod backend;
pub mod config;
pub mod device;
pub mod request;
pub mod storage;
pub mod uring;
pub mod virtio_blk;

pub use backend::{BlkBackend, BlkError};
pub use config::{Backing, BlkConfig, ConfigError, IoEngine};
pub use storage::{FileStorage, Storage};
