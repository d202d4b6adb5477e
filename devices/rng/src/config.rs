//! Validated settings of an entropy device, whichever transport or front end produced them.

use std::path::PathBuf;

/// Where entropy comes from unless the config names another source.
pub const DEFAULT_SOURCE: &str = "/dev/urandom";

/// At most this many bytes per second is allowed for a rate limit; the bucket arithmetic is
/// exact far beyond it, but a larger value is certainly a typo.
pub const MAX_BYTES_PER_SEC: u64 = 1 << 40;

/// A token bucket: `bytes_per_sec` on average, at most `burst` bytes at once after a pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub burst: u64,
}

impl RateLimit {
    /// A limit whose burst is one second's worth.
    pub fn per_second(bytes_per_sec: u64) -> Self {
        RateLimit {
            bytes_per_sec,
            burst: bytes_per_sec,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngConfig {
    /// A readable file, character device or FIFO.
    pub source: PathBuf,
    pub rate_limit: Option<RateLimit>,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            source: PathBuf::from(DEFAULT_SOURCE),
            rate_limit: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("source must name a file, character device or FIFO")]
    EmptySource,
    #[error("rate limit {0} bytes per second is out of range 1..={MAX_BYTES_PER_SEC}")]
    BytesPerSec(u64),
    #[error("burst {0} bytes must be at least 1")]
    Burst(u64),
}

impl RngConfig {
    /// Checks every field; the source itself is checked when it is opened.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.source.as_os_str().is_empty() {
            return Err(ConfigError::EmptySource);
        }
        if let Some(limit) = self.rate_limit {
            if !(1..=MAX_BYTES_PER_SEC).contains(&limit.bytes_per_sec) {
                return Err(ConfigError::BytesPerSec(limit.bytes_per_sec));
            }
            if limit.burst == 0 {
                return Err(ConfigError::Burst(limit.burst));
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = RngConfig::default().validate().unwrap();
        assert_eq!(config.source, PathBuf::from("/dev/urandom"));
        let limited = RngConfig {
            rate_limit: Some(RateLimit::per_second(1024)),
            ..RngConfig::default()
        };
        assert!(limited.validate().is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let empty = RngConfig {
            source: PathBuf::new(),
            ..RngConfig::default()
        };
        assert_eq!(empty.validate(), Err(ConfigError::EmptySource));
        for rate in [0, MAX_BYTES_PER_SEC + 1] {
            let config = RngConfig {
                rate_limit: Some(RateLimit::per_second(rate)),
                ..RngConfig::default()
            };
            assert_eq!(config.validate(), Err(ConfigError::BytesPerSec(rate)));
        }
        let no_burst = RngConfig {
            rate_limit: Some(RateLimit {
                bytes_per_sec: 10,
                burst: 0,
            }),
            ..RngConfig::default()
        };
        let error = no_burst.validate().unwrap_err();
        assert_eq!(error, ConfigError::Burst(0));
        assert!(error.to_string().contains("burst 0"), "{error}");
    }
}
