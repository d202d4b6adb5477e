//! Parser and validator for hvisor-tool's daemon configuration, `virtio_cfg.json`.
//!
//! This is the file `hvisor virtio start virtio_cfg.json` takes, read unchanged (format in
//! docs/hvisor-abi.md section 7). Everything is checked here, before any zone RAM is mapped or any
//! device is created: the C daemon discovers many of these mistakes only halfway through
//! start-up, or never (an MMIO window inside RAM is silently never trapped).
//!
//! This file holds the configuration's types and errors and reads the file; [`parse`] reads
//! each zone and device, field by field, and [`validate`] checks the rules a field's type does
//! not express (alignment, sizes, overlaps, limits).
//!
//! Numbers follow hvisor-tool's `json_parse.c` so that existing files keep their meaning: a
//! JSON number, or a string read like C `strtoumax(s, &end, 0)`, where `"010"` is octal 8.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::file_kind::describe;
use parse::{array, object, parse_zone, required};
use validate::validate;

mod parse;
#[cfg(test)]
mod tests;
mod validate;

/// Zone ids are indexes into per-zone tables of this size, in hvisor and in the daemon.
pub const MAX_ZONES: u32 = 32;
/// hvisor-tool's `MAX_DEVS`: the shared page publishes at most this many MMIO bases.
pub const MAX_DEVICES: usize = 8;
/// hvisor-tool's `CONFIG_MAX_MEMORY_REGIONS`, per zone.
pub const MAX_MEMORY_REGIONS: usize = 64;
pub const PAGE_SIZE: u64 = 4096;
/// Largest configuration file read: real ones are a few KiB, and a path like `/dev/zero` must
/// not make the daemon read forever.
pub const MAX_FILE_SIZE: u64 = 1 << 20;
/// virtio-blk's device id string is a fixed 20-byte field (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;
/// Linux `IFNAMSIZ` is 16 including the terminating NUL; hvisor-tool rejects longer names too.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// Queues of one device served by an external vhost-user backend (each has a kick and a call
/// eventfd; vhost-user-backend serves at most 64 per device).
pub const MAX_REMOTE_QUEUES: u16 = 64;
/// The largest queue size of a split virtqueue (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

const SUPPORTED_TYPES: &str =
    "blk, net, console, rng, vhost-user; gpu and scmi with an external backend's \"socket\"";

/// The whole daemon configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioConfig {
    /// In file order; ids are unique and below [`MAX_ZONES`].
    pub zones: Vec<ZoneConfig>,
}

/// One non-root zone served by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// hvisor zone id (`src_zone` of requests, `target_zone` of results).
    pub id: u32,
    /// 1..=[`MAX_MEMORY_REGIONS`] page-aligned windows, not overlapping in `zonex_ipa` space.
    pub memory_regions: Vec<MemoryRegion>,
    /// Enabled devices only, in file order.
    pub devices: Vec<DeviceConfig>,
}

/// A window of zone RAM: mapped from `/dev/hvisor` at offset `zone0_ipa`, seen by the
/// guest at `zonex_ipa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub zone0_ipa: u64,
    pub zonex_ipa: u64,
    pub size: u64,
}

/// One enabled virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Position in the zone's `devices` array as written, counting disabled entries, so
    /// that later messages point at the right entry of the file.
    pub index: usize,
    /// Guest-physical base of the MMIO window.
    pub addr: u64,
    pub len: u64,
    /// Interrupt the hypervisor injects into the zone.
    pub irq: u32,
    pub kind: DeviceKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// `readonly` and `serial` are our extensions; hvisor-tool ignores them.
    Blk {
        img: PathBuf,
        readonly: bool,
        serial: String,
    },
    Net {
        tap: String,
        mac: [u8; 6],
    },
    /// A PTY, as in hvisor-tool, unless our optional `socket` names a Unix socket to serve
    /// instead; our optional `log` receives a copy of the guest's output.
    Console {
        socket: Option<PathBuf>,
        log: Option<PathBuf>,
    },
    /// Our extension (hvisor-tool has no rng device): optional `source` (default
    /// `/dev/urandom`) and `rate_limit` in bytes per second.
    Rng {
        source: Option<PathBuf>,
        rate_limit: Option<u64>,
    },
    /// Our extension: served by a vhost-user backend in another process, this daemon being its
    /// frontend. `"type": "vhost-user"` with `device_id`, or an entry of another type (but
    /// console, whose `socket` is its own) with `socket`, the device id then coming from the
    /// type; that type's own fields are the backend's business and not read.
    VhostUser(ExternalBackend),
}

