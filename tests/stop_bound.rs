//! SIGTERM ends the daemon within `STOP_BOUND` whatever its workers do. A worker that never
//! finishes its batch (stuck on storage, or spinning) is stood in for by a real one that the
//! test freezes with ptrace: the daemon's stop then waits for it forever, and only the
//! watchdog of `stop_on_termination_signals` can end the process.

mod support;

use std::fs;
use std::time::{Duration, Instant};

use hvisor_vhost_core::stop::{STOP_BOUND, STOP_TIMED_OUT_STATUS};
use support::daemon::Daemon;
use support::frontend::{DriverConfig, VhostUserDriver};

const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");
const TIMEOUT: Duration = Duration::from_secs(5);
/// vhost-user-backend's name for its queue worker threads.
const WORKER_NAME: &str = "vring_worker";

/// The thread ids of `pid` named `name`.
fn threads_named(pid: libc::pid_t, name: &str) -> Vec<libc::pid_t> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's thread list")
        .flatten()
        .filter(|task| {
            fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name)
        })
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

/// A thread held in a ptrace stop: it runs no further until released, as a worker stuck in
/// a system call would. Released when dropped (so a failing test lets the daemon go on).
struct FrozenThread(libc::pid_t);

impl FrozenThread {
    fn freeze(tid: libc::pid_t) -> Self {
        // SAFETY: plain ptrace requests on a thread of our own child; no memory is passed.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "PTRACE_SEIZE of thread {tid}: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        }
        let mut status = 0;
        // SAFETY: `status` is a valid place for waitpid to write to.
        let waited = unsafe { libc::waitpid(tid, &raw mut status, libc::__WALL) };
        assert_eq!(waited, tid, "waiting for thread {tid} to stop");
        assert!(libc::WIFSTOPPED(status), "thread {tid} did not stop");
        FrozenThread(tid)
    }

    /// Collects the thread once the process died, which a tracer must do before the
    /// process itself can be reaped; true once collected.
    fn reaped(&self) -> bool {
        let mut status = 0;
        // SAFETY: as above; WNOHANG makes it return at once.
        let waited =
            unsafe { libc::waitpid(self.0, &raw mut status, libc::__WALL | libc::WNOHANG) };
        (waited == self.0 && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status))) || waited < 0
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        // SAFETY: as above; fails harmlessly once the thread is gone.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

#[test]
fn sigterm_ends_the_daemon_within_the_bound_while_a_worker_is_stuck() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut daemon, socket) = Daemon::serve(BINARY, "rng", dir.path(), &[], TIMEOUT);
    let config = DriverConfig {
        queue_size: 64,
        ..DriverConfig::default()
    };
    let mut driver = VhostUserDriver::connect(&socket, &config).expect("connect to the daemon");
    driver.submit(0, &[], &[64]).expect("submit a request");
    let used = driver.wait_used(0, TIMEOUT).expect("the worker serves");
    assert_eq!(used.len, 64);

    let pid = daemon.pid();
    let workers = threads_named(pid, WORKER_NAME);
    assert_eq!(workers.len(), 1, "one worker thread for the rng queue");
    let frozen = FrozenThread::freeze(workers[0]);
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    let deadline = signalled + STOP_BOUND + Duration::from_secs(5);
    let status = loop {
        if frozen.reaped() {
            if let Some(status) = daemon.wait_exit(Duration::from_millis(100)) {
                break status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon still runs {:?} after SIGTERM",
            signalled.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(STOP_TIMED_OUT_STATUS), "exit status");
    assert!(
        took >= STOP_BOUND && took < STOP_BOUND + Duration::from_secs(3),
        "exited {took:?} after SIGTERM, the bound is {STOP_BOUND:?}"
    );
    let log = daemon.log();
    let report = log
        .lines()
        .find(|line| line.contains("not stopped within"))
        .unwrap_or_else(|| panic!("no report of the unfinished stop in:\n{log}"));
    assert!(
        report.contains("the stop waits for the queue workers to finish their batches"),
        "{report}"
    );
    // The frozen worker shows in ptrace's stop state.
    assert!(
        report.contains(&format!("{WORKER_NAME}[{}] t", workers[0])),
        "{report}"
    );
}
