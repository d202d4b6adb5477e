//! Stopping the daemon, for both transports: the signal a serving loop waits on, and the
//! SIGINT/SIGTERM handling that bounds how long a stop may take.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use log::{error, info, warn};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// How long a stop may take once a termination signal asked for it: long enough to finish
/// in-flight requests and flush a disk, short enough that a stuck worker cannot keep the
/// process (and its socket, its TAP, its images) alive.
pub const STOP_BOUND: Duration = Duration::from_secs(5);
/// Exit status of a process whose stop did not finish within [`STOP_BOUND`] (EX_SOFTWARE).
pub const STOP_TIMED_OUT_STATUS: i32 = 70;
/// How long the report of an unfinished stop may take to be logged before the process exits
/// without it (a stderr nobody drains blocks the logger).
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// Closes what a transport serves when a stop is requested (a vhost-user connection, say).
pub type Closer = Box<dyn Fn() + Send + Sync>;

/// Asks a serving loop to stop: wakes it while it waits (through [`StopSignal::wake_fd`]), and
/// runs the closer its transport installed for what it serves at the moment.
pub struct StopSignal {
    requested: AtomicBool,
    wake: EventFd,
    closer: Mutex<Option<Closer>>,
    /// The step the serving code is in, for the report of a stop that does not finish.
    waiting_for: Mutex<&'static str>,
}

impl StopSignal {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(StopSignal {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            closer: Mutex::new(None),
            waiting_for: Mutex::new("the serving loop to notice the stop"),
        }))
    }

    /// Records what a stop would wait for from now on (e.g. "the queue workers to finish
    /// their batches").
    pub fn set_waiting_for(&self, what: &'static str) {
        *self
            .waiting_for
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = what;
    }

    /// What the stop waits for; never blocks (the lock is only held for an assignment).
    fn waiting_for(&self) -> &'static str {
        match self.waiting_for.try_lock() {
            Ok(what) => *what,
            Err(TryLockError::Poisoned(poisoned)) => *poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => "(being updated)",
        }
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(error) = self.wake.write(1) {
            warn!("cannot wake the serving loop: {error}");
        }
        if let Some(close) = self.lock_closer().as_ref() {
            close();
        }
    }

    /// Readable once a stop was requested.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn lock_closer(&self) -> std::sync::MutexGuard<'_, Option<Closer>> {
        self.closer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs what a stop closes from now on (`None`: nothing); runs it at once if a stop
    /// came first.
    pub fn set_closer(&self, closer: Option<Closer>) {
        let mut slot = self.lock_closer();
        *slot = closer;
        // Checked under the lock: `request` either sees this closer or has already set the
        // flag we read here.
        if self.is_requested() {
            if let Some(close) = slot.as_ref() {
                close();
            }
        }
    }
}

/// Stops `stop` on the first SIGINT or SIGTERM, and bounds the stop: a process still running
/// [`STOP_BOUND`] later, or when a second signal comes, logs what the stop waits for and
/// exits with [`STOP_TIMED_OUT_STATUS`] whatever its threads are doing.
///
/// No final flush is attempted then: writes the device completed are in the page cache and
/// survive the process, every flush a driver asked for was answered only once done, and a
/// worker that does not finish is most likely stuck on the storage itself, where a flush from
/// here would block the exit this bound guarantees.
pub fn stop_on_termination_signals(stop: Arc<StopSignal>) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            let Some(signal) = signals.next() else {
                return;
            };
            info!("signal {signal} received: finishing in-flight requests and stopping");
            stop.request();
            let watchdog = {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("stop-watchdog".into())
                    .spawn(move || {
                        std::thread::sleep(STOP_BOUND);
                        exit_unfinished(&stop, &format!("not stopped within {STOP_BOUND:?}"));
                    })
            };
            if let Err(error) = watchdog {
                warn!("the stop is not bounded: cannot start its watchdog: {error}");
            }
            if let Some(signal) = signals.next() {
                exit_unfinished(&stop, &format!("signal {signal} received again"));
            }
        })?;
    Ok(())
}

/// Ends the process with [`STOP_TIMED_OUT_STATUS`], after logging `why`, what the stop waits
/// for and the state of every thread. Takes no lock a stuck thread may hold: a timer ends the
/// process anyway if logging blocks.
fn exit_unfinished(stop: &StopSignal, why: &str) -> ! {
    let timer = std::thread::Builder::new()
        .name("exit-timer".into())
        .spawn(|| {
            std::thread::sleep(REPORT_GRACE);
            exit_now()
        });
    // Without the timer, a blocked logger would hold the exit: the report is left out.
    if timer.is_ok() {
        error!(
            "{why}: exiting with status {STOP_TIMED_OUT_STATUS}; the stop waits for {}; \
             threads: {}",
            stop.waiting_for(),
            thread_states()
        );
    }
    exit_now()
}

fn exit_now() -> ! {
    // SAFETY: _exit has no preconditions; it ends the process without running destructors or
    // atexit handlers, which could wait for locks the stuck threads hold.
    unsafe { libc::_exit(STOP_TIMED_OUT_STATUS) }
}

/// Every thread of this process as `name[tid] state wait-channel`, from /proc (no lock of ours
/// is taken): shows which worker is stuck and where.
fn thread_states() -> String {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return "(unreadable)".into();
    };
    let read = |task: &Path, file: &str| {
        std::fs::read_to_string(task.join(file)).unwrap_or_else(|_| "?".into())
    };
    let mut states: Vec<String> = tasks
        .flatten()
        .map(|task| {
            let path = task.path();
            let stat = read(&path, "stat");
            // The state follows the parenthesised name, which may itself hold spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?")
                .to_owned();
            format!(
                "{}[{}] {state} {}",
                read(&path, "comm").trim_end(),
                task.file_name().to_string_lossy(),
                read(&path, "wchan").trim_end()
            )
        })
        .collect();
    states.sort();
    states.join(", ")
}
