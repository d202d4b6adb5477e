//! Validated settings of a console device, whichever transport or front end produced them.

use std::path::PathBuf;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// The host side of the console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackendConfig {
    /// A new pseudo-terminal; its slave path is logged and reported by
    /// `ConsoleBackend::pty_path` (as hvisor-tool's daemon does, e.g. `screen /dev/pts/3`).
    #[default]
    Pty,
    /// A listening Unix socket serving one client at a time; clients may come and go.
    UnixSocket(PathBuf),
    /// This process's stdin and stdout.
    Stdio,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub backend: BackendConfig,
    /// A file (appended to) that receives a copy of all guest output.
    pub output_log: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("socket path must not be empty")]
    EmptySocketPath,
    #[error(
        "socket path {path:?} is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("output log path must not be empty")]
    EmptyOutputLog,
}

impl ConsoleConfig {
    /// Checks every field; files and sockets are checked when they are opened.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if let BackendConfig::UnixSocket(path) = &self.backend {
            let len = path.as_os_str().len();
            if len == 0 {
                return Err(ConfigError::EmptySocketPath);
            }
            if len > MAX_SOCKET_PATH {
                return Err(ConfigError::SocketPathTooLong {
                    path: path.clone(),
                    len,
                });
            }
        }
        if self
            .output_log
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(ConfigError::EmptyOutputLog);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_is_the_default_and_valid() {
        let config = ConsoleConfig::default();
        assert_eq!(config.backend, BackendConfig::Pty);
        assert!(config.validate().is_ok());
        let socket = ConsoleConfig {
            backend: BackendConfig::UnixSocket("/tmp/console.sock".into()),
            output_log: Some("/tmp/console.log".into()),
        };
        assert!(socket.validate().is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let empty = ConsoleConfig {
            backend: BackendConfig::UnixSocket(PathBuf::new()),
            output_log: None,
        };
        assert_eq!(empty.validate(), Err(ConfigError::EmptySocketPath));
        let long = ConsoleConfig {
            backend: BackendConfig::UnixSocket(PathBuf::from("x".repeat(108))),
            output_log: None,
        };
        let error = long.validate().unwrap_err();
        assert!(matches!(
            error,
            ConfigError::SocketPathTooLong { len: 108, .. }
        ));
        assert!(error.to_string().contains("socket path"), "{error}");
        let no_log = ConsoleConfig {
            output_log: Some(PathBuf::new()),
            ..ConsoleConfig::default()
        };
        assert_eq!(no_log.validate(), Err(ConfigError::EmptyOutputLog));
    }
}
