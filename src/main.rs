use std::process::ExitCode;

use clap::Parser;
use hvisor_vhost::cli::Cli;

fn main() -> ExitCode {
    hvisor_vhost::logging::init();
    match hvisor_vhost::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
