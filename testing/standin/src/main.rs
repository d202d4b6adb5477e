//! hvisor-standin: plays hvisor for one or more zones on an arm64 Linux host with KVM, so that
//! the hvisor-vhost daemon can serve real, unmodified Linux guests through the `virtio_bridge`
//! ring without hvisor. See testing/standin/README.md.

// Without KVM (other architectures) only `dtb`, `console-peer` and `mktap` run; the bridge
// and hand-off code still builds and is unit-tested there.
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

mod bridge;
mod config;
mod fdt;
mod handoff;
mod tools;
#[cfg(target_arch = "aarch64")]
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage:
  hvisor-standin run --config virtio_cfg.json --socket PATH --kernel Image
                     [--initrd FILE] [--cmdline TEXT] [--zone ID[:CPU,...]]...
                     [--accept-timeout SECS] [--answer-timeout SECS]
      create each zone's RAM and one bridge page, wait for `hvisor-vhost hvisor
      --hypervisor-socket PATH` to connect, hand them over, then boot the guest of every zone
      with KVM (aarch64 only) until all have powered off. Without --zone: every zone of the
      file, one vCPU each. --zone picks zones and the physical CPU ids of their vCPUs (one vCPU
      per id, the first boots; default: the next free id from 1). `{zone}` in --cmdline
      stands for the zone id. --answer-timeout: end the run with an error naming the CPU and
      the register when a synchronous answer takes longer (hvisor waits forever, the default).
  hvisor-standin dtb --config virtio_cfg.json --out FILE [--cmdline TEXT] [--zone ID[:CPU,...]]
      write the device tree the guest of the zone (default: the first) would get (no KVM
      needed)
  hvisor-standin console-peer --socket PATH --marker TEXT --send FILE --out FILE [--timeout SECS]
                              [--ready FLAG] [--go FLAG]
      connect to a console socket, record what arrives, send FILE once TEXT was seen (and,
      with --go, once the file FLAG exists); --ready: create the file FLAG when TEXT arrives
  hvisor-standin mktap NAME
      create a persistent TAP interface the net device can attach to
  hvisor-standin vsock-send --port PORT --file FILE [--cid CID] [--timeout SECS]
      in a guest: connect to vsock CID (default 2, the host) PORT, send FILE, wait for the
      peer to close
  hvisor-standin unix-sink --socket PATH --out FILE --bytes N [--timeout SECS]
      listen on the Unix socket PATH, write the first N bytes the first connection sends into
      FILE, then close it";

/// `--name value` pairs after the subcommand.
struct Args(Vec<(String, String)>);

impl Args {
    fn parse(raw: &[String]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut iter = raw.iter();
        while let Some(name) = iter.next() {
            let key = name
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {name:?}"))?;
            let value = iter.next().ok_or_else(|| format!("{name} needs a value"))?;
            pairs.push((key.to_owned(), value.clone()));
        }
        Ok(Self(pairs))
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key).ok_or_else(|| format!("--{key} is required"))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{key}: {v:?} is not a number"))
            })
            .transpose()
    }
}

fn load_zones(args: &Args) -> Result<Vec<config::Zone>, Box<dyn std::error::Error>> {
    let path = PathBuf::from(args.require("config")?);
    let chosen = args
        .all("zone")
        .map(str::parse)
        .collect::<Result<Vec<config::ZoneChoice>, String>>()?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config::parse_zones(&text, &path, &chosen)?)
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = raw.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let args = match Args::parse(&raw[1..]) {
        Ok(args) => args,
        Err(message) if command != "mktap" => {
            eprintln!("hvisor-standin: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
        Err(_) => Args(Vec::new()),
    };
    let result = match command.as_str() {
        "run" => run(&args),
        "dtb" => dtb(&args),
        "console-peer" => tools::console_peer(&args),
        "vsock-send" => tools::vsock_send(&args),
        "unix-sink" => tools::unix_sink(&args),
        "mktap" => match raw.get(1) {
            Some(name) => tools::make_tap(name),
            None => Err("mktap needs the interface name".into()),
        },
        "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hvisor-standin: {error}");
            ExitCode::FAILURE
        }
    }
}

fn dtb(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let zone = load_zones(args)?.remove(0);
    let blob = fdt::build(
        &zone,
        &fdt::BootInfo {
            cmdline: args.get("cmdline").unwrap_or(""),
            initrd: None,
        },
    )?;
    std::fs::write(args.require("out")?, blob)?;
    Ok(())
}

#[cfg(not(target_arch = "aarch64"))]
fn run(_args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    Err("`run` needs KVM on aarch64; this build is for another architecture".into())
}

#[cfg(target_arch = "aarch64")]
fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    let zones = load_zones(args)?;
    let socket = PathBuf::from(args.require("socket")?);
    let boot = vmm::Boot {
        kernel: PathBuf::from(args.require("kernel")?),
        initrd: args.get("initrd").map(PathBuf::from),
        cmdline: args.get("cmdline").unwrap_or("panic=-1 quiet").to_owned(),
        answer_timeout: args
            .number::<u64>("answer-timeout")?
            .map(std::time::Duration::from_secs),
    };
    let accept_timeout = args.number::<i32>("accept-timeout")?.unwrap_or(60);

    let rams = zones
        .iter()
        .map(vmm::create_ram)
        .collect::<Result<Vec<_>, _>>()?;
    let bridge = Arc::new(bridge::Bridge::new(bridge::eventfd()?)?);

    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    for zone in &zones {
        eprintln!(
            "[standin] zone {}: {} RAM window(s), {} device(s), vCPUs on physical CPUs {:?}",
            zone.id,
            zone.ram.len(),
            zone.devices.len(),
            zone.cpus
        );
    }
    eprintln!("[standin] waiting for the daemon on {}", socket.display());
    tools::wait_readable(&listener, accept_timeout).map_err(|e| {
        format!(
            "no daemon connected to {} within {accept_timeout} s: {e}",
            socket.display()
        )
    })?;
    let (stream, _) = listener.accept()?;
    let windows: Vec<handoff::Window> = zones
        .iter()
        .zip(&rams)
        .flat_map(|(zone, ram)| {
            zone.ram
                .iter()
                .zip(&ram.files)
                .map(|(window, file)| handoff::Window {
                    zone: zone.id,
                    zone0_ipa: window.zone0_ipa,
                    size: window.size,
                    fd: file,
                })
        })
        .collect();
    handoff::send_hello(&stream, bridge.memfd(), bridge.wakeup_fd(), &windows)?;
    let finish = handoff::receive_reply(&stream)?;
    eprintln!("[standin] hand-off done; booting {}", boot.kernel.display());
    vmm::run(
        zones.into_iter().zip(rams).collect(),
        bridge,
        finish,
        stream,
        &boot,
    )
}
