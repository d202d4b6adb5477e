//! Many frontends in a row, as a guest that reboots or a frontend that reconnects in a loop:
//! every connection must give back what it took (descriptors, threads, memory), and a
//! connection the daemon cannot set up must not end it.

mod support;

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::frontend::{DriverConfig, VhostUserDriver};
use vhost::VhostBackend;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_guest_driver::blk;

const BINARY: &str = env!("CARGO_BIN_EXE_hvisor-vhost");
const TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per kind and queue count.
const CONNECTIONS: usize = 2000;
/// Connections before the first measurement, so allocator arenas and lazily created state
/// of the first connections are not counted as growth.
const WARM_UP: usize = 50;
/// What may legitimately differ between two measurements: a descriptor or thread the
/// measurement catches mid-teardown, allocator caches.
const FD_SLACK: usize = 2;
const THREAD_SLACK: usize = 1;
const RSS_SLACK_KIB: u64 = 4096;

fn start_blk(dir: &Path, socket: &Path, num_queues: u16) -> Daemon {
    let mut command = Command::new(BINARY);
    command
        .args(["blk", "--size", "1M", "--num-queues"])
        .arg(num_queues.to_string())
        .arg("--socket-path")
        .arg(socket)
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn(command, &dir.join(format!("blk-{num_queues}.log")));
    daemon.wait_for_path(socket, TIMEOUT);
    daemon
}