/// A device served by an external vhost-user backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBackend {
    /// The entry's `type`: `vhost-user`, or the type the backend serves (`blk`, `gpu`, ...).
    pub type_name: &'static str,
    /// Where the backend listens.
    pub socket: PathBuf,
    /// The virtio device id the DeviceID register shows.
    pub device_id: u32,
    /// QueueNumMax (a power of two); the backend must accept rings of this size.
    pub queue_size: Option<u16>,
    /// Queues presented; needed when the backend does not report its count (no MQ).
    pub num_queues: Option<u16>,
}

impl DeviceKind {
    /// The JSON `type` of the device.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Blk { .. } => "blk",
            DeviceKind::Net { .. } => "net",
            DeviceKind::Console { .. } => "console",
            DeviceKind::Rng { .. } => "rng",
            DeviceKind::VhostUser(backend) => backend.type_name,
        }
    }
}

/// Where in the file a problem is; displayed as
/// `file: zones[0] (zone id 1), devices[2], field "addr"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub zone: Option<ZoneRef>,
    pub entry: Option<Entry>,
    pub field: Option<String>,
}

/// A zone by position in `zones`, plus its id once that has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneRef {
    pub index: usize,
    pub id: Option<u32>,
}

/// An element of a zone's `memory_region` or `devices` array, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    MemoryRegion(usize),
    Device(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        let mut separator = ": ";
        if let Some(zone) = self.zone {
            write!(f, "{separator}zones[{}]", zone.index)?;
            if let Some(id) = zone.id {
                write!(f, " (zone id {id})")?;
            }
            separator = ", ";
        }
        match self.entry {
            Some(Entry::MemoryRegion(index)) => write!(f, "{separator}memory_region[{index}]")?,
            Some(Entry::Device(index)) => write!(f, "{separator}devices[{index}]")?,
            None => {}
        }
        if self.entry.is_some() {
            separator = ", ";
        }
        if let Some(field) = &self.field {
            write!(f, "{separator}field \"{field}\"")?;
        }
        Ok(())
    }
}

/// A half-open address range `[start, end)`, for overlap messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

impl Span {
    /// Callers pass windows whose end was already checked not to overflow; saturating only
    /// keeps a hand-built config from panicking here.
    fn new(start: u64, len: u64) -> Self {
        Self {
            start,
            end: start.saturating_add(len),
        }
    }

    fn overlaps(self, other: Span) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// Why a number could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberProblem {
    Empty,
    Sign,
    NoHexDigits,
    BadDigit { digit: char, radix: u32 },
    Overflow,
    Negative,
    NotInteger,
}

