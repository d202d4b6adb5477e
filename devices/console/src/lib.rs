//! virtio-console for hvisor-vhost: one port (no multiport), served from a PTY, a reconnectable
//! Unix socket, or the process's stdin/stdout, with an optional log of all guest output.
//!
//! [`ConsoleBackend`] implements `vhost_user_backend::VhostUserBackend` and knows nothing of the
//! transport that drives it. No byte is lost in either direction: guest output completes only
//! once the backend took it (a full backend back-pressures the guest), and input is read only
//! while the guest has receive buffers for it.
//!
//! - [`backend`]: queues, events, config space;
//! - [`endpoint`]: the host side (PTY, socket server, stdio), all non-blocking;
//! - [`virtio_console`]: wire formats.

pub mod backend;
pub mod config;
pub mod endpoint;
pub mod virtio_console;

pub use backend::{ConsoleBackend, ConsoleError};
pub use config::{BackendConfig, ConfigError, ConsoleConfig};