/// Descriptors, threads and resident memory of a process.
#[derive(Clone, Copy, Debug)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: libc::pid_t) -> Usage {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the daemon's descriptors")
        .count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Usage {
        fds,
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

/// SET_OWNER through SET_FEATURES, as a frontend does before it has guest memory.
fn handshake(socket: &Path) -> Frontend {
    handshake_on(UnixStream::connect(socket).expect("connect to the daemon"))
}

fn handshake_on(stream: UnixStream) -> Frontend {
    let mut frontend = Frontend::from_stream(stream, 1);
    frontend.set_owner().expect("SET_OWNER");
    let offered = frontend.get_features().expect("GET_FEATURES");
    let protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    frontend
        .set_protocol_features(protocol & VhostUserProtocolFeatures::MQ)
        .expect("SET_PROTOCOL_FEATURES");
    let features = (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(offered & features, features);
    frontend.set_features(features).expect("SET_FEATURES");
    frontend
}

/// Full set-up (memory table, rings) and a write read back.
fn set_up_with_io(socket: &Path, num_queues: usize, round: usize) {
    let config = DriverConfig {
        num_queues,
        queue_size: 16,
        mem_size: 1 << 20,
        ..DriverConfig::default()
    };
    let mut driver = VhostUserDriver::connect(socket, &config).expect("full set-up");
    let queue = round % num_queues;
    let data = [round as u8; 512];
    driver
        .submit(queue, &[&blk::header(VIRTIO_BLK_T_OUT, 0), &data], &[1])
        .expect("submit write");
    let used = driver.wait_used(queue, TIMEOUT).expect("write completion");
    assert_eq!(used.writable[0], [VIRTIO_BLK_S_OK as u8]);
    driver
        .submit(queue, &[&blk::header(VIRTIO_BLK_T_IN, 0)], &[512, 1])
        .expect("submit read");
    let used = driver.wait_used(queue, TIMEOUT).expect("read completion");
    assert_eq!(used.writable[0], data);
    driver.disconnect();
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Connect and close at once.
    Bare,
    /// Feature negotiation, then close.
    Handshake,
    /// Memory table, rings, one write and one read, then close.
    SetUpWithIo,
}

fn connect_once(kind: Kind, socket: &Path, num_queues: usize, round: usize) {
    match kind {
        Kind::Bare => drop(UnixStream::connect(socket).expect("connect to the daemon")),
        Kind::Handshake => drop(handshake(socket)),
        Kind::SetUpWithIo => set_up_with_io(socket, num_queues, round),
    }
}

/// Usage while a handshaken probe connection is open: the daemon answers it only after it
/// has torn down every earlier connection, so each measurement sees the same state.
fn settled_usage(daemon: &Daemon, socket: &Path) -> Usage {
    let probe = handshake(socket);
    let usage = usage(daemon.pid());
    drop(probe);
    usage
}

/// `CONNECTIONS` connections of each kind leave the daemon's descriptors, threads and
/// resident memory where they were.
fn churn(num_queues: u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("churn.sock");
    let mut daemon = start_blk(dir.path(), &socket, num_queues);
    for kind in [Kind::Bare, Kind::Handshake, Kind::SetUpWithIo] {
        for round in 0..WARM_UP {
            connect_once(kind, &socket, usize::from(num_queues), round);
        }
        let before = settled_usage(&daemon, &socket);
        let started = Instant::now();
        for round in 0..CONNECTIONS {
            connect_once(kind, &socket, usize::from(num_queues), round);
        }
        let after = settled_usage(&daemon, &socket);
        let elapsed = started.elapsed();
        println!(
            "{num_queues} queue(s), {CONNECTIONS} x {kind:?} in {elapsed:.1?}: \
             fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
            before.fds, after.fds, before.threads, after.threads, before.rss_kib, after.rss_kib
        );
        assert!(
            daemon.wait_exit(Duration::ZERO).is_none(),
            "{kind:?}: the daemon exited"
        );
        assert!(
            after.fds <= before.fds + FD_SLACK,
            "{kind:?} with {num_queues} queue(s): descriptors grew from {} to {}",
            before.fds,
            after.fds
        );
        assert!(
            after.threads <= before.threads + THREAD_SLACK,
            "{kind:?} with {num_queues} queue(s): threads grew from {} to {}",
            before.threads,
            after.threads
        );
        assert!(
            after.rss_kib <= before.rss_kib + RSS_SLACK_KIB,
            "{kind:?} with {num_queues} queue(s): RSS grew from {} to {} KiB",
            before.rss_kib,
            after.rss_kib
        );
    }
}

#[test]
fn connections_leave_no_trace_with_one_queue() {
    churn(1);
}

#[test]
fn connections_leave_no_trace_with_four_queues() {
    churn(4);
}

fn set_open_files_limit(pid: libc::pid_t, soft: libc::rlim_t) -> libc::rlim_t {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limits into a live local.
    let ret = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) };
    assert_eq!(ret, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: passes a live, initialised rlimit; a soft limit up to the hard one needs no
    // privilege.
    let ret = unsafe {
        libc::prlimit(
            pid,
            libc::RLIMIT_NOFILE,
            &raw const new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(ret, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// The soft open-files limit of `pid` that leaves exactly `free` descriptor numbers unused.
fn limit_leaving(pid: libc::pid_t, free: usize) -> libc::rlim_t {
    let open: std::collections::BTreeSet<usize> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the daemon's descriptors")
        .map(|entry| {
            let name = entry.expect("descriptor entry").file_name();
            name.to_str()
                .and_then(|n| n.parse().ok())
                .expect("numeric name")
        })
        .collect();
    let limit = (0..)
        .filter(|fd| !open.contains(fd))
        .nth(free)
        .expect("a free descriptor number");
    limit as libc::rlim_t
}

/// Waits until the daemon has no connection: back to `idle_threads`, with its descriptor count
/// steady (the last ones close just after the last worker is joined). Returns its usage then.
fn wait_until_idle(daemon: &Daemon, idle_threads: usize) -> Usage {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = usage(daemon.pid());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = usage(daemon.pid());
        if now.threads == idle_threads && now.fds == last.fds {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not become idle ({idle_threads} threads): {now:?}"
        );
        last = now;
    }
}

/// Lowers the daemon's open-files limit to leave `free` descriptors, connects a frontend,
/// and checks the daemon logs `failure` again and again, backing off, without exiting.
/// Restores the limit and returns the waiting frontend's connection.
fn connect_while_short_of_descriptors(
    daemon: &mut Daemon,
    socket: &Path,
    free: usize,
    failure: &str,
) -> UnixStream {
    let logged_before = daemon.log().matches(failure).count();
    let limit = set_open_files_limit(daemon.pid(), limit_leaving(daemon.pid(), free));
    let waiting = UnixStream::connect(socket).expect("connect to the daemon");
    waiting
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let deadline = Instant::now() + TIMEOUT;
    while daemon.log().matches(failure).count() == logged_before {
        if let Some(status) = daemon.wait_exit(Duration::ZERO) {
            panic!("the daemon exited ({status}) when it could not set up a connection");
        }
        assert!(
            Instant::now() < deadline,
            "no {failure:?} logged with {free} descriptors free"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Failing again and again for a while: the daemon stays, and backs off.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        daemon.wait_exit(Duration::ZERO).is_none(),
        "the daemon exited when it could not set up a connection"
    );
    let failures = daemon.log().matches(failure).count() - logged_before;
    assert!(
        failures <= 12,
        "{failures} failures logged in about 2 s: the daemon does not back off"
    );
    set_open_files_limit(daemon.pid(), limit);
    waiting
}

/// A frontend arriving while the daemon is short of descriptors is not served then, and is
/// not the end of the daemon either: it is served once descriptors are available again, and
/// so is the next one. Covered twice: with no descriptor at all, and with just enough for
/// vhost-user-backend to start one of the four worker threads before it fails, which must
/// not stay behind.
#[test]
fn a_connection_that_cannot_be_set_up_does_not_end_the_daemon() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("limits.sock");
    let mut daemon = start_blk(dir.path(), &socket, 4);
    let idle_threads = usage(daemon.pid()).threads;
    // The first memory table also sets up what the daemon keeps for good (its SIGBUS
    // handler's descriptors).
    set_up_with_io(&socket, 4, 0);
    let baseline = settled_usage(&daemon, &socket);
    // 8 for the four exit events, then 3 for the first worker's epoll and vring-enable
    // eventfd, and the second worker's epoll: its vring-enable eventfd fails.
    for (free, failure) in [
        (0, "cannot make the worker threads' exit events"),
        (12, "cannot create the connection's vhost-user daemon"),
    ] {
        wait_until_idle(&daemon, idle_threads);
        let waiting = connect_while_short_of_descriptors(&mut daemon, &socket, free, failure);
        drop(handshake_on(waiting));
        set_up_with_io(&socket, 4, free);
        let after = settled_usage(&daemon, &socket);
        println!("after failures with {free} descriptors free: {baseline:?} -> {after:?}");
        assert!(
            after.fds <= baseline.fds + FD_SLACK,
            "descriptors left behind"
        );
        assert!(
            after.threads <= baseline.threads + THREAD_SLACK,
            "threads left behind"
        );
    }
    assert!(daemon.wait_exit(Duration::ZERO).is_none());
}
