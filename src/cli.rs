//! Command line: clap arguments, and their conversion into validated settings.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use hvisor_vhost_blk::config::{DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE, MAX_QUEUES};
use hvisor_vhost_blk::{Backing, BlkConfig, ConfigError};

#[derive(Debug, Parser)]
#[command(name = "hvisor-vhost", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a virtio-blk disk to a vhost-user frontend (e.g. QEMU's vhost-user-blk-pci).
    Blk(BlkArgs),
    /// Serve hvisor zones from the virtio_bridge ring, in place of `hvisor virtio start`.
    Hvisor(HvisorArgs),
    /// Play hvisor's side for a daemon started with --hypervisor-socket, and drive every
    /// configured device like a guest would (to try the hvisor path without hvisor).
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct HvisorArgs {
    /// hvisor-tool's virtio_cfg.json, unchanged.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Attach to a hypervisor played by another process on this Unix socket (the simulator,
    /// the hvisor stand-in) instead of /dev/hvisor.
    #[arg(long)]
    pub hypervisor_socket: Option<PathBuf>,
    /// Microseconds to busy-poll the request ring after the last request before sleeping;
    /// 0 sleeps at once.
    #[arg(long, default_value_t = 50)]
    pub poll_us: u64,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The virtio_cfg.json the daemon serves.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Unix socket to listen on for the daemon's --hypervisor-socket.
    #[arg(short, long)]
    pub socket: PathBuf,
    /// Write-and-verify rounds per blk device.
    #[arg(long, default_value_t = 256)]
    pub rounds: u32,
}

#[derive(Debug, Args)]
pub struct BlkArgs {
    /// Unix socket to listen on; created (replacing a stale one) and removed on exit.
    #[arg(short, long)]
    pub socket_path: PathBuf,
    /// Raw image file or block device. Without it, an in-memory disk of --size is served.
    #[arg(short, long)]
    pub image: Option<PathBuf>,
    /// Size of the in-memory disk, in bytes or with a K, M, G or T suffix (powers of 1024).
    #[arg(long, default_value = "256M", value_parser = parse_size, conflicts_with = "image")]
    pub size: u64,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub readonly: bool,
    /// Serial number reported by GET_ID (at most 20 bytes).
    #[arg(long, default_value = "")]
    pub serial: String,
    /// Number of request queues, each served by its own thread (1 to 64).
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Largest queue size offered to the driver (a power of two, at most 1024).
    #[arg(long, default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,
}

/// A size with an optional binary suffix: `4096`, `512K`, `256M`, `1G`, `2GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4096, 512K, 256M, 1G)"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{text:?}: unknown size suffix {suffix:?}")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("socket path {path}: directory {dir} does not exist")]
    SocketDirectoryMissing { path: PathBuf, dir: PathBuf },
    #[error("socket path {0} is empty or names a directory")]
    SocketPathInvalid(PathBuf),
    #[error(transparent)]
    Blk(#[from] ConfigError),
}

/// Where a vhost-user device listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketPath(PathBuf);

impl SocketPath {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<PathBuf> for SocketPath {
    type Error = ArgsError;

    fn try_from(path: PathBuf) -> Result<Self, ArgsError> {
        if path.as_os_str().is_empty() || path.is_dir() || path.file_name().is_none() {
            return Err(ArgsError::SocketPathInvalid(path));
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(ArgsError::SocketDirectoryMissing { path, dir });
        }
        Ok(SocketPath(path))
    }
}

/// Validated settings of `hvisor-vhost blk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkServe {
    pub socket: SocketPath,
    pub blk: BlkConfig,
}

impl TryFrom<BlkArgs> for BlkServe {
    type Error = ArgsError;

    fn try_from(args: BlkArgs) -> Result<Self, ArgsError> {
        let backing = match args.image {
            Some(path) => Backing::Image(path),
            None => Backing::Memory { size: args.size },
        };
        let blk = BlkConfig {
            backing,
            readonly: args.readonly,
            serial: args.serial,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
        }
        .validate()?;
        Ok(BlkServe {
            socket: SocketPath::try_from(args.socket_path)?,
            blk,
        })
    }
}

const _: () = assert!(MAX_QUEUES <= 64 && MAX_QUEUE_SIZE <= 1024);

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(args: &[&str]) -> Result<BlkServe, String> {
        let cli = Cli::try_parse_from(["hvisor-vhost", "blk"].iter().chain(args))
            .map_err(|error| error.to_string())?;
        let Command::Blk(args) = cli.command else {
            return Err("not the blk command".into());
        };
        BlkServe::try_from(args).map_err(|error| error.to_string())
    }

    #[test]
    fn sizes_accept_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(
            parse_size("12Q")
                .unwrap_err()
                .contains("unknown size suffix")
        );
        assert!(parse_size("M").is_err());
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn defaults_give_an_in_memory_disk() {
        let serve = blk(&["--socket-path", "/tmp/x.sock"]).unwrap();
        assert_eq!(serve.socket.path(), Path::new("/tmp/x.sock"));
        assert_eq!(serve.blk, BlkConfig::memory(256 << 20));
    }

    #[test]
    fn every_option_reaches_the_config() {
        let serve = blk(&[
            "-s",
            "rel.sock",
            "--image",
            "/dev/null",
            "--readonly",
            "--serial",
            "abc",
            "--num-queues",
            "4",
            "--queue-size",
            "1024",
        ])
        .unwrap();
        assert_eq!(
            serve.blk,
            BlkConfig {
                backing: Backing::Image("/dev/null".into()),
                readonly: true,
                serial: "abc".into(),
                num_queues: 4,
                queue_size: 1024,
            }
        );
    }

    #[test]
    fn bad_input_is_named() {
        let missing_dir = blk(&["-s", "/nonexistent-dir/x.sock"]).unwrap_err();
        assert!(
            missing_dir.contains("directory /nonexistent-dir does not exist"),
            "{missing_dir}"
        );
        assert!(
            blk(&["-s", "/tmp"])
                .unwrap_err()
                .contains("names a directory")
        );
        assert!(
            blk(&["-s", "/tmp/x", "--num-queues", "0"])
                .unwrap_err()
                .contains("num-queues 0")
        );
        assert!(
            blk(&["-s", "/tmp/x", "--queue-size", "100"])
                .unwrap_err()
                .contains("queue-size 100")
        );
        assert!(
            blk(&["-s", "/tmp/x", "--size", "0"])
                .unwrap_err()
                .contains("size 0")
        );
        assert!(
            blk(&["-s", "/tmp/x", "--serial", &"s".repeat(21)])
                .unwrap_err()
                .contains("serial")
        );
        assert!(blk(&["-s", "/tmp/x", "--image", "a", "--size", "1M"]).is_err());
    }
}
