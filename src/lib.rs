//! hvisor-vhost: virtio device backends served over vhost-user or hvisor's shared request ring.
//!
//! The device crates under `devices/` implement `VhostUserBackend` and know nothing of
//! transports; the transports under `transports/` know no device by name. This crate joins
//! them: the command line, and the [`registry`] that turns a device's settings into the backend
//! a transport serves.

pub mod cli;
pub mod counters;
pub mod logging;
pub mod registry;

use std::io;
use std::sync::Arc;

use hvisor_transport::config::{ConfigError, VirtioConfig};
use hvisor_transport::port::PortError;
use hvisor_transport::server::ServerError;
use hvisor_vhost_core::stop::{StopSignal, stop_on_termination_signals};
use log::{info, warn};
use vhost_user_transport::ServeError;

use crate::cli::{ArgsError, Cli, Command, HvisorArgs, Serve, SocketPath};
use crate::registry::{Backend, Device, DeviceSettings, UseBackend};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    HvisorConfig(Box<ConfigError>),
    #[error(transparent)]
    Hvisor(#[from] ServerError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    CountersFile(#[from] counters::CountersFileError),
    #[error("simulator: {0}")]
    Simulator(String),
}

/// Runs the command the user asked for until it is stopped.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Blk(args) => {
            let settings = cli::BlkServe::try_from(args)?;
            serve_on_socket(&settings.socket, DeviceSettings::Blk(settings.blk))
        }
        Command::Net(args) => {
            let settings = Serve::try_from(args)?;
            serve_on_socket(&settings.socket, DeviceSettings::Net(settings.device))
        }
        Command::Console(args) => {
            let settings = Serve::try_from(args)?;
            serve_on_socket(&settings.socket, DeviceSettings::Console(settings.device))
        }
        Command::Rng(args) => {
            let settings = Serve::try_from(args)?;
            serve_on_socket(&settings.socket, DeviceSettings::Rng(settings.device))
        }
        Command::Hvisor(args) => serve_hvisor(&args),
        Command::Simulate(args) => simulate(&args),
    }
}

fn new_stop_signal() -> Result<Arc<StopSignal>, Error> {
    let stop = StopSignal::new().map_err(Error::Signals)?;
    stop_on_termination_signals(stop.clone()).map_err(Error::Signals)?;
    Ok(stop)
}

/// Serves the device `settings` describes over vhost-user on `socket` until SIGINT or SIGTERM;
/// settles it (a disk flush) after each frontend and before returning.
pub fn serve_on_socket(socket: &SocketPath, settings: DeviceSettings) -> Result<(), Error> {
    let device = Device::open(&settings).map_err(Error::Device)?;
    if let Some(description) = device.describe(&settings) {
        info!("{description}");
    }
    if let Some(pty) = device.pty_path() {
        // On stdout too, so a script can pick it up.
        println!("console: {}", pty.display());
    }
    let stop = new_stop_signal()?;
    device.clone().serve_with(OnSocket {
        socket,
        stop: &stop,
        settle: device.clone(),
    })?;
    info!("stopped");
    stop.set_waiting_for("the final disk flush");
    device.settle();
    Ok(())
}

/// Serves one backend on a vhost-user socket.
struct OnSocket<'a> {
    socket: &'a SocketPath,
    stop: &'a StopSignal,
    settle: Device,
}

impl UseBackend for OnSocket<'_> {
    type Output = Result<(), ServeError>;

    fn with<B: Backend>(self, backend: Arc<B>) -> Self::Output {
        let name = format!("vhost-user-{}", self.settle.kind());
        let settle = self.settle;
        vhost_user_transport::serve(&name, backend, self.socket.path(), self.stop, || {
            settle.settle();
        })
    }
}

/// Names the process `hvisor-virtio`, like hvisor-tool's daemon, so `pkill hvisor-virtio`
/// keeps working.
fn name_process_like_hvisor_tool() {
    // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated string.
    let ret = unsafe { libc::prctl(libc::PR_SET_NAME, c"hvisor-virtio".as_ptr()) };
    if ret != 0 {
        warn!(
            "cannot set the process name: {}",
            io::Error::last_os_error()
        );
    }
}

