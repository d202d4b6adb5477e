//! The vhost-user target: a fuzzed frontend's messages, with descriptors, through the whole
//! path a connection takes in the daemon — the relay (`frontend_relay`) and
//! vhost-user-backend's request handler with its queue workers — serving a blk device with a
//! memory disk, which also offers inflight tracking (answered by the relay).
//!
//! Input: a guest memory image length `L` (2 bytes, little endian) and the image, written to
//! the memfd every memory descriptor is a duplicate of; then messages: request (4 bytes),
//! flags (4), descriptors (1 byte: count in bits 0-1, bit 2 eventfds instead of the guest
//! memfd), size (2 bytes, put in the header as it is) and as much payload as the size says
//! and the input has.
//!
//! One connection per input, served by the same entry point the serving loop uses
//! ([`serve_frontend`]) with the same device for every connection, as the daemon does. Checks:
//! the connection ends once the frontend closed (a hang is libFuzzer's timeout), nothing
//! panics (a panic on any thread aborts the fuzzer), and the bytes the frontend receives are
//! well-formed replies: header with the REPLY flag and version 1, a payload within the
//! protocol's limit and complete, to a request the frontend sent, at most one per request.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use hvisor_vhost_blk::{BlkBackend, BlkConfig, IoEngine};
use hvisor_vhost_core::stop::StopSignal;
use vhost::vhost_user::message::MAX_MSG_SIZE;
use vhost_user_transport::serve_frontend;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_SIZE: usize = 12;
const REPLY: u32 = 0x4;
const VERSION_1: u32 = 0x1;
/// Guest RAM memfd size.
const RAM_SIZE: u64 = 0x1_0000;

/// One message as the fuzzer wrote it.
struct Message<'a> {
    request: u32,
    flags: u32,
    fds: u8,
    size: u16,
    payload: &'a [u8],
}

fn messages(mut data: &[u8]) -> Vec<Message<'_>> {
    let mut list = Vec::new();
    while let Some((head, rest)) = data.split_first_chunk::<11>() {
        let size = u16::from_le_bytes([head[9], head[10]]);
        let (payload, rest) = rest.split_at(usize::from(size).min(rest.len()));
        list.push(Message {
            request: u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")),
            flags: u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")),
            fds: head[8],
            size,
            payload,
        });
        data = rest;
    }
    list
}

/// Encodes a message the way [`messages`] reads it (for seeds).
pub fn encode(request: u32, flags: u32, fds: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = request.to_le_bytes().to_vec();
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.push(fds);
    bytes.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

struct Daemon {
    backend: Arc<BlkBackend>,
    stop: Arc<StopSignal>,
}

fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        // As in the daemon's own process (Rust's runtime does it there; libFuzzer's C main
        // does not): a frontend that closed must be an EPIPE, not a SIGPIPE.
        // SAFETY: changes the disposition of one signal, before any thread of ours writes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let config = BlkConfig {
            io_engine: IoEngine::Sync,
            poll_us: 0,
            ..BlkConfig::memory(1 << 16)
        };
        Daemon {
            backend: Arc::new(BlkBackend::new(&config.validate().expect("valid")).expect("blk")),
            stop: StopSignal::new().expect("stop signal"),
        }
    })
}

fn memfd(image: &[u8]) -> File {
    // SAFETY: the name is NUL terminated; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.set_len(RAM_SIZE).expect("memfd size");
    file.write_all(&image[..image.len().min(RAM_SIZE as usize)])
        .expect("guest image");
    file
}

