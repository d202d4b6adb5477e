//! hvisor-vhost: virtio device backends served over vhost-user or hvisor's shared request ring.
//!
//! The device crates under `devices/` implement `VhostUserBackend` and know nothing of
//! transports; this crate holds the transports and the command line that joins the two.

pub mod cli;
pub mod hvisor;
pub mod vhost_user;

use std::io;
use std::sync::Arc;

use hvisor_vhost_blk::{BlkBackend, BlkError, Storage};
use log::{info, warn};

use crate::cli::{ArgsError, BlkServe, Cli, Command};
use crate::vhost_user::{ServeError, StopSignal};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Blk(#[from] BlkError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
}

/// Runs the command the user asked for until it is stopped.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Blk(args) => serve_blk(BlkServe::try_from(args)?),
    }
}

fn flush_disk<S: Storage>(backend: &BlkBackend<S>) {
    if !backend.device().readonly() {
        if let Err(error) = backend.device().storage().flush() {
            warn!("flushing the disk failed: {error}");
        }
    }
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
    let stop = StopSignal::new().map_err(Error::Signals)?;
    vhost_user::stop_on_termination_signals(stop.clone()).map_err(Error::Signals)?;
    let after_disconnect = {
        let backend = backend.clone();
        move || flush_disk(&backend)
    };
    vhost_user::serve(
        "vhost-user-blk",
        backend.clone(),
        settings.socket.path(),
        &stop,
        after_disconnect,
    )?;
    flush_disk(&backend);
    info!("stopped");
    Ok(())
}
