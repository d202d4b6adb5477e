//! Bad start-up input is reported at once as one error line naming it, with exit status 1:
//! never a daemon that blocks before serving (a FIFO opened as a file) or reads without end
//! (`/dev/zero` as a configuration), never a message that leaves the user guessing which
//! setting is at fault.

mod support;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use serde_json::json;
use support::daemon::{Daemon, assert_one_error};

/// A daemon that has not exited by then is blocked.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the daemon binary with `args` until it exits; panics if it is still running after
/// [`TIMEOUT`].
fn run<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> (ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hvisor-vhost"));
    command.args(args).env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn(command, &dir.join("daemon.log"));
    let status = daemon
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("still running after {TIMEOUT:?}:\n{}", daemon.log()));
    (status, daemon.log())
}

fn fifo(path: &Path) -> PathBuf {
    let name = CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: `name` is a NUL-terminated path that outlives the call.
    let result = unsafe { libc::mkfifo(name.as_ptr(), 0o600) };
    assert_eq!(result, 0, "mkfifo: {}", std::io::Error::last_os_error());
    path.to_owned()
}

/// A `virtio_cfg.json` with `device` as zone 1's only device.
fn config_with(dir: &Path, device: serde_json::Value) -> PathBuf {
    let mut entry = json!({"addr": "0xa003c00", "len": "0x200", "irq": 78, "status": "enable"});
    if let (Some(entry), Some(fields)) = (entry.as_object_mut(), device.as_object()) {
        entry.extend(fields.clone());
    }
    let path = dir.join("virtio_cfg.json");
    let config = json!({"zones": [{
        "id": 1,
        "memory_region": [{"zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000",
                           "size": "0x200000"}],
        "devices": [entry],
    }]});
    std::fs::write(&path, config.to_string()).expect("writing the configuration");
    path
}

/// Runs `hvisor-vhost hvisor` on `config` with the hypervisor socket `dir/hv.sock`.
fn run_hvisor(dir: &Path, config: &Path) -> (ExitStatus, String) {
    let socket = dir.join("hv.sock");
    run(
        dir,
        &[
            OsStr::new("hvisor"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--hypervisor-socket"),
            socket.as_os_str(),
        ],
    )
}

/// [`run_hvisor`] with a hypervisor listening on `dir/hv.sock`: the start fails with the one
/// error `parts` describe, and the daemon never attached, as it failed `before` the hand-off.
fn assert_fails_before_the_hand_off(dir: &Path, config: &Path, parts: &[&str], before: &str) {
    let listener = UnixListener::bind(dir.join("hv.sock")).expect("binding the hypervisor socket");
    listener.set_nonblocking(true).expect("non-blocking accept");
    let (status, log) = run_hvisor(dir, config);
    assert_one_error(status, &log, parts);
    assert!(
        listener.accept().is_err(),
        "the daemon attached to the hypervisor before {before}"
    );
}

#[test]
fn a_configuration_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let nobody_writes = fifo(&dir.path().join("cfg.fifo"));
    for (config, kind) in [
        (nobody_writes.as_path(), "is a FIFO"),
        (Path::new("/dev/zero"), "is a character device (/dev/zero)"),
        (dir.path(), "is a directory"),
    ] {
        let (status, log) = run_hvisor(dir.path(), config);
        assert_one_error(
            status,
            &log,
            &[
                &config.display().to_string(),
                kind,
                "the configuration must be a regular file",
            ],
        );
    }
}

#[test]
fn a_configuration_larger_than_1_mib_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = config_with(dir.path(), json!({"type": "rng"}));
    // Valid JSON all the same: only its size is wrong.
    let mut text = " ".repeat(1 << 20);
    text.push_str(&std::fs::read_to_string(&config).expect("reading it back"));
    std::fs::write(&config, text).expect("padding the configuration");
    let (status, log) = run_hvisor(dir.path(), &config);
    assert_one_error(
        status,
        &log,
        &[
            &config.display().to_string(),
            "a configuration may have at most 1048576",
        ],
    );
}

#[test]
fn a_console_log_fifo_nobody_reads_is_refused_before_the_hand_off() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let log_fifo = fifo(&dir.path().join("log.fifo"));
    let config = config_with(dir.path(), json!({"type": "console", "log": log_fifo}));
    assert_fails_before_the_hand_off(
        dir.path(),
        &config,
        &[
            "zone1-console0@0xa003c00",
            &log_fifo.display().to_string(),
            "a FIFO that no process has open for reading",
        ],
        "opening its devices",
    );
}