/// Sends every message (stopping when the daemon closed the connection), then closes the
/// sending side.
fn send_all(stream: &UnixStream, messages: &[Message], ram: &File) {
    let eventfds: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    for message in messages {
        let count = usize::from(message.fds & 3);
        let fds: Vec<RawFd> = if message.fds & 4 != 0 {
            eventfds[..count].iter().map(AsRawFd::as_raw_fd).collect()
        } else {
            vec![ram.as_raw_fd(); count]
        };
        let mut bytes = message.request.to_le_bytes().to_vec();
        bytes.extend_from_slice(&message.flags.to_le_bytes());
        bytes.extend_from_slice(&u32::from(message.size).to_le_bytes());
        bytes.extend_from_slice(message.payload);
        // The descriptors go with the first byte, as frontends send them.
        let sent = if fds.is_empty() {
            (&*stream).write_all(&bytes).is_ok()
        } else {
            stream
                .send_with_fds(&[&bytes[..]], &fds)
                .is_ok_and(|sent| (&*stream).write_all(&bytes[sent..]).is_ok())
        };
        if !sent {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Checks that `replies` is a sequence of complete, well-formed replies to `requests`.
fn check_replies(replies: &[u8], requests: &[Message]) {
    let mut rest = replies;
    let mut count = 0;
    while !rest.is_empty() {
        assert!(
            rest.len() >= HEADER_SIZE,
            "a reply header cut short: {rest:02x?}"
        );
        let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        assert_eq!(
            flags & (REPLY | 0x3),
            REPLY | VERSION_1,
            "reply to request {request} with flags {flags:#x}"
        );
        assert!(size <= MAX_MSG_SIZE, "reply of {size} bytes");
        assert!(
            rest.len() >= HEADER_SIZE + size,
            "reply to request {request} announces {size} bytes but {} follow",
            rest.len() - HEADER_SIZE
        );
        assert!(
            requests.iter().any(|message| message.request == request),
            "reply to request {request}, which the frontend never sent"
        );
        count += 1;
        rest = &rest[HEADER_SIZE + size..];
    }
    assert!(
        count <= requests.len(),
        "{count} replies to {} requests",
        requests.len()
    );
}

/// Work for one of the frontend's threads.
type Job = Box<dyn FnOnce() + Send>;

/// A thread that runs the jobs it is sent, one after the other, for the whole process:
/// starting two threads for every input took most of the target's time.
fn job_thread(name: &str) -> Mutex<mpsc::Sender<Job>> {
    let (jobs, queue) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || queue.into_iter().for_each(|job| job()))
        .expect("frontend thread");
    Mutex::new(jobs)
}

/// The frontend's two threads: one sends the messages, one reads the replies, so neither
/// side can block the other however many replies there are.
fn frontend_threads() -> &'static [Mutex<mpsc::Sender<Job>>; 2] {
    static THREADS: OnceLock<[Mutex<mpsc::Sender<Job>>; 2]> = OnceLock::new();
    THREADS.get_or_init(|| [job_thread("fuzz-sender"), job_thread("fuzz-reader")])
}

fn run_on(thread: &Mutex<mpsc::Sender<Job>>, job: Job) {
    thread
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(job)
        .expect("frontend thread alive");
}

pub fn vhost_user(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (image, rest) = rest.split_at(usize::from(u16::from_le_bytes(*len)).min(rest.len()));
    let requests = messages(rest);
    let daemon = daemon();
    let ram = memfd(image);
    let (frontend, daemon_end) = UnixStream::pair().expect("socket pair");
    let [sender, reader] = frontend_threads();
    let (replies_tx, replies_rx) = mpsc::channel();
    let reader_end = frontend.try_clone().expect("duplicate");
    run_on(
        reader,
        Box::new(move || {
            let mut replies = Vec::new();
            // Until the daemon closes its end (a reset connection counts as closed).
            let _ = (&reader_end).read_to_end(&mut replies);
            let _ = replies_tx.send(replies);
        }),
    );
    let (sent_tx, sent_rx) = mpsc::channel();
    let message_bytes = rest.to_vec();
    run_on(
        sender,
        Box::new(move || {
            send_all(&frontend, &messages(&message_bytes), &ram);
            // The frontend's end closes here, once everything is sent.
            drop(frontend);
            let _ = sent_tx.send(());
        }),
    );
    // A connection the device could not take is the daemon's to log, as the serving loop
    // does; the harness only needs it to end.
    let _ = serve_frontend("fuzz-blk", &daemon.backend, daemon_end, &daemon.stop);
    let replies = replies_rx.recv().expect("reply reader");
    sent_rx.recv().expect("message sender");
    check_replies(&replies, &requests);
}
