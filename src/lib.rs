//! hvisor-vhost: virtio device backends served over vhost-user or hvisor's shared request ring.
//!
//! The device crates under `devices/` implement `VhostUserBackend` and know nothing of
//! transports; this crate holds the transports and the command line that joins the two.

pub mod cli;
mod frontend_relay;
pub mod hvisor;
pub mod logging;
mod memory_backing;
pub mod vhost_user;

use std::io;
use std::sync::Arc;

use hvisor_vhost_blk::{BlkBackend, BlkError, Storage};
use log::{info, warn};

use hvisor_vhost_console::{ConsoleBackend, ConsoleConfig};
use hvisor_vhost_device::VirtioDevice;
use hvisor_vhost_net::{NetBackend, NetConfig};
use hvisor_vhost_rng::{RngBackend, RngConfig};
use vhost_user_backend::VhostUserBackend;

use crate::cli::{ArgsError, BlkServe, Cli, Command, HvisorArgs, Serve, SimulateArgs, SocketPath};
use crate::vhost_user::{ServeError, StopSignal};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Blk(#[from] BlkError),
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    HvisorConfig(Box<hvisor::config::ConfigError>),
    #[error(transparent)]
    Hvisor(#[from] hvisor::server::ServerError),
    #[error(transparent)]
    Port(#[from] hvisor::port::PortError),
    #[error("simulator: {0}")]
    Simulator(String),
}

/// Runs the command the user asked for until it is stopped.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Blk(args) => serve_blk(BlkServe::try_from(args)?),
        Command::Net(args) => {
            let settings = Serve::<NetConfig>::try_from(args)?;
            let backend = NetBackend::new(&settings.device).map_err(boxed)?;
            info!("net: TAP {}, MAC {}", settings.device.tap, backend.mac());
            serve_on_socket("vhost-user-net", Arc::new(backend), &settings.socket, || {}).map(drop)
        }
        Command::Console(args) => {
            let settings = Serve::<ConsoleConfig>::try_from(args)?;
            let backend = ConsoleBackend::new(&settings.device).map_err(boxed)?;
            if let Some(pty) = backend.pty_path() {
                // On stdout too, so a script can pick it up.
                println!("console: {}", pty.display());
            }
            serve_on_socket(
                "vhost-user-console",
                Arc::new(backend),
                &settings.socket,
                || {},
            )
            .map(drop)
        }
        Command::Rng(args) => {
            let settings = Serve::<RngConfig>::try_from(args)?;
            let backend = RngBackend::new(&settings.device).map_err(boxed)?;
            serve_on_socket("vhost-user-rng", Arc::new(backend), &settings.socket, || {}).map(drop)
        }
        Command::Hvisor(args) => serve_hvisor(args),
        Command::Simulate(args) => simulate(args),
    }
}

fn flush_disk<S: Storage>(backend: &BlkBackend<S>) {
    if !backend.device().readonly() {
        if let Err(error) = backend.device().storage().flush() {
            warn!("flushing the disk failed: {error}");
        }
    }
}

fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Device(Box::new(error))
}

/// Serves `backend` on `socket` until SIGINT or SIGTERM; returns the stop signal, which still
/// bounds what the caller does before exiting.
fn serve_on_socket<B>(
    name: &str,
    backend: B,
    socket: &SocketPath,
    after_disconnect: impl FnMut(),
) -> Result<Arc<StopSignal>, Error>
where
    B: VhostUserBackend<Bitmap = ()> + VirtioDevice + Clone + 'static,
    B::Vring: Clone + Send + Sync,
{
    let stop = StopSignal::new().map_err(Error::Signals)?;
    vhost_user::stop_on_termination_signals(stop.clone()).map_err(Error::Signals)?;
    vhost_user::serve(name, backend, socket.path(), &stop, after_disconnect)?;
    info!("stopped");
    Ok(stop)
}

/// Serves a block device over vhost-user until SIGINT or SIGTERM, then flushes it.
pub fn serve_blk(settings: BlkServe) -> Result<(), Error> {
    let backend = Arc::new(BlkBackend::new(&settings.blk)?);
    let device = backend.device();
    info!(
        "disk: {}, {} bytes, {}, {} queue(s) of up to {} entries",
        settings.blk.backing,
        device.storage().size(),
        if device.readonly() {
            "read-only"
        } else {
            "read-write"
        },
        settings.blk.num_queues,
        settings.blk.queue_size,
    );
    let after_disconnect = {
        let backend = backend.clone();
        move || flush_disk(&backend)
    };
    let stop = serve_on_socket(
        "vhost-user-blk",
        backend.clone(),
        &settings.socket,
        after_disconnect,
    )?;
    stop.set_waiting_for("the final disk flush");
    flush_disk(&backend);
    Ok(())
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

fn load_hvisor_config(path: &std::path::Path) -> Result<hvisor::config::VirtioConfig, Error> {
    hvisor::config::VirtioConfig::from_file(path)
        .map_err(|error| Error::HvisorConfig(Box::new(error)))
}

/// Serves the zones of an hvisor-tool `virtio_cfg.json` until SIGINT or SIGTERM.
pub fn serve_hvisor(args: HvisorArgs) -> Result<(), Error> {
    use hvisor::port::{DevHvisor, HypervisorPort, SocketPort};
    let config = load_hvisor_config(&args.config)?;
    // Before the hand-off: a hypervisor side that gets a reply can count on being served.
    let devices = hvisor::devices::open_all(&config).map_err(hvisor::server::ServerError::from)?;
    let stop = StopSignal::new().map_err(Error::Signals)?;
    vhost_user::stop_on_termination_signals(stop.clone()).map_err(Error::Signals)?;
    name_process_like_hvisor_tool();
    let port: Arc<dyn HypervisorPort> = match &args.hypervisor_socket {
        Some(path) => Arc::new(SocketPort::connect(path, &config)?),
        None => Arc::new(DevHvisor::open()?),
    };
    let poll = std::time::Duration::from_micros(args.poll_us);
    let mut server = hvisor::server::Server::new(&config, devices, port, poll)?;
    server.run(&stop)?;
    stop.set_waiting_for("the device workers to finish their batches");
    drop(server);
    info!("stopped");
    Ok(())
}

/// Plays hvisor for one daemon and exercises every configured device.
pub fn simulate(args: SimulateArgs) -> Result<(), Error> {
    let config = load_hvisor_config(&args.config)?;
    let simulator =
        hvisor::simulator::Simulator::new(&config, hvisor::simulator::SimOptions::default())
            .map_err(|error| Error::Simulator(format!("{}: {error}", args.config.display())))?;
    info!("waiting for a daemon on {}", args.socket.display());
    simulator
        .listen_and_attach(&args.socket)
        .map_err(|error| Error::Simulator(format!("{}: {error}", args.socket.display())))?;
    let result = hvisor::guest::exercise_all(&simulator, &config, args.rounds);
    simulator.detach();
    result.map_err(|error| Error::Simulator(error.to_string()))
}
