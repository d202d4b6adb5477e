//! A daemon under measurement: its command line from a template, its process, its output, and
//! the CPU time its threads used as /proc reports it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Error;

/// Placeholder for the path of the virtio_cfg.json the bench writes.
pub const CONFIG: &str = "{CONFIG}";
/// Placeholder for the hand-off socket the bench listens on.
pub const SOCKET: &str = "{SOCKET}";
/// Lines of the daemon's standard error that carry its counters start with this.
pub const COUNTERS_PREFIX: &str = "hvisor-vhost-counters";
/// Lines of standard error kept to explain a failure.
const TAIL_LINES: usize = 30;
const POLL: Duration = Duration::from_millis(2);

/// A daemon as given on the command line: `[LABEL: ]COMMAND` with `{CONFIG}` and `{SOCKET}`.
#[derive(Clone, Debug)]
pub struct Template {
    pub label: String,
    pub command: String,
}

impl Template {
    /// Parses `text`; `default_label` names it when it carries no `LABEL: ` prefix.
    pub fn parse(text: &str, default_label: String) -> Result<Self, String> {
        let (label, command) = match text.split_once(": ") {
            Some((label, command))
                if !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                (label.to_owned(), command.trim().to_owned())
            }
            _ => (default_label, text.trim().to_owned()),
        };
        for placeholder in [CONFIG, SOCKET] {
            if !command.contains(placeholder) {
                return Err(format!(
                    "daemon {label} ({command:?}) has no {placeholder}: the bench writes the \
                     configuration and listens on the hand-off socket, and the command must name \
                     both"
                ));
            }
        }
        Ok(Template { label, command })
    }

    pub fn render(&self, config: &Path, socket: &Path) -> String {
        self.command
            .replace(CONFIG, &config.display().to_string())
            .replace(SOCKET, &socket.display().to_string())
    }
}

/// What the daemon printed on standard error: its last lines and its counter lines.
#[derive(Default)]
struct Output {
    tail: VecDeque<String>,
    counters: Vec<String>,
}

/// How a daemon is started.
pub struct Launch<'a> {
    pub template: &'a Template,
    pub config: &'a Path,
    pub socket: &'a Path,
    /// Standard output and standard error are copied here.
    pub log: &'a Path,
    /// Run it under `strace -f -c`, the summary written to this file.
    pub strace_summary: Option<&'a Path>,
    /// Confine it (all its threads) to this CPU.
    pub cpu: Option<usize>,
}

/// A running daemon; killed and reaped when dropped.
pub struct Daemon {
    pub label: String,
    child: Child,
    /// The daemon's own process id (a child of strace when traced).
    pid: libc::pid_t,
    output: Arc<Mutex<Output>>,
    reader: Option<JoinHandle<()>>,
    log: PathBuf,
}

/// What a stopped daemon left behind.
pub struct Stopped {
    /// The last `hvisor-vhost-counters` line, without the prefix.
    pub counters: Option<String>,
}

