//! Validated settings of a block device, whichever transport or front end produced them.

use std::path::PathBuf;

use crate::device::SERIAL_LEN;
use crate::virtio_blk::SECTOR_SIZE;

pub const DEFAULT_MEMORY_SIZE: u64 = 256 << 20;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// One worker thread per queue, tracked in a 64-bit mask by vhost-user-backend.
pub const MAX_QUEUES: u16 = 64;
/// Default busy-poll window after a queue drains, as in cloud-hypervisor's vhost-user-block.
pub const DEFAULT_POLL_US: u32 = 50;
/// A longer window would keep a core spinning for a guest that has gone idle.
pub const MAX_POLL_US: u32 = 1000;

/// How a queue worker moves data between guest memory and the backing file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// One io_uring per queue: every request of a kick is submitted in one system call and runs
    /// concurrently, which is what O_DIRECT images need to reach their queue depth.
    #[default]
    IoUring,
    /// `preadv`/`pwritev` on the worker thread, one request after the other.
    Sync,
}

/// What holds the disk's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A raw image file or a block device.
    Image(PathBuf),
    /// A zero-filled disk in memory, gone when the process exits.
    Memory { size: u64 },
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Image(path) => write!(f, "image {}", path.display()),
            Backing::Memory { .. } => f.write_str("in-memory disk"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    pub backing: Backing,
    pub readonly: bool,
    pub serial: String,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    pub direct: bool,
    pub io_engine: IoEngine,
    /// How long a worker keeps polling its queue after it ran dry, in microseconds (0: never).
    pub poll_us: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("serial {serial:?} is {len} bytes; at most {SERIAL_LEN} fit")]
    SerialTooLong { serial: String, len: usize },
    #[error("num-queues {0} is out of range 1..={MAX_QUEUES}")]
    NumQueues(u16),
    #[error("queue-size {0} must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("size {0} must be a non-zero multiple of 512 bytes")]
    MemorySize(u64),
    #[error("poll-us {0} is above the limit of {MAX_POLL_US}")]
    PollUs(u32),
}

impl BlkConfig {
    /// An in-memory disk of the default size with default queues.
    pub fn memory(size: u64) -> Self {
        BlkConfig {
            backing: Backing::Memory { size },
            readonly: false,
            serial: String::new(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            direct: false,
            io_engine: IoEngine::default(),
            poll_us: DEFAULT_POLL_US,
        }
    }

    /// A disk on `path` with default queues.
    pub fn image(path: impl Into<PathBuf>) -> Self {
        BlkConfig {
            backing: Backing::Image(path.into()),
            ..Self::memory(DEFAULT_MEMORY_SIZE)
        }
    }

    /// Checks every field; the image itself is checked when it is opened.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.serial.len() > SERIAL_LEN {
            return Err(ConfigError::SerialTooLong {
                len: self.serial.len(),
                serial: self.serial,
            });
        }
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return Err(ConfigError::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&self.queue_size) {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if self.poll_us > MAX_POLL_US {
            return Err(ConfigError::PollUs(self.poll_us));
        }
        if let Backing::Memory { size } = self.backing {
            if size == 0 || size % SECTOR_SIZE != 0 {
                return Err(ConfigError::MemorySize(size));
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
        assert!(BlkConfig::memory(DEFAULT_MEMORY_SIZE).validate().is_ok());
        assert!(BlkConfig::image("/dev/null").validate().is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = BlkConfig::memory(DEFAULT_MEMORY_SIZE);
        let long = BlkConfig {
            serial: "x".repeat(21),
            ..base.clone()
        };
        assert!(matches!(
            long.validate(),
            Err(ConfigError::SerialTooLong { len: 21, .. })
        ));
        for queues in [0, MAX_QUEUES + 1] {
            let config = BlkConfig {
                num_queues: queues,
                ..base.clone()
            };
            assert_eq!(config.validate(), Err(ConfigError::NumQueues(queues)));
        }
        for size in [0, 1, 100, 2048] {
            let config = BlkConfig {
                queue_size: size,
                ..base.clone()
            };
            assert_eq!(config.validate(), Err(ConfigError::QueueSize(size)));
        }
        for size in [0, 1000] {
            assert_eq!(
                BlkConfig::memory(size).validate(),
                Err(ConfigError::MemorySize(size))
            );
        }
        let poll = BlkConfig {
            poll_us: MAX_POLL_US + 1,
            ..base.clone()
        };
        assert_eq!(poll.validate(), Err(ConfigError::PollUs(MAX_POLL_US + 1)));
        let error = ConfigError::QueueSize(3).to_string();
        assert!(error.contains("queue-size 3"), "{error}");
    }
}
