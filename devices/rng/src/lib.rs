//! virtio-rng (entropy device) for hvisor-vhost.
//!
//! [`RngBackend`] implements `vhost_user_backend::VhostUserBackend` and knows nothing of the
//! transport that drives it: the vhost-user daemon and the hvisor ring both run it unchanged.
//!
//! - [`backend`]: the queue, the rate-limit timer, config space;
//! - [`source`]: the entropy source, read straight into guest buffers;
//! - [`rate_limit`]: the token bucket behind the optional rate limit.

pub mod backend;
pub mod config;
pub mod rate_limit;
pub mod source;

pub use backend::{RngBackend, RngError};
pub use config::{ConfigError, DEFAULT_SOURCE, RateLimit, RngConfig};
