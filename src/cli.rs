//! Command line: clap arguments, and their conversion into validated settings.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use hvisor_vhost_blk::config::{DEFAULT_POLL_US, DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE, MAX_QUEUES};
use hvisor_vhost_blk::{Backing, BlkConfig, ConfigError, IoEngine};
use hvisor_vhost_console::{BackendConfig, ConsoleConfig};
use hvisor_vhost_net::{MacAddress, NetConfig};
use hvisor_vhost_rng::{DEFAULT_SOURCE, RateLimit, RngConfig};

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
    /// Serve a virtio-net device backed by a TAP interface to a vhost-user frontend.
    Net(NetArgs),
    /// Serve a virtio-console (PTY, Unix socket or stdio) to a vhost-user frontend.
    Console(ConsoleArgs),
    /// Serve a virtio-rng entropy device to a vhost-user frontend (e.g. vhost-user-rng-pci).
    Rng(RngArgs),
    /// Serve hvisor zones from the virtio_bridge ring, in place of `hvisor virtio start`. A
    /// device whose entry names a vhost-user backend's "socket" is served by that backend,
    /// which must be listening when the daemon starts.
    Hvisor(HvisorArgs),
    /// Play hvisor's side for a daemon started with --hypervisor-socket, and drive every
    /// configured device like a guest would (to try the hvisor path without hvisor). Needs a
    /// build with `--features simulator`.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct NetArgs {
    /// Unix socket to listen on; created (replacing a stale one) and removed on exit.
    #[arg(short, long)]
    pub socket_path: PathBuf,
    /// TAP interface to attach to.
    #[arg(long)]
    pub tap: String,
    /// Create the TAP if no interface of that name exists (needs CAP_NET_ADMIN).
    #[arg(long)]
    pub create_tap: bool,
    /// MAC address the guest sees (aa:bb:cc:dd:ee:ff); derived from the TAP name if not given.
    #[arg(long)]
    pub mac: Option<MacAddress>,
    /// RX/TX queue pairs, one thread and one TAP queue each (more than 1 offers MQ).
    #[arg(long, default_value_t = 1)]
    pub queue_pairs: u16,
    /// Largest queue size offered to the driver (a power of two, at most 1024).
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Unix socket to listen on for the vhost-user frontend.
    #[arg(short, long)]
    pub socket_path: PathBuf,
    /// Use a new pseudo-terminal (the default); its path is printed.
    #[arg(long, conflicts_with_all = ["unix_socket", "stdio"])]
    pub pty: bool,
    /// Serve the console on this Unix socket, one client at a time (e.g. `socat - UNIX:PATH`).
    #[arg(long, conflicts_with = "stdio")]
    pub unix_socket: Option<PathBuf>,
    /// Use this process's stdin and stdout.
    #[arg(long)]
    pub stdio: bool,
    /// Append a copy of all guest output to this file.
    #[arg(long)]
    pub output_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RngArgs {
    /// Unix socket to listen on; created (replacing a stale one) and removed on exit.
    #[arg(short, long)]
    pub socket_path: PathBuf,
    /// Where the entropy comes from: a file, character device or FIFO.
    #[arg(long, default_value = DEFAULT_SOURCE)]
    pub source: PathBuf,
    /// Bytes per second at most (no limit when not given).
    #[arg(long)]
    pub rate_limit: Option<u64>,
    /// Bytes that may be served at once after a pause [default: one second's worth].
    #[arg(long, requires = "rate_limit")]
    pub burst: Option<u64>,
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
    /// Ceiling, in microseconds, of the adaptive busy-poll of the request ring after the last
    /// request before sleeping (windows shrink while polling finds nothing); 0 sleeps at once.
    #[arg(long, default_value_t = 50)]
    pub poll_us: u64,
    /// Nice value of the daemon's threads, -20 to 19 [default: -10]. A guest vCPU waits for
    /// the request loop on every register access, so other root-zone work should not delay
    /// it. Lowering it needs CAP_SYS_NICE (root, as on an hvisor root zone); without it the
    /// threads keep the inherited value, with a warning for a value given here and an info
    /// line for the default.
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: Option<i32>,
    /// Also append every counters report (on SIGUSR1 and at exit) to this file, one JSON
    /// object per line.
    #[arg(long)]
    pub counters_file: Option<PathBuf>,
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
    /// Open the image with O_DIRECT (no host page cache). Unaligned guest buffers, which Linux
    /// guests do not send, go through an aligned bounce buffer.
    #[arg(long)]
    pub direct: bool,
    /// How each queue moves data: `io-uring` runs a kick's requests concurrently; `sync` serves
    /// them one by one with preadv/pwritev on the queue's thread.
    #[arg(long, default_value = "io-uring", value_parser = ["io-uring", "sync"])]
    pub io_engine: String,
    /// Microseconds a queue thread keeps polling its ring after it ran dry, before waiting for
    /// a kick (0 disables; at most 1000). Spent only after requests that completed without
    /// waiting for the disk (page-cache hits, in-memory disks), whose driver is still awake.
    #[arg(long, default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u32,
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
    #[error(transparent)]
    Net(#[from] hvisor_vhost_net::ConfigError),
    #[error(transparent)]
    Console(#[from] hvisor_vhost_console::ConfigError),
    #[error(transparent)]
    Rng(#[from] hvisor_vhost_rng::ConfigError),
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
            direct: args.direct,
            io_engine: if args.io_engine == "sync" {
                IoEngine::Sync
            } else {
                IoEngine::IoUring
            },
            poll_us: args.poll_us,
        }
        .validate()?;
        Ok(BlkServe {
            socket: SocketPath::try_from(args.socket_path)?,
            blk,
        })
    }
}

/// A vhost-user device: where it listens and its validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serve<C> {
    pub socket: SocketPath,
    pub device: C,
}

