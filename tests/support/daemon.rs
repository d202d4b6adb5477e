//! A daemon under test: a child process with its output in a log file.
//!
//! [`Daemon`] kills and reaps the process when dropped, so a failing test
//! never leaves it running, and prints the log if the test is panicking, so
//! the failure report shows what the daemon said.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How often bounded waits look again.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `command` with stdin closed and stdout and stderr written to
    /// `log` (created or truncated).
    pub fn spawn(mut command: Command, log: &Path) -> Daemon {
        let file = File::create(log)
            .unwrap_or_else(|e| panic!("creating daemon log {}: {e}", log.display()));
        let stdout = file.try_clone().expect("duplicating the log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        Daemon {
            child,
            log: log.to_owned(),
        }
    }

    /// The process id, for reading `/proc/PID` or changing its limits.
    pub fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t")
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid();
        // SAFETY: kill has no memory-safety preconditions. The child is not
        // reaped before `wait_exit` or drop, so the pid is still ours.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            result,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still
    /// running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the daemon") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Starts `binary` serving `device` (e.g. `rng`) with `args` on `dir/DEVICE.sock`, logging
    /// at info level to `dir/daemon.log`; returns once the socket exists (or within `timeout`).
    pub fn serve(
        binary: &str,
        device: &str,
        dir: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> (Daemon, PathBuf) {
        let socket = dir.join(format!("{device}.sock"));
        let daemon = Daemon::serve_on(
            binary,
            device,
            &socket,
            args,
            &dir.join("daemon.log"),
            timeout,
        );
        (daemon, socket)
    }

    /// [`Daemon::serve`] on `socket`, logging to `log`.
    pub fn serve_on(
        binary: &str,
        device: &str,
        socket: &Path,
        args: &[impl AsRef<OsStr>],
        log: &Path,
        timeout: Duration,
    ) -> Daemon {
        let mut command = Command::new(binary);
        command
            .arg(device)
            .arg("--socket-path")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info");
        let mut daemon = Daemon::spawn(command, log);
        daemon.wait_for_path(socket, timeout);
        daemon
    }

    /// Waits up to `timeout` for `path` to exist and, for a socket, to accept connections
    /// (`bind` creates the file just before `listen` runs). Panics if the daemon exits or time
    /// runs out.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !path.exists() || (is_socket(path) && !is_listening(path)) {
            if let Some(status) = self.child.try_wait().expect("waiting for the daemon") {
                panic!(
                    "daemon exited with {status} before creating {}",
                    path.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear within {timeout:?}",
                path.display()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Everything the daemon has written so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<log unreadable: {e}>"))
    }
}

/// A start-up failure as the README promises it: exit status 1 (not a signal), and one error
/// line, the last of the log, containing every one of `parts`.
pub fn assert_one_error(status: ExitStatus, log: &str, parts: &[&str]) {
    let context = format!("status {status}, log:\n{log}");
    assert_eq!(status.code(), Some(1), "{context}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" ERROR ") || line.contains(" WARN "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected; {context}");
    assert!(errors[0].contains(" ERROR "), "{context}");
    assert_eq!(log.lines().last(), Some(errors[0]), "{context}");
    for part in parts {
        assert!(errors[0].contains(part), "{part:?} missing; {context}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Errors mean the process already exited, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            // Goes through the test harness's capture, so it is shown only
            // with the failing test's output.
            eprintln!(
                "--- log of {}:\n{}--- end of log",
                self.log.display(),
                self.log()
            );
        }
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket())
}

/// Whether `/proc/net/unix` lists a socket bound to `path` with `__SO_ACCEPTCON` (listening).
fn is_listening(path: &Path) -> bool {
    const ACCEPTING: &str = "00010000";
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == ACCEPTING && fields[7] == path
    })
}
