//! The hand-off protocol between a hypervisor played by another process and the daemon
//! (specified in docs/hypervisor-socket.md): each side sends one framed JSON message with file
//! descriptors attached.
//!
//! Frame: a 4-byte little-endian length, then that many bytes of UTF-8 JSON. The descriptors
//! travel as SCM_RIGHTS ancillary data with the frame's first bytes; JSON fields name them by
//! their position in that list.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::abi::BRIDGE_MAP_SIZE;
use super::config::MemoryRegion;
use super::file_kind::{describe, is_eventfd};

pub const PROTOCOL: &str = "hvisor-vhost-handoff";
pub const VERSION: u32 = 1;
/// Largest JSON body accepted.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The kernel's limit of descriptors in one message (SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// One zone RAM window: guest RAM of `zone` that root Linux sees at `zone0_ipa`, shared as
/// `size` bytes of descriptor `fd` starting at byte `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RamWindow {
    pub zone: u32,
    pub zone0_ipa: u64,
    pub size: u64,
    pub fd: usize,
    pub offset: u64,
}

/// Hypervisor to daemon: the bridge page, the wake-up eventfd, and the RAM windows.
///
/// Read with [`HypervisorHello::from_json`] rather than a derived `Deserialize`, so that every
/// mistake names its field (serde's messages give only a line and column).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HypervisorHello {
    pub protocol: String,
    pub version: u32,
    pub bridge_fd: usize,
    pub wakeup_fd: usize,
    pub windows: Vec<RamWindow>,
}

/// A hello that does not follow docs/hypervisor-socket.md; each names the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("the message is {found}, not a JSON object")]
    NotAnObject { found: String },
    #[error("field \"{field}\" is missing")]
    Missing { field: String },
    #[error("field \"{field}\": expected {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("field \"protocol\" is {found:?}, expected {PROTOCOL:?}")]
    Protocol { found: String },
    #[error("field \"version\": protocol version {found} is not the supported {VERSION}")]
    Version { found: u64 },
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(flag) => format!("the boolean {flag}"),
        Value::Number(number) => format!("the number {number}"),
        Value::String(text) => format!("the string {text:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn wrong_type(field: impl Into<String>, expected: &'static str, value: &Value) -> HelloError {
    HelloError::WrongType {
        field: field.into(),
        expected,
        found: describe_value(value),
    }
}

fn field<'v>(
    object: &'v Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<&'v Value, HelloError> {
    object.get(name).ok_or_else(|| HelloError::Missing {
        field: format!("{path}{name}"),
    })
}

/// An unsigned integer no larger than `max`.
fn unsigned(value: &Value, max: u64, field: String) -> Result<u64, HelloError> {
    value
        .as_u64()
        .filter(|&number| number <= max)
        .ok_or_else(|| {
            let expected = if max == u64::from(u32::MAX) {
                "an unsigned 32-bit integer"
            } else {
                "an unsigned 64-bit integer"
            };
            wrong_type(field, expected, value)
        })
}

fn unsigned_field(
    object: &Map<String, Value>,
    name: &str,
    path: &str,
    max: u64,
) -> Result<u64, HelloError> {
    unsigned(field(object, name, path)?, max, format!("{path}{name}"))
}

