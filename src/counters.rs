//! Reports of `hvisor-vhost hvisor`'s counters: one line on stderr, starting with
//! [`LINE_PREFIX`] and followed by the JSON of a [`Snapshot`], on every SIGUSR1 and once at
//! exit; the same JSON, alone on its line, appended to `--counters-file` when given.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use hvisor_transport::counters::{Counters, Reason, Snapshot};
use log::{error, warn};
use signal_hook::consts::SIGUSR1;
use signal_hook::iterator::{Handle, Signals};

/// What a report line on stderr starts with, so a reader can pick it out of the log.
pub const LINE_PREFIX: &str = "hvisor-vhost-counters ";

#[derive(Debug, thiserror::Error)]
#[error("--counters-file {}: {source}", path.display())]
pub struct CountersFileError {
    path: PathBuf,
    source: io::Error,
}

/// Where reports go: stderr, and the counters file if one was asked for.
pub struct CountersSink {
    file: Option<(PathBuf, File)>,
}

impl CountersSink {
    /// Opens `file` for appending (created if missing).
    pub fn open(file: Option<&Path>) -> Result<Self, CountersFileError> {
        let file = file
            .map(|path| {
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map(|file| (path.to_owned(), file))
                    .map_err(|source| CountersFileError {
                        path: path.to_owned(),
                        source,
                    })
            })
            .transpose()?;
        Ok(CountersSink { file })
    }

    /// Writes one report. Each line goes out in one write, so log lines of other threads
    /// cannot split it, and an appending reader never sees half a line.
    pub fn report(&self, snapshot: &Snapshot) {
        let json = match serde_json::to_string(snapshot) {
            Ok(json) => json,
            Err(error) => {
                error!("cannot encode the counters: {error}");
                return;
            }
        };
        let line = format!("{LINE_PREFIX}{json}\n");
        if let Err(error) = io::stderr().lock().write_all(line.as_bytes()) {
            warn!("cannot print the counters: {error}");
        }
        if let Some((path, file)) = &self.file {
            let mut file: &File = file;
            if let Err(error) = file.write_all(format!("{json}\n").as_bytes()) {
                warn!("cannot append the counters to {}: {error}", path.display());
            }
        }
    }
}

/// SIGUSR1 taken over from its default action (ending the process); reports start once the
/// counters exist ([`CountersReporter::start`]), signals that came before are reported then.
pub struct ReportSignal(Signals);

impl ReportSignal {
    pub fn register() -> io::Result<Self> {
        Signals::new([SIGUSR1]).map(ReportSignal)
    }
}

/// The thread that reports the counters on every SIGUSR1. Signal-hook's handler only writes
/// to a pipe; this thread reads it, takes the snapshot and writes the line.
pub struct CountersReporter {
    counters: Arc<Counters>,
    sink: Arc<CountersSink>,
    signals: Handle,
    thread: JoinHandle<()>,
}

impl CountersReporter {
    pub fn start(
        ReportSignal(mut signals): ReportSignal,
        counters: Arc<Counters>,
        sink: CountersSink,
    ) -> io::Result<Self> {
        let sink = Arc::new(sink);
        let handle = signals.handle();
        let thread = {
            let (counters, sink) = (counters.clone(), sink.clone());
            std::thread::Builder::new()
                .name("counters".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        sink.report(&counters.snapshot(Reason::Signal));
                    }
                })?
        };
        Ok(CountersReporter {
            counters,
            sink,
            signals: handle,
            thread,
        })
    }

    /// Stops reporting on SIGUSR1 and writes the exit report; call it once every thread that
    /// counts has stopped, so the report holds the final counts.
    pub fn finish(self) {
        self.signals.close();
        if self.thread.join().is_err() {
            error!("the counters thread panicked");
        }
        self.sink.report(&self.counters.snapshot(Reason::Exit));
    }
}