impl TryFrom<NetArgs> for Serve<NetConfig> {
    type Error = ArgsError;

    fn try_from(args: NetArgs) -> Result<Self, ArgsError> {
        let device = NetConfig {
            create_tap: args.create_tap,
            mac: args.mac,
            queue_pairs: args.queue_pairs,
            queue_size: args.queue_size,
            ..NetConfig::tap(args.tap)
        }
        .validate()?;
        Ok(Serve {
            socket: SocketPath::try_from(args.socket_path)?,
            device,
        })
    }
}

impl TryFrom<ConsoleArgs> for Serve<ConsoleConfig> {
    type Error = ArgsError;

    fn try_from(args: ConsoleArgs) -> Result<Self, ArgsError> {
        let backend = match (args.unix_socket, args.stdio) {
            (Some(path), _) => BackendConfig::UnixSocket(path),
            (None, true) => BackendConfig::Stdio,
            (None, false) => BackendConfig::Pty,
        };
        let device = ConsoleConfig {
            backend,
            output_log: args.output_log,
        }
        .validate()?;
        Ok(Serve {
            socket: SocketPath::try_from(args.socket_path)?,
            device,
        })
    }
}

impl TryFrom<RngArgs> for Serve<RngConfig> {
    type Error = ArgsError;

    fn try_from(args: RngArgs) -> Result<Self, ArgsError> {
        let rate_limit = args.rate_limit.map(|bytes_per_sec| RateLimit {
            bytes_per_sec,
            burst: args.burst.unwrap_or(bytes_per_sec),
        });
        let device = RngConfig {
            source: args.source,
            rate_limit,
        }
        .validate()?;
        Ok(Serve {
            socket: SocketPath::try_from(args.socket_path)?,
            device,
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

    fn parse(args: &[&str]) -> Result<Command, String> {
        Cli::try_parse_from(std::iter::once(&"hvisor-vhost").chain(args))
            .map(|cli| cli.command)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn the_hvisor_daemon_takes_a_nice_value_in_range() {
        let nice = |extra: &[&str]| -> Result<Option<i32>, String> {
            let args = [&["hvisor", "-c", "virtio_cfg.json"], extra].concat();
            match parse(&args)? {
                Command::Hvisor(args) => Ok(args.nice),
                other => Err(format!("{other:?}")),
            }
        };
        assert_eq!(nice(&[]), Ok(None), "the default, best effort");
        assert_eq!(nice(&["--nice", "-3"]), Ok(Some(-3)));
        assert_eq!(nice(&["--nice", "0"]), Ok(Some(0)));
        for out_of_range in ["-21", "20"] {
            let error = nice(&["--nice", out_of_range]).unwrap_err();
            assert!(error.contains("--nice"), "{error}");
        }
    }

    #[test]
    fn net_console_and_rng_options_reach_their_configs() {
        let Command::Net(args) = parse(&[
            "net",
            "-s",
            "/tmp/n.sock",
            "--tap",
            "tap0",
            "--mac",
            "02:00:00:00:00:01",
            "--queue-pairs",
            "2",
        ])
        .unwrap() else {
            panic!("not net");
        };
        let net = Serve::<NetConfig>::try_from(args).unwrap();
        assert_eq!(net.device.mac, Some("02:00:00:00:00:01".parse().unwrap()));
        assert_eq!(net.device.queue_pairs, 2);
        assert!(parse(&["net", "-s", "/tmp/n.sock", "--tap", "tap0", "--mac", "zz"]).is_err());

        let Command::Console(args) =
            parse(&["console", "-s", "/tmp/c.sock", "--unix-socket", "/tmp/con"]).unwrap()
        else {
            panic!("not console");
        };
        let console = Serve::<ConsoleConfig>::try_from(args).unwrap();
        assert_eq!(
            console.device.backend,
            BackendConfig::UnixSocket("/tmp/con".into())
        );
        assert!(parse(&["console", "-s", "/tmp/c.sock", "--stdio", "--pty"]).is_err());
        let Command::Console(args) = parse(&["console", "-s", "/tmp/c.sock"]).unwrap() else {
            panic!("not console");
        };
        assert_eq!(
            Serve::<ConsoleConfig>::try_from(args)
                .unwrap()
                .device
                .backend,
            BackendConfig::Pty
        );

        let Command::Rng(args) =
            parse(&["rng", "-s", "/tmp/r.sock", "--rate-limit", "1000"]).unwrap()
        else {
            panic!("not rng");
        };
        let rng = Serve::<RngConfig>::try_from(args).unwrap();
        assert_eq!(
            rng.device.rate_limit,
            Some(RateLimit {
                bytes_per_sec: 1000,
                burst: 1000
            })
        );
        assert!(
            parse(&["rng", "-s", "/tmp/r.sock", "--burst", "5"]).is_err(),
            "burst needs a rate limit"
        );
        let Command::Rng(args) = parse(&["rng", "-s", "/tmp/r.sock", "--rate-limit", "0"]).unwrap()
        else {
            panic!("not rng");
        };
        let error = Serve::<RngConfig>::try_from(args).unwrap_err().to_string();
        assert!(error.contains("rate limit 0"), "{error}");
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
            "--direct",
            "--io-engine",
            "sync",
            "--poll-us",
            "0",
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
                direct: true,
                io_engine: IoEngine::Sync,
                poll_us: 0,
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