impl fmt::Display for NumberProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "the string is empty"),
            Self::Sign => write!(f, "a sign is not allowed"),
            Self::NoHexDigits => write!(f, "no hex digits after 0x"),
            Self::BadDigit { digit, radix: 8 } => write!(
                f,
                "{digit:?} is not an octal digit (a leading 0 means octal, as in C strtoumax)"
            ),
            Self::BadDigit { digit, radix: 16 } => write!(f, "{digit:?} is not a hex digit"),
            Self::BadDigit { digit, .. } => write!(f, "{digit:?} is not a decimal digit"),
            Self::Overflow => write!(f, "does not fit in 64 bits"),
            Self::Negative => write!(f, "negative numbers are not allowed"),
            Self::NotInteger => write!(
                f,
                "only whole numbers are allowed, without fraction or exponent"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the file: {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("{}: is {kind}; the configuration must be a regular file", file.display())]
    NotAFile { file: PathBuf, kind: String },
    #[error(
        "{}: {size} bytes; a configuration may have at most {MAX_FILE_SIZE}",
        file.display()
    )]
    TooLarge { file: PathBuf, size: u64 },
    #[error("{}: not valid JSON: {source}", file.display())]
    Syntax {
        file: PathBuf,
        source: serde_json::Error,
    },
    #[error("{at}: required key is missing")]
    Missing { at: Location },
    #[error("{at}: expected {expected}, found {found}")]
    WrongType {
        at: Location,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{at}: {text:?} is not a valid number: {problem}")]
    Number {
        at: Location,
        text: String,
        problem: NumberProblem,
    },
    #[error("{at}: {text} is out of range, the maximum is {max} ({max:#x})")]
    OutOfRange {
        at: Location,
        text: String,
        max: u64,
    },
    #[error("{at}: the zones array is empty")]
    NoZones { at: Location },
    #[error("{at}: {count} zones, at most {MAX_ZONES} are supported")]
    TooManyZones { at: Location, count: usize },
    #[error("{at}: zone id {id} is too large, ids must be below {MAX_ZONES}")]
    ZoneIdTooLarge { at: Location, id: u32 },
    #[error("{at}: zone id {id} is already used by zones[{first}]")]
    DuplicateZoneId { at: Location, id: u32, first: usize },
    #[error("{at}: a zone needs at least one memory region")]
    NoMemoryRegions { at: Location },
    #[error("{at}: {count} memory regions, at most {MAX_MEMORY_REGIONS} per zone are supported")]
    TooManyMemoryRegions { at: Location, count: usize },
    #[error(
        "{at}: must not be 0, because offset 0 of /dev/hvisor maps the request ring page, not zone RAM"
    )]
    ZeroZone0Ipa { at: Location },
    #[error("{at}: {value:#x} is not a multiple of the page size {PAGE_SIZE:#x}")]
    Unaligned { at: Location, value: u64 },
    #[error("{at}: must not be 0")]
    Zero { at: Location },
    #[error(
        "{at}: {base_field} {base:#x} + {len:#x} runs past the end of the 64-bit address space"
    )]
    Overflow {
        at: Location,
        base_field: &'static str,
        base: u64,
        len: u64,
    },
    #[error("{at}: zonex_ipa window {window} overlaps memory_region[{other}] {other_window}")]
    MemoryOverlap {
        at: Location,
        window: Span,
        other: usize,
        other_window: Span,
    },
    #[error("{at}: unsupported device type {found:?} (supported: {SUPPORTED_TYPES})")]
    UnknownType { at: Location, found: String },
    #[error(
        "{at}: a {type_name:?} device needs an external vhost-user backend given by \"socket\" \
         (the path of the backend's vhost-user socket); this daemon has no built-in {type_name}"
    )]
    NeedsBackend {
        at: Location,
        type_name: &'static str,
    },
    #[error("{at}: {value} is not a power of two from 1 to {max}")]
    NotPowerOfTwo { at: Location, value: u64, max: u64 },
    #[error(
        "{at}: socket {} already serves {other}; a vhost-user backend serves one device",
        socket.display()
    )]
    SharedSocket {
        at: Location,
        socket: Box<Path>,
        other: String,
    },
    #[error("{at}: MMIO window {window} overlaps devices[{other}] {other_window}")]
    DeviceOverlap {
        at: Location,
        window: Span,
        other: usize,
        other_window: Span,
    },
    #[error(
        "{at}: MMIO window {window} overlaps RAM memory_region[{region}] at zonex_ipa {region_window}; guest accesses to RAM are not trapped"
    )]
    DeviceInRam {
        at: Location,
        window: Span,
        region: usize,
        region_window: Span,
    },
    #[error("{at}: more than {MAX_DEVICES} enabled devices over all zones")]
    TooManyDevices { at: Location },
    #[error("{at}: a MAC address has 6 bytes, found {count} entries")]
    MacLength { at: Location, count: usize },
    #[error("{at}: must not be empty")]
    Empty { at: Location },
    #[error("{at}: {len} bytes long, at most {max} are allowed")]
    TooLong {
        at: Location,
        len: usize,
        max: usize,
    },
}