fn descriptor_field(
    object: &Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<usize, HelloError> {
    let value = field(object, name, path)?;
    value
        .as_u64()
        .and_then(|index| usize::try_from(index).ok())
        .ok_or_else(|| {
            let expected = "a descriptor position (an unsigned integer)";
            wrong_type(format!("{path}{name}"), expected, value)
        })
}

impl HypervisorHello {
    pub fn new(bridge_fd: usize, wakeup_fd: usize, windows: Vec<RamWindow>) -> Self {
        HypervisorHello {
            protocol: PROTOCOL.into(),
            version: VERSION,
            bridge_fd,
            wakeup_fd,
            windows,
        }
    }

    /// Reads a hello; the protocol and version are checked first, so that a message of another
    /// protocol or version is reported as such rather than by its first unknown field.
    pub fn from_json(message: &Value) -> Result<Self, HelloError> {
        let object = message.as_object().ok_or_else(|| HelloError::NotAnObject {
            found: describe_value(message),
        })?;
        let protocol = field(object, "protocol", "")?;
        let protocol = protocol
            .as_str()
            .ok_or_else(|| wrong_type("protocol", "a string", protocol))?;
        if protocol != PROTOCOL {
            return Err(HelloError::Protocol {
                found: protocol.into(),
            });
        }
        let version = unsigned_field(object, "version", "", u64::MAX)?;
        if version != u64::from(VERSION) {
            return Err(HelloError::Version { found: version });
        }
        let bridge_fd = descriptor_field(object, "bridge_fd", "")?;
        let wakeup_fd = descriptor_field(object, "wakeup_fd", "")?;
        let list = field(object, "windows", "")?;
        let list = list
            .as_array()
            .ok_or_else(|| wrong_type("windows", "an array", list))?;
        let windows = list
            .iter()
            .enumerate()
            .map(|(index, window)| {
                let path = format!("windows[{index}].");
                let window = window
                    .as_object()
                    .ok_or_else(|| wrong_type(format!("windows[{index}]"), "an object", window))?;
                Ok(RamWindow {
                    zone: unsigned_field(window, "zone", &path, u64::from(u32::MAX))? as u32,
                    zone0_ipa: unsigned_field(window, "zone0_ipa", &path, u64::MAX)?,
                    size: unsigned_field(window, "size", &path, u64::MAX)?,
                    fd: descriptor_field(window, "fd", &path)?,
                    offset: match window.get("offset") {
                        None => 0,
                        Some(offset) => unsigned(offset, u64::MAX, format!("{path}offset"))?,
                    },
                })
            })
            .collect::<Result<_, HelloError>>()?;
        Ok(HypervisorHello {
            protocol: PROTOCOL.into(),
            version: VERSION,
            bridge_fd,
            wakeup_fd,
            windows,
        })
    }
}

/// Daemon to hypervisor: the eventfd the daemon signals instead of the FINISH_REQ hypercall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonReply {
    pub protocol: String,
    pub version: u32,
    pub finish_fd: usize,
}

impl DaemonReply {
    pub fn new(finish_fd: usize) -> Self {
        DaemonReply {
            protocol: PROTOCOL.into(),
            version: VERSION,
            finish_fd,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        check_header(&self.protocol, self.version)
    }
}

fn check_header(protocol: &str, version: u32) -> Result<(), String> {
    if protocol != PROTOCOL {
        return Err(format!("protocol is {protocol:?}, expected {PROTOCOL:?}"));
    }
    if version != VERSION {
        return Err(format!(
            "protocol version {version} is not the supported {VERSION}"
        ));
    }
    Ok(())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Sends `message` with `fds` attached (sending a closed descriptor fails with EBADF).
pub fn send<T: Serialize>(stream: &UnixStream, message: &T, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(|error| invalid(error.to_string()))?;
    if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(invalid(format!(
            "message of {} bytes with {} descriptors is too large",
            body.len(),
            fds.len()
        )));
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let sent = stream
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    (&*stream).write_all(&frame[sent..])
}

/// Receives one message and the descriptors that came with it (each `Some` until taken).
pub fn receive<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<(T, Vec<Option<File>>)> {
    let mut buffer = vec![0u8; 4 + MAX_MESSAGE];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iovec = [libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    }];
    // SAFETY: the iovec covers exactly `buffer`, which is alive and writable for the call.
    let (mut received, fd_count) = unsafe { stream.recv_with_fds(&mut iovec, &mut raw) }
        .map_err(|error| io::Error::from_raw_os_error(error.errno()))?;
    let files: Vec<Option<File>> = raw[..fd_count]
        .iter()
        // SAFETY: SCM_RIGHTS installed these descriptors in this process for us alone.
        .map(|&fd| Some(unsafe { File::from_raw_fd(fd) }))
        .collect();
    if received == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed before its message",
        ));
    }
    while received < 4 {
        received += read_some(stream, &mut buffer[received..4])?;
    }
    let length = u32::from_le_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
    if length > MAX_MESSAGE {
        return Err(invalid(format!(
            "message length {length} exceeds {MAX_MESSAGE}"
        )));
    }
    while received < 4 + length {
        received += read_some(stream, &mut buffer[received..4 + length])?;
    }
    let message = serde_json::from_slice(&buffer[4..4 + length])
        .map_err(|error| invalid(format!("message body: {error}")))?;
    Ok((message, files))
}

fn read_some(stream: &UnixStream, into: &mut [u8]) -> io::Result<usize> {
    match (&*stream).read(into)? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed mid-message",
        )),
        n => Ok(n),
    }
}