#[test]
fn a_console_output_log_fifo_needs_a_reader() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let log_fifo = fifo(&dir.path().join("log.fifo"));
    let socket = dir.path().join("console.sock");
    let args = |socket: &Path| -> Vec<PathBuf> {
        vec![
            "console".into(),
            "--socket-path".into(),
            socket.to_owned(),
            "--output-log".into(),
            log_fifo.clone(),
        ]
    };
    let (status, log) = run(dir.path(), &args(&socket));
    assert_one_error(
        status,
        &log,
        &[
            &log_fifo.display().to_string(),
            "a FIFO that no process has open for reading",
        ],
    );
    // With a reader, a FIFO is a fine log: the daemon starts serving.
    let _reader = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&log_fifo)
        .expect("opening the FIFO for reading");
    let mut command = Command::new(env!("CARGO_BIN_EXE_hvisor-vhost"));
    command.args(args(&socket));
    let mut daemon = Daemon::spawn(command, &dir.path().join("served.log"));
    daemon.wait_for_path(&socket, TIMEOUT);
}

#[test]
fn simulated_regions_too_large_to_back_name_file_zone_and_field() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = config_with(dir.path(), json!({"type": "rng"}));
    for size in ["0x8000000000000000", "0x4000000000000000"] {
        let text = std::fs::read_to_string(&config)
            .expect("reading the configuration")
            .replace("0x200000", size);
        let large = dir.path().join(format!("large-{size}.json"));
        std::fs::write(&large, text).expect("writing the configuration");
        let (status, log) = run(
            dir.path(),
            &[
                OsStr::new("simulate"),
                OsStr::new("--config"),
                large.as_os_str(),
                OsStr::new("--socket"),
                dir.path().join("hv.sock").as_os_str(),
            ],
        );
        assert_one_error(
            status,
            &log,
            &[
                &large.display().to_string(),
                "zones[0] (zone id 1), memory_region[0], field \"size\"",
                &format!("cannot back {size} bytes"),
            ],
        );
    }
}

/// Usage errors keep clap's convention, as the README says: its message and usage on stderr,
/// exit status 2, so scripts can tell a wrong command line from bad input.
#[test]
fn command_line_usage_errors_exit_with_status_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_hvisor-vhost"))
        .args(["hvisor", "--no-such-option"])
        .output()
        .expect("running the daemon");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: unexpected argument '--no-such-option'"),
        "{stderr}"
    );
    assert!(stderr.contains("Usage: hvisor-vhost hvisor"), "{stderr}");
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, b"data the user wants to keep").expect("writing the file");
    let (status, log) = run(
        dir.path(),
        &[
            OsStr::new("rng"),
            "--socket-path".as_ref(),
            image.as_os_str(),
        ],
    );
    assert_one_error(
        status,
        &log,
        &[&image.display().to_string(), "exists and is not a socket"],
    );
    assert_eq!(
        std::fs::read(&image).expect("the file is still there"),
        b"data the user wants to keep"
    );
}

/// A device served by an external vhost-user backend fails the start when its backend is not
/// there, before the hand-off, naming the device and the socket.
#[test]
fn a_missing_external_backend_is_named_before_the_hand_off() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let backend = dir.path().join("absent.sock");
    let config = config_with(
        dir.path(),
        json!({"type": "vhost-user", "socket": backend, "device_id": 26}),
    );
    assert_fails_before_the_hand_off(
        dir.path(),
        &config,
        &[
            "zone1-vhost-user0@0xa003c00",
            &format!("vhost-user backend at {}", backend.display()),
            "cannot connect",
        ],
        "connecting to its backends",
    );
}

/// A backend that takes the connection but never answers fails the start within the reply
/// timeout, naming the message it did not answer.
#[test]
fn a_silent_external_backend_fails_the_start_within_the_reply_timeout() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let backend = dir.path().join("silent.sock");
    // Connections wait in the backlog; nothing ever answers them.
    let _silent = UnixListener::bind(&backend).expect("binding the backend socket");
    let config = config_with(
        dir.path(),
        json!({"type": "blk", "img": "unused.img", "socket": backend}),
    );
    let started = std::time::Instant::now();
    let (status, log) = run_hvisor(dir.path(), &config);
    assert_one_error(
        status,
        &log,
        &[
            "zone1-blk0@0xa003c00",
            &format!("vhost-user backend at {}", backend.display()),
            "GET_FEATURES failed",
            "no answer within 2s",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// hvisor-tool's gpu and scmi entries need a backend named by "socket"; the error says so.
#[test]
fn gpu_and_scmi_entries_without_a_backend_say_what_they_need() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for device in [
        json!({"type": "gpu", "width": 1280, "height": 800}),
        json!({"type": "scmi", "clock_ids": [0], "allowed_list": []}),
    ] {
        let type_name = device["type"].as_str().expect("a type").to_owned();
        let config = config_with(dir.path(), device);
        let (status, log) = run_hvisor(dir.path(), &config);
        assert_one_error(
            status,
            &log,
            &[
                "zones[0] (zone id 1), devices[0], field \"socket\"",
                &format!(
                    "a \"{type_name}\" device needs an external vhost-user backend given by \
                     \"socket\""
                ),
            ],
        );
    }
}