impl Daemon {
    pub fn spawn(launch: &Launch) -> Result<Daemon, Error> {
        let rendered = launch.template.render(launch.config, launch.socket);
        let mut command = match launch.strace_summary {
            Some(summary) => {
                let mut command = Command::new("strace");
                command
                    .arg("-f")
                    .arg("-qq")
                    .arg("-c")
                    .arg("-o")
                    .arg(summary);
                command.arg("sh");
                command
            }
            None => Command::new("sh"),
        };
        // `exec`: the shell becomes the daemon, so its pid is the daemon's.
        command.arg("-c").arg(format!("exec {rendered}"));
        let log = File::create(launch.log)
            .map_err(|error| format!("{}: {error}", launch.log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(Stdio::piped());
        if let Some(cpu) = launch.cpu {
            // SAFETY: between fork and exec the closure only calls sched_setaffinity, which is
            // async-signal-safe, on a set built on the stack.
            unsafe {
                command.pre_exec(move || pin_to(0, cpu));
            }
        }
        let mut child = command
            .spawn()
            .map_err(|error| format!("starting {:?}: {error}", launch.template.command))?;
        let stderr = child.stderr.take().expect("stderr was piped");
        let output = Arc::new(Mutex::new(Output::default()));
        let reader = {
            let output = output.clone();
            std::thread::Builder::new()
                .name("daemon-stderr".into())
                .spawn(move || read_stderr(stderr, log, &output))?
        };
        let child_pid = libc::pid_t::try_from(child.id())?;
        let mut daemon = Daemon {
            label: launch.template.label.clone(),
            child,
            pid: child_pid,
            output,
            reader: Some(reader),
            log: launch.log.to_owned(),
        };
        if launch.strace_summary.is_some() {
            daemon.pid = daemon.traced_child()?;
        }
        Ok(daemon)
    }

    /// The process strace started: its child that runs another program (strace first forks
    /// short-lived children of its own to probe ptrace features).
    fn traced_child(&mut self) -> Result<libc::pid_t, Error> {
        let strace = self.pid;
        let children = format!("/proc/{strace}/task/{strace}/children");
        let program = |pid: &str| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let strace_program = program(&strace.to_string());
        let started = Instant::now();
        loop {
            let listed = std::fs::read_to_string(&children).unwrap_or_default();
            let traced = listed
                .split_whitespace()
                .find(|pid| program(pid).is_some_and(|exe| Some(&exe) != strace_program.as_ref()));
            if let Some(pid) = traced {
                return Ok(pid.parse()?);
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("strace exited ({status})")).into());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(self.failure("strace started no process within 10 s").into());
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Whether the process (strace, when traced) has exited; its status if so.
    pub fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// `what` went wrong with this daemon, with the end of what it printed.
    pub fn failure(&self, what: &str) -> String {
        let output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        let mut message = format!("daemon {}: {what}", self.label);
        if output.tail.is_empty() {
            message.push_str(" (it printed nothing on standard error)");
        } else {
            message.push_str("; the end of its standard error:");
            for line in &output.tail {
                message.push_str("\n    ");
                message.push_str(line);
            }
        }
        message.push_str(&format!("\n  (full output: {})", self.log.display()));
        message
    }

    /// Waits for the daemon to exit once the hypervisor side has gone (the caller closed the
    /// hand-off connection); sends SIGTERM after `grace`, SIGKILL after twice that.
    pub fn stop(mut self, grace: Duration) -> Result<Stopped, Error> {
        let started = Instant::now();
        let mut terminated = false;
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            let waited = started.elapsed();
            if waited > 2 * grace {
                self.child.kill()?;
                self.child.wait()?;
                break;
            }
            if waited > grace && !terminated {
                // SAFETY: kill has no memory-safety preconditions; the pid is our child's
                // (or strace's child, which strace reaps only after it exits).
                unsafe { libc::kill(self.pid, libc::SIGTERM) };
                terminated = true;
            }
            std::thread::sleep(POLL);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let counters = self
            .output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters
            .last()
            .cloned();
        Ok(Stopped { counters })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_stderr(stderr: impl io::Read, mut log: File, output: &Mutex<Output>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(log, "{line}");
        let mut output = output.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counters) = line.strip_prefix(COUNTERS_PREFIX) {
            output.counters.push(counters.trim().to_owned());
        }
        if output.tail.len() == TAIL_LINES {
            output.tail.pop_front();
        }
        output.tail.push_back(line);
    }
}

/// Confines thread `tid` (0: the calling thread) to `cpu`.
pub fn pin_to(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
    // SAFETY: `cpu_set_t` is a plain bit array, all zeroes is the empty set, CPU_SET only writes
    // inside it, and sched_setaffinity reads exactly `size_of::<cpu_set_t>()` bytes of it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn clock_tick() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Duration::from_secs(1) / u32::try_from(ticks).unwrap_or(100).max(1)
}

/// The name and utime + stime (in clock ticks) of the text of a `/proc/.../stat` file.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    // The name is in parentheses and may itself contain spaces or parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    // Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    Some((name, ticks(14)? + ticks(15)?))
}

fn read_stat(path: &Path) -> io::Result<(String, Duration)> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))?;
    let (name, ticks) = parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a stat line: {text:?}", path.display()),
        )
    })?;
    Ok((
        name,
        clock_tick() * u32::try_from(ticks).unwrap_or(u32::MAX),
    ))
}

/// CPU time (user + system) the whole process has used, exited threads included.
pub fn process_cpu(pid: libc::pid_t) -> io::Result<Duration> {
    Ok(read_stat(Path::new(&format!("/proc/{pid}/stat")))?.1)
}