/// A RAM window as received: where its memory is.
pub struct Window {
    pub zone: u32,
    pub zone0_ipa: u64,
    pub size: u64,
    pub offset: u64,
    /// Several windows may share one descriptor.
    pub file: Arc<File>,
}

/// Everything a hello handed over, checked so that the daemon can neither crash on it (a
/// file too short to map is SIGBUS on first touch) nor fail after it replied.
pub struct Handoff {
    pub bridge: File,
    pub wakeup: EventFd,
    pub windows: Vec<Window>,
}

/// A hello whose descriptors do not hold what it says; each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(transparent)]
    Hello(#[from] HelloError),
    #[error("field \"{field}\" names descriptor {index}, which was not sent ({sent} were)")]
    NotSent {
        field: String,
        index: usize,
        sent: usize,
    },
    #[error(
        "field \"{field}\" names descriptor {index}, which is already \"{first}\"; only windows \
         may share a descriptor"
    )]
    SharedRole {
        field: String,
        index: usize,
        first: String,
    },
    #[error("field \"{field}\": descriptor {index} is {kind}, not {expected}")]
    WrongKind {
        field: String,
        index: usize,
        kind: String,
        expected: &'static str,
    },
    #[error("field \"{field}\": descriptor {index} is not open for reading and writing")]
    NotReadWrite { field: String, index: usize },
    #[error(
        "field \"bridge_fd\": descriptor {index} holds {size} bytes; the bridge page needs \
         {BRIDGE_MAP_SIZE}"
    )]
    BridgeTooSmall { index: usize, size: u64 },
    #[error("field \"{field}\": {value:#x} is not a multiple of the page size {page:#x}")]
    Unaligned {
        field: String,
        value: u64,
        page: u64,
    },
    #[error("field \"windows[{window}].size\" must not be 0")]
    EmptyWindow { window: usize },
    #[error(
        "windows[{window}]: offset {offset:#x} + size {size:#x} runs past the end of descriptor \
         {index}, which holds {file_size:#x} bytes"
    )]
    PastEnd {
        window: usize,
        offset: u64,
        size: u64,
        index: usize,
        file_size: u64,
    },
    #[error("windows[{window}] repeats zone {zone} zone0_ipa {zone0_ipa:#x} of windows[{first}]")]
    Duplicate {
        window: usize,
        first: usize,
        zone: u32,
        zone0_ipa: u64,
    },
    #[error(
        "field \"windows\": no window for zone {zone} at zone0_ipa {zone0_ipa:#x}, a memory \
         region of {size:#x} bytes in the configuration"
    )]
    MissingWindow {
        zone: u32,
        zone0_ipa: u64,
        size: u64,
    },
    #[error(
        "field \"windows[{window}].size\": {size:#x} bytes, but zone {zone}'s memory region at \
         zone0_ipa {zone0_ipa:#x} has {needed:#x} in the configuration"
    )]
    WindowTooSmall {
        window: usize,
        size: u64,
        zone: u32,
        zone0_ipa: u64,
        needed: u64,
    },
    #[error("field \"{field}\": cannot inspect descriptor {index}: {source}")]
    Inspect {
        field: String,
        index: usize,
        source: io::Error,
    },
}

