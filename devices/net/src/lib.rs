//! virtio-net for hvisor-vhost, over a Linux TAP.
//!
//! [`NetBackend`] implements `vhost_user_backend::VhostUserBackend` and knows nothing of the
//! transport that drives it: the vhost-user daemon and the hvisor ring both run it unchanged.
//! It watches its TAP through the [`hvisor_vhost_core::EventRegistry`] each transport gives
//! its worker threads.
//!
//! Layers, from the wire down:
//! - [`backend`]: queues, notifications, worker threads, control queue, config space;
//! - [`tap`]: the TAP queues (and the small trait tests replace them through);
//! - [`virtio_net`]: header and config layouts, feature-to-TAP mapping.

pub mod backend;
pub mod config;
pub mod tap;
pub mod virtio_net;

pub use backend::{NetBackend, NetError, NetStats};
pub use config::{ConfigError, MacAddress, NetConfig, ParseMacError};
pub use tap::{Tap, TapError, TapQueue};