/// CPU time of each live thread of `pid`, keyed `name` (or `name#N` in the order of thread
/// ids when several threads share a name, as hvisor-tool's do).
pub fn thread_cpu(pid: libc::pid_t) -> io::Result<HashMap<String, Duration>> {
    let mut threads = Vec::new();
    let task = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&task)
        .map_err(|error| io::Error::new(error.kind(), format!("{task}: {error}")))?;
    for entry in entries {
        let path = entry?.path();
        let Some(tid) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread that ended meanwhile has no stat any more: skip it.
        if let Ok((name, cpu)) = read_stat(&path.join("stat")) {
            threads.push((tid, name, cpu));
        }
    }
    Ok(key_threads(threads))
}

/// Keys threads (tid, name, CPU) by name, numbering `name#N` in the order of thread ids the
/// names that several threads share.
fn key_threads(mut threads: Vec<(u32, String, Duration)>) -> HashMap<String, Duration> {
    threads.sort_unstable_by_key(|&(tid, _, _)| tid);
    let mut sharing: HashMap<String, usize> = HashMap::new();
    for (_, name, _) in &threads {
        *sharing.entry(name.clone()).or_default() += 1;
    }
    let mut numbered: HashMap<String, usize> = HashMap::new();
    let mut keyed = HashMap::new();
    for (_, name, cpu) in threads {
        let key = if sharing[&name] > 1 {
            let next = numbered.entry(name.clone()).or_default();
            *next += 1;
            format!("{name}#{}", *next - 1)
        } else {
            name
        };
        keyed.insert(key, cpu);
    }
    keyed
}

/// Per-thread CPU used between two [`thread_cpu`] snapshots (threads born meanwhile count
/// from zero).
pub fn thread_delta(
    before: &HashMap<String, Duration>,
    after: &HashMap<String, Duration>,
) -> HashMap<String, Duration> {
    after
        .iter()
        .map(|(name, &cpu)| {
            let earlier = before.get(name).copied().unwrap_or_default();
            (name.clone(), cpu.saturating_sub(earlier))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_prefix_is_taken_and_env_assignments_are_not() {
        let labelled = Template::parse("ours: d --socket {SOCKET} {CONFIG}", "A".into()).unwrap();
        assert_eq!(labelled.label, "ours");
        assert_eq!(labelled.command, "d --socket {SOCKET} {CONFIG}");
        let plain = Template::parse("env X={SOCKET} d {CONFIG}", "B".into()).unwrap();
        assert_eq!(plain.label, "B");
        assert_eq!(plain.command, "env X={SOCKET} d {CONFIG}");
        let spaced = Template::parse("a b: d {SOCKET} {CONFIG}", "C".into()).unwrap();
        assert_eq!(spaced.label, "C");
    }

    #[test]
    fn both_placeholders_are_required() {
        let error = Template::parse("d --config {CONFIG}", "A".into()).unwrap_err();
        assert!(error.contains("{SOCKET}"), "{error}");
        let error = Template::parse("d {SOCKET}", "A".into()).unwrap_err();
        assert!(error.contains("{CONFIG}"), "{error}");
    }

    #[test]
    fn render_fills_every_placeholder() {
        let template = Template::parse("d {SOCKET} {CONFIG} {SOCKET}", "A".into()).unwrap();
        assert_eq!(
            template.render(Path::new("/c.json"), Path::new("/s.sock")),
            "d /s.sock /c.json /s.sock"
        );
    }

    #[test]
    fn stat_names_may_hold_spaces_and_parentheses() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("a (b) c".into(), 12)));
        assert_eq!(parse_stat("42 (short) S 1"), None);
    }

    #[test]
    fn threads_sharing_a_name_are_numbered_by_thread_id() {
        let ms = Duration::from_millis;
        let keyed = key_threads(vec![
            (12, "hvisor-virtio".into(), ms(3)),
            (10, "hvisor-virtio".into(), ms(1)),
            (11, "interrupts".into(), ms(2)),
        ]);
        assert_eq!(keyed["hvisor-virtio#0"], ms(1));
        assert_eq!(keyed["hvisor-virtio#1"], ms(3));
        assert_eq!(keyed["interrupts"], ms(2));
        assert_eq!(keyed.len(), 3);
    }
}