/// The daemon's nice value unless `--nice` says otherwise.
const DEFAULT_NICE: i32 = -10;

/// Sets the calling thread's nice value (`requested`, else [`DEFAULT_NICE`]), which the threads
/// it starts inherit. With a CPU hog beside the daemon on its core, nice 0 shares the core half
/// and half and a 64 KiB request takes 2.2x its quiet time; at -10 it takes 1.1x (ring-bench
/// --pin, README). Without the privilege, only a value the user asked for is worth a warning.
fn set_nice(requested: Option<i32>) {
    let nice = requested.unwrap_or(DEFAULT_NICE);
    // SAFETY: setpriority takes plain integers; who = 0 names the calling thread.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if ret != 0 {
        let error = io::Error::last_os_error();
        // SAFETY: getpriority takes plain integers; -1 is also a valid result, so errno is
        // not consulted: the value is only logged.
        let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let level = if requested.is_some() {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "--nice {nice}: {error} (lowering it needs CAP_SYS_NICE); the threads keep nice \
             {current}"
        );
    } else {
        info!("threads run at nice {nice}");
    }
}

fn load_hvisor_config(path: &std::path::Path) -> Result<VirtioConfig, Error> {
    VirtioConfig::from_file(path).map_err(|error| Error::HvisorConfig(Box::new(error)))
}

/// Serves the zones of an hvisor-tool `virtio_cfg.json` until SIGINT or SIGTERM, reporting
/// the counters on SIGUSR1 and at exit.
pub fn serve_hvisor(args: &HvisorArgs) -> Result<(), Error> {
    use hvisor_transport::port::{DevHvisor, HypervisorPort, SocketPort};
    // Before any thread is started: each inherits it.
    set_nice(args.nice);
    let config = load_hvisor_config(&args.config)?;
    let sink = counters::CountersSink::open(args.counters_file.as_deref())?;
    // Before the hand-off: a hypervisor side that gets a reply can count on being served.
    let devices = registry::open_hvisor_devices(&config).map_err(ServerError::from)?;
    let stop = new_stop_signal()?;
    let report_signal = counters::ReportSignal::register().map_err(Error::Signals)?;
    name_process_like_hvisor_tool();
    let port: Arc<dyn HypervisorPort> = match &args.hypervisor_socket {
        Some(path) => Arc::new(SocketPort::connect(path, &config)?),
        None => Arc::new(DevHvisor::open()?),
    };
    let poll = std::time::Duration::from_micros(args.poll_us);
    let mut server = hvisor_transport::server::Server::new(&config, devices, port, poll)?;
    let reporter =
        counters::CountersReporter::start(report_signal, server.counters().clone(), sink)
            .map_err(Error::Signals)?;
    let served = server.run(&stop);
    stop.set_waiting_for("the device workers to finish their batches");
    drop(server);
    reporter.finish();
    served?;
    info!("stopped");
    Ok(())
}

/// Plays hvisor for one daemon and exercises every configured device.
#[cfg(feature = "simulator")]
pub fn simulate(args: &cli::SimulateArgs) -> Result<(), Error> {
    let config = load_hvisor_config(&args.config)?;
    let simulator = hvisor_sim::Simulator::new(&config, hvisor_sim::SimOptions::default())
        .map_err(|error| Error::Simulator(format!("{}: {error}", args.config.display())))?;
    info!("waiting for a daemon on {}", args.socket.display());
    simulator
        .listen_and_attach(&args.socket)
        .map_err(|error| Error::Simulator(format!("{}: {error}", args.socket.display())))?;
    let result = hvisor_sim::guest::exercise_all(&simulator, &config, args.rounds);
    simulator.detach();
    result.map_err(|error| Error::Simulator(error.to_string()))
}

/// A board build has no simulator; say how to get one rather than fail as an unknown command.
#[cfg(not(feature = "simulator"))]
pub fn simulate(_: &cli::SimulateArgs) -> Result<(), Error> {
    Err(Error::Simulator(
        "this build leaves the simulator out; build with `cargo build --release --features \
         simulator`"
            .to_owned(),
    ))
}