impl VirtioConfig {
    /// Reads, parses and validates `path`, which must be a regular file of at most
    /// [`MAX_FILE_SIZE`] bytes.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        };
        // Non-blocking, so that a FIFO with no writer is refused below instead of waiting here.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(ConfigError::NotAFile {
                file: path.to_path_buf(),
                kind: describe(&file, &metadata),
            });
        }
        let mut text = String::new();
        // One byte more than allowed tells a file that grew past the limit since the stat.
        file.take(MAX_FILE_SIZE + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        let size = metadata.len().max(text.len() as u64);
        if size > MAX_FILE_SIZE {
            return Err(ConfigError::TooLarge {
                file: path.to_path_buf(),
                size,
            });
        }
        Self::parse(&text, path)
    }

    /// The zones the daemon serves: those with at least one enabled device (only their RAM
    /// is mapped).
    pub fn served_zones(&self) -> impl Iterator<Item = &ZoneConfig> {
        self.zones.iter().filter(|zone| !zone.devices.is_empty())
    }

    /// Every memory region the daemon maps, with its zone id.
    pub fn served_regions(&self) -> impl Iterator<Item = (u32, &MemoryRegion)> {
        self.served_zones().flat_map(|zone| {
            zone.memory_regions
                .iter()
                .map(move |region| (zone.id, region))
        })
    }

    /// Parses and validates `text`; `origin` only names the file in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|source| ConfigError::Syntax {
            file: origin.to_path_buf(),
            source,
        })?;
        let ctx = Ctx {
            file: origin,
            zone: None,
            entry: None,
        };
        let root = object(&root, || ctx.whole())?;
        let list = array(required(root, "zones", ctx)?, || ctx.field("zones"))?;
        if list.is_empty() {
            return Err(ConfigError::NoZones {
                at: ctx.field("zones"),
            });
        }
        if list.len() > MAX_ZONES as usize {
            return Err(ConfigError::TooManyZones {
                at: ctx.field("zones"),
                count: list.len(),
            });
        }

        let mut zones: Vec<ZoneConfig> = Vec::with_capacity(list.len());
        for (index, value) in list.iter().enumerate() {
            let zone = parse_zone(value, index, ctx)?;
            if let Some(first) = zones.iter().position(|z| z.id == zone.id) {
                return Err(ConfigError::DuplicateZoneId {
                    at: ctx.in_zone(index, Some(zone.id)).field("id"),
                    id: zone.id,
                    first,
                });
            }
            zones.push(zone);
        }
        validate(&zones, ctx)?;
        Ok(Self { zones })
    }
}

/// The position being parsed; turned into a [`Location`] only when something is wrong.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    file: &'a Path,
    zone: Option<ZoneRef>,
    entry: Option<Entry>,
}

impl Ctx<'_> {
    fn in_zone(self, index: usize, id: Option<u32>) -> Self {
        Self {
            zone: Some(ZoneRef { index, id }),
            ..self
        }
    }

    fn in_entry(self, entry: Entry) -> Self {
        Self {
            entry: Some(entry),
            ..self
        }
    }

    fn location(&self, field: Option<&str>) -> Location {
        Location {
            file: self.file.to_path_buf(),
            zone: self.zone,
            entry: self.entry,
            field: field.map(str::to_owned),
        }
    }

    fn whole(&self) -> Location {
        self.location(None)
    }

    fn field(&self, name: &str) -> Location {
        self.location(Some(name))
    }
}