fn is_read_write(file: &File) -> io::Result<bool> {
    // SAFETY: F_GETFL only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_ACCMODE == libc::O_RDWR)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// Checks that `file` (descriptor `index`, named by `field`) is a regular file (a memfd is one)
/// open read-write, which `MAP_SHARED` with write access needs; returns its size.
fn shared_memory_size(file: &File, field: &str, index: usize) -> Result<u64, HandoffError> {
    let inspect = |source| HandoffError::Inspect {
        field: field.into(),
        index,
        source,
    };
    let metadata = file.metadata().map_err(inspect)?;
    if !metadata.file_type().is_file() {
        return Err(HandoffError::WrongKind {
            field: field.into(),
            index,
            kind: describe(file, &metadata),
            expected: "a memfd or other regular file",
        });
    }
    if !is_read_write(file).map_err(inspect)? {
        return Err(HandoffError::NotReadWrite {
            field: field.into(),
            index,
        });
    }
    Ok(metadata.len())
}

impl Handoff {
    /// Takes what `hello` names out of `files` and checks it all: each descriptor sent, of the
    /// right kind, large enough for what is mapped from it, offsets page aligned, and a window
    /// for each of `regions` (zone id, memory region) that is at least as large.
    pub fn check(
        hello: &HypervisorHello,
        mut files: Vec<Option<File>>,
        regions: &[(u32, MemoryRegion)],
    ) -> Result<Handoff, HandoffError> {
        let sent = files.len();
        // The field that first named each descriptor; only windows may share one.
        let mut roles: Vec<Option<String>> = vec![None; sent];
        let mut claim = |index: usize, field: String, shareable: bool| {
            let Some(role) = roles.get_mut(index) else {
                return Err(HandoffError::NotSent { field, index, sent });
            };
            match role {
                None => *role = Some(field),
                Some(first) if shareable && first.starts_with("windows[") => {}
                Some(first) => {
                    return Err(HandoffError::SharedRole {
                        field,
                        index,
                        first: first.clone(),
                    });
                }
            }
            Ok(())
        };
        claim(hello.bridge_fd, "bridge_fd".into(), false)?;
        claim(hello.wakeup_fd, "wakeup_fd".into(), false)?;
        for (position, window) in hello.windows.iter().enumerate() {
            claim(window.fd, format!("windows[{position}].fd"), true)?;
        }

        let bridge = files[hello.bridge_fd].take().expect("claimed once");
        let size = shared_memory_size(&bridge, "bridge_fd", hello.bridge_fd)?;
        if size < BRIDGE_MAP_SIZE as u64 {
            return Err(HandoffError::BridgeTooSmall {
                index: hello.bridge_fd,
                size,
            });
        }
        let wakeup = files[hello.wakeup_fd].take().expect("claimed once");
        if !is_eventfd(&wakeup) {
            let metadata = wakeup.metadata().map_err(|source| HandoffError::Inspect {
                field: "wakeup_fd".into(),
                index: hello.wakeup_fd,
                source,
            })?;
            return Err(HandoffError::WrongKind {
                field: "wakeup_fd".into(),
                index: hello.wakeup_fd,
                kind: describe(&wakeup, &metadata),
                expected: "an eventfd",
            });
        }
        // SAFETY: an eventfd (checked above) that this process now owns alone.
        let wakeup = unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(wakeup)) };

        let page = page_size();
        let mut shared: Vec<Option<(Arc<File>, u64)>> = (0..sent).map(|_| None).collect();
        let mut windows: Vec<Window> = Vec::new();
        for (position, window) in hello.windows.iter().enumerate() {
            let field = format!("windows[{position}].fd");
            let (file, file_size) = match &shared[window.fd] {
                Some((file, size)) => (file.clone(), *size),
                None => {
                    let file = files[window.fd].take().expect("claimed by windows only");
                    let size = shared_memory_size(&file, &field, window.fd)?;
                    let entry = (Arc::new(file), size);
                    shared[window.fd] = Some(entry.clone());
                    entry
                }
            };
            if window.offset % page != 0 {
                return Err(HandoffError::Unaligned {
                    field: format!("windows[{position}].offset"),
                    value: window.offset,
                    page,
                });
            }
            if window.size == 0 {
                return Err(HandoffError::EmptyWindow { window: position });
            }
            if window
                .offset
                .checked_add(window.size)
                .is_none_or(|end| end > file_size)
            {
                return Err(HandoffError::PastEnd {
                    window: position,
                    offset: window.offset,
                    size: window.size,
                    index: window.fd,
                    file_size,
                });
            }
            if let Some(first) = hello.windows[..position]
                .iter()
                .position(|other| other.zone == window.zone && other.zone0_ipa == window.zone0_ipa)
            {
                return Err(HandoffError::Duplicate {
                    window: position,
                    first,
                    zone: window.zone,
                    zone0_ipa: window.zone0_ipa,
                });
            }
            windows.push(Window {
                zone: window.zone,
                zone0_ipa: window.zone0_ipa,
                size: window.size,
                offset: window.offset,
                file,
            });
        }
        for &(zone, region) in regions {
            let position = windows
                .iter()
                .position(|window| window.zone == zone && window.zone0_ipa == region.zone0_ipa)
                .ok_or(HandoffError::MissingWindow {
                    zone,
                    zone0_ipa: region.zone0_ipa,
                    size: region.size,
                })?;
            if windows[position].size < region.size {
                return Err(HandoffError::WindowTooSmall {
                    window: position,
                    size: windows[position].size,
                    zone,
                    zone0_ipa: region.zone0_ipa,
                    needed: region.size,
                });
            }
        }
        Ok(Handoff {
            bridge,
            wakeup,
            windows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Seek;

    #[test]
    fn messages_and_descriptors_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        (&file).write_all(b"shared").unwrap();
        let hello = HypervisorHello::new(
            0,
            0,
            vec![RamWindow {
                zone: 1,
                zone0_ipa: 0x5000_0000,
                size: 0x1000,
                fd: 0,
                offset: 0,
            }],
        );
        send(&a, &hello, &[file.as_raw_fd()]).unwrap();
        let (received, mut files): (Value, _) = receive(&b).unwrap();
        assert_eq!(HypervisorHello::from_json(&received), Ok(hello));
        let mut shared = files[0].take().unwrap();
        let mut text = String::new();
        shared.rewind().unwrap();
        shared.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared");
    }

    #[test]
    fn bad_messages_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&8u32.to_le_bytes()).unwrap();
        (&a).write_all(b"not json").unwrap();
        assert!(receive::<DaemonReply>(&b).is_err());
        drop(a);
        assert_eq!(
            receive::<DaemonReply>(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let wrong = DaemonReply {
            protocol: "other".into(),
            version: VERSION,
            finish_fd: 0,
        };
        assert!(wrong.check().unwrap_err().contains("other"));
        let future = DaemonReply {
            version: 2,
            ..DaemonReply::new(0)
        };
        assert!(future.check().unwrap_err().contains("version 2"));
    }

    fn hello_json() -> Value {
        json!({
            "protocol": PROTOCOL, "version": 1, "bridge_fd": 0, "wakeup_fd": 1,
            "windows": [{"zone": 1, "zone0_ipa": 4096, "size": 8192, "fd": 2, "offset": 4096}]
        })
    }

    /// Every mistake in a hello names its field, whatever JSON type it has.
    #[test]
    fn hello_errors_name_the_field() {
        let mut hello = hello_json();
        assert_eq!(
            HypervisorHello::from_json(&hello).unwrap().windows[0].offset,
            4096
        );
        hello["windows"][0]
            .as_object_mut()
            .unwrap()
            .remove("offset");
        let parsed = HypervisorHello::from_json(&hello).unwrap();
        assert_eq!(parsed.windows[0].offset, 0, "offset defaults to 0");
        let cases: [(&str, Value, &str); 12] = [
            (
                "/bridge_fd",
                json!("0"),
                "field \"bridge_fd\": expected a descriptor position",
            ),
            ("/wakeup_fd", json!(-1), "field \"wakeup_fd\""),
            (
                "/windows",
                json!({}),
                "field \"windows\": expected an array, found an object",
            ),
            (
                "/windows/0",
                json!(3),
                "field \"windows[0]\": expected an object",
            ),
            (
                "/windows/0/zone",
                json!(1u64 << 32),
                "field \"windows[0].zone\"",
            ),
            (
                "/windows/0/zone0_ipa",
                json!("0x1000"),
                "\"windows[0].zone0_ipa\": expected an unsigned 64-bit integer, found the string \"0x1000\"",
            ),
            ("/windows/0/size", json!(1.5), "field \"windows[0].size\""),
            ("/windows/0/fd", Value::Null, "field \"windows[0].fd\""),
            (
                "/windows/0/offset",
                json!(true),
                "field \"windows[0].offset\"",
            ),
            (
                "/version",
                json!(2),
                "field \"version\": protocol version 2",
            ),
            ("/version", json!("1"), "field \"version\""),
            (
                "/protocol",
                json!("vhost"),
                "field \"protocol\" is \"vhost\"",
            ),
        ];
        for (pointer, value, expected) in cases {
            let mut hello = hello_json();
            *hello.pointer_mut(pointer).unwrap() = value;
            let error = HypervisorHello::from_json(&hello).unwrap_err().to_string();
            assert!(error.contains(expected), "{pointer}: {error}");
        }
        for key in ["protocol", "version", "bridge_fd", "wakeup_fd", "windows"] {
            let mut hello = hello_json();
            hello.as_object_mut().unwrap().remove(key);
            let error = HypervisorHello::from_json(&hello).unwrap_err().to_string();
            assert_eq!(error, format!("field \"{key}\" is missing"));
        }
        let mut hello = hello_json();
        hello["windows"][0].as_object_mut().unwrap().remove("size");
        assert_eq!(
            HypervisorHello::from_json(&hello).unwrap_err().to_string(),
            "field \"windows[0].size\" is missing"
        );
        assert_eq!(
            HypervisorHello::from_json(&json!([1]))
                .unwrap_err()
                .to_string(),
            "the message is an array, not a JSON object"
        );
    }
}
