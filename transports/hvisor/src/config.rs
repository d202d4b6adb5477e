//! Parser and validator for hvisor-tool's daemon configuration, `virtio_cfg.json`.
//!
//! This is the file `hvisor virtio start virtio_cfg.json` takes, read unchanged (format in
//! hvisor-abi.md 4.3). Everything is checked here, before any zone RAM is mapped or any
//! device is created: the C daemon discovers many of these mistakes only halfway through
//! start-up, or never (an MMIO window inside RAM is silently never trapped).
//!
//! Numbers follow hvisor-tool's `json_parse.c` so that existing files keep their meaning: a
//! JSON number, or a string read like C `strtoumax(s, &end, 0)`, where `"010"` is octal 8.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::file_kind::describe;

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

const SUPPORTED_TYPES: &str = "blk, net, console, rng";

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
}

impl DeviceKind {
    /// The JSON `type` of the device.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Blk { .. } => "blk",
            DeviceKind::Net { .. } => "net",
            DeviceKind::Console { .. } => "console",
            DeviceKind::Rng { .. } => "rng",
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

fn parse_zone(value: &Value, index: usize, ctx: Ctx) -> Result<ZoneConfig, ConfigError> {
    let ctx = ctx.in_zone(index, None);
    let zone = object(value, || ctx.whole())?;
    let id = unsigned(required(zone, "id", ctx)?, u32::MAX, || ctx.field("id"))?;
    if id >= MAX_ZONES {
        return Err(ConfigError::ZoneIdTooLarge {
            at: ctx.field("id"),
            id,
        });
    }
    let ctx = ctx.in_zone(index, Some(id));

    let regions = array(required(zone, "memory_region", ctx)?, || {
        ctx.field("memory_region")
    })?;
    if regions.is_empty() {
        return Err(ConfigError::NoMemoryRegions {
            at: ctx.field("memory_region"),
        });
    }
    if regions.len() > MAX_MEMORY_REGIONS {
        return Err(ConfigError::TooManyMemoryRegions {
            at: ctx.field("memory_region"),
            count: regions.len(),
        });
    }
    let memory_regions = regions
        .iter()
        .enumerate()
        .map(|(i, region)| parse_region(region, ctx.in_entry(Entry::MemoryRegion(i))))
        .collect::<Result<Vec<_>, _>>()?;

    // hvisor-tool treats a missing "devices" key as no devices (its examples have such
    // zones), so only a present key of the wrong type is an error.
    let entries = match zone.get("devices") {
        Some(value) => array(value, || ctx.field("devices"))?.as_slice(),
        None => &[],
    };
    let mut devices = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if let Some(device) = parse_device(entry, i, ctx.in_entry(Entry::Device(i)))? {
            devices.push(device);
        }
    }

    Ok(ZoneConfig {
        id,
        memory_regions,
        devices,
    })
}

fn parse_region(value: &Value, ctx: Ctx) -> Result<MemoryRegion, ConfigError> {
    let region = object(value, || ctx.whole())?;
    let zone0_ipa = u64_field(region, "zone0_ipa", ctx)?;
    let zonex_ipa = u64_field(region, "zonex_ipa", ctx)?;
    let size = u64_field(region, "size", ctx)?;

    if zone0_ipa == 0 {
        return Err(ConfigError::ZeroZone0Ipa {
            at: ctx.field("zone0_ipa"),
        });
    }
    // Both addresses end up as page-granular mappings: zone0_ipa is the mmap offset, and
    // zonex_ipa is where the hypervisor maps the same pages into the zone.
    for (name, value) in [("zone0_ipa", zone0_ipa), ("zonex_ipa", zonex_ipa)] {
        page_aligned(value, ctx, name)?;
    }
    if size == 0 {
        return Err(ConfigError::Zero {
            at: ctx.field("size"),
        });
    }
    page_aligned(size, ctx, "size")?;
    for (name, base) in [("zone0_ipa", zone0_ipa), ("zonex_ipa", zonex_ipa)] {
        end_fits((name, base), ("size", size), ctx)?;
    }

    Ok(MemoryRegion {
        zone0_ipa,
        zonex_ipa,
        size,
    })
}

#[derive(Clone, Copy)]
enum KindTag {
    Blk,
    Net,
    Console,
    Rng,
}

/// Returns `None` for a disabled device.
fn parse_device(
    value: &Value,
    index: usize,
    ctx: Ctx,
) -> Result<Option<DeviceConfig>, ConfigError> {
    let device = object(value, || ctx.whole())?;
    let status = string_field(device, "status", ctx)?;
    let type_name = string_field(device, "type", ctx)?;
    // hvisor-tool skips a disabled entry before reading anything else, so disabled devices
    // of types we do not implement (gpu, scmi) must not make the file fail.
    if status == "disable" {
        return Ok(None);
    }
    let tag = match type_name {
        "blk" => KindTag::Blk,
        "net" => KindTag::Net,
        "console" => KindTag::Console,
        "rng" => KindTag::Rng,
        other => {
            return Err(ConfigError::UnknownType {
                at: ctx.field("type"),
                found: other.to_owned(),
            });
        }
    };

    let addr = u64_field(device, "addr", ctx)?;
    let len = u64_field(device, "len", ctx)?;
    let irq = unsigned(required(device, "irq", ctx)?, u32::MAX, || ctx.field("irq"))?;
    for (name, value) in [("addr", addr), ("len", len), ("irq", u64::from(irq))] {
        if value == 0 {
            return Err(ConfigError::Zero {
                at: ctx.field(name),
            });
        }
    }
    end_fits(("addr", addr), ("len", len), ctx)?;

    let kind = match tag {
        KindTag::Blk => parse_blk(device, ctx)?,
        KindTag::Net => parse_net(device, ctx)?,
        KindTag::Console => DeviceKind::Console {
            socket: optional_path(device, "socket", ctx)?,
            log: optional_path(device, "log", ctx)?,
        },
        KindTag::Rng => DeviceKind::Rng {
            source: optional_path(device, "source", ctx)?,
            rate_limit: device
                .get("rate_limit")
                .map(|value| unsigned(value, u64::MAX, || ctx.field("rate_limit")))
                .transpose()?,
        },
    };
    Ok(Some(DeviceConfig {
        index,
        addr,
        len,
        irq,
        kind,
    }))
}

fn parse_blk(device: &Map<String, Value>, ctx: Ctx) -> Result<DeviceKind, ConfigError> {
    let img = non_empty_string_field(device, "img", ctx)?;
    let readonly = match device.get("readonly") {
        Some(value) => value
            .as_bool()
            .ok_or_else(|| wrong_type(value, "true or false", ctx.field("readonly")))?,
        None => false,
    };
    let serial = match device.get("serial") {
        Some(value) => {
            let serial = string(value, || ctx.field("serial"))?;
            max_len(serial, MAX_SERIAL_LEN, ctx, "serial")?;
            serial.to_owned()
        }
        None => String::new(),
    };
    Ok(DeviceKind::Blk {
        img: PathBuf::from(img),
        readonly,
        serial,
    })
}

fn parse_net(device: &Map<String, Value>, ctx: Ctx) -> Result<DeviceKind, ConfigError> {
    let tap = non_empty_string_field(device, "tap", ctx)?;
    max_len(tap, MAX_TAP_NAME_LEN, ctx, "tap")?;
    let entries = array(required(device, "mac", ctx)?, || ctx.field("mac"))?;
    if entries.len() != 6 {
        return Err(ConfigError::MacLength {
            at: ctx.field("mac"),
            count: entries.len(),
        });
    }
    let mut mac = [0; 6];
    for (i, (byte, entry)) in mac.iter_mut().zip(entries).enumerate() {
        *byte = unsigned(entry, u8::MAX, || ctx.field(&format!("mac[{i}]")))?;
    }
    Ok(DeviceKind::Net {
        tap: tap.to_owned(),
        mac,
    })
}

/// Checks that need whole zones: overlaps and the global device limit.
fn validate(zones: &[ZoneConfig], ctx: Ctx) -> Result<(), ConfigError> {
    let mut enabled = 0;
    for (zone_index, zone) in zones.iter().enumerate() {
        let ctx = ctx.in_zone(zone_index, Some(zone.id));
        let ram: Vec<Span> = zone
            .memory_regions
            .iter()
            .map(|r| Span::new(r.zonex_ipa, r.size))
            .collect();

        // Guest addresses are translated by the first region that contains them, so an
        // overlap would silently shadow part of a later window.
        for (index, &window) in ram.iter().enumerate() {
            if let Some(other) = ram[..index].iter().position(|&o| o.overlaps(window)) {
                return Err(ConfigError::MemoryOverlap {
                    at: ctx.in_entry(Entry::MemoryRegion(index)).field("zonex_ipa"),
                    window,
                    other,
                    other_window: ram[other],
                });
            }
        }

        for (position, device) in zone.devices.iter().enumerate() {
            let ctx = ctx.in_entry(Entry::Device(device.index));
            enabled += 1;
            if enabled > MAX_DEVICES {
                return Err(ConfigError::TooManyDevices { at: ctx.whole() });
            }
            let window = Span::new(device.addr, device.len);
            // Requests are routed by address, so two windows sharing a byte would make one
            // device unreachable there.
            if let Some(other) = zone.devices[..position]
                .iter()
                .find(|o| Span::new(o.addr, o.len).overlaps(window))
            {
                return Err(ConfigError::DeviceOverlap {
                    at: ctx.field("addr"),
                    window,
                    other: other.index,
                    other_window: Span::new(other.addr, other.len),
                });
            }
            if let Some(region) = ram.iter().position(|&r| r.overlaps(window)) {
                return Err(ConfigError::DeviceInRam {
                    at: ctx.field("addr"),
                    window,
                    region,
                    region_window: ram[region],
                });
            }
        }
    }
    Ok(())
}

fn page_aligned(value: u64, ctx: Ctx, field: &str) -> Result<(), ConfigError> {
    if value % PAGE_SIZE == 0 {
        Ok(())
    } else {
        Err(ConfigError::Unaligned {
            at: ctx.field(field),
            value,
        })
    }
}

/// Checks that `base + len` fits in 64 bits; the error names the length field, because
/// that is what the window end is computed from.
fn end_fits(
    (base_field, base): (&'static str, u64),
    (len_field, len): (&str, u64),
    ctx: Ctx,
) -> Result<(), ConfigError> {
    match base.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(ConfigError::Overflow {
            at: ctx.field(len_field),
            base_field,
            base,
            len,
        }),
    }
}

fn max_len(text: &str, max: usize, ctx: Ctx, field: &str) -> Result<(), ConfigError> {
    if text.len() <= max {
        Ok(())
    } else {
        Err(ConfigError::TooLong {
            at: ctx.field(field),
            len: text.len(),
            max,
        })
    }
}

fn required<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<&'v Value, ConfigError> {
    object
        .get(key)
        .ok_or_else(|| ConfigError::Missing { at: ctx.field(key) })
}

fn object(
    value: &Value,
    at: impl FnOnce() -> Location,
) -> Result<&Map<String, Value>, ConfigError> {
    value
        .as_object()
        .ok_or_else(|| wrong_type(value, "an object", at()))
}

fn array(value: &Value, at: impl FnOnce() -> Location) -> Result<&Vec<Value>, ConfigError> {
    value
        .as_array()
        .ok_or_else(|| wrong_type(value, "an array", at()))
}

fn string(value: &Value, at: impl FnOnce() -> Location) -> Result<&str, ConfigError> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(value, "a string", at()))
}

fn string_field<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<&'v str, ConfigError> {
    string(required(object, key, ctx)?, || ctx.field(key))
}

fn non_empty_string_field<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<&'v str, ConfigError> {
    let text = string_field(object, key, ctx)?;
    if text.is_empty() {
        return Err(ConfigError::Empty { at: ctx.field(key) });
    }
    Ok(text)
}

/// An optional, non-empty string naming a file.
fn optional_path(
    object: &Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<Option<PathBuf>, ConfigError> {
    if !object.contains_key(key) {
        return Ok(None);
    }
    Ok(Some(PathBuf::from(non_empty_string_field(
        object, key, ctx,
    )?)))
}

fn u64_field(object: &Map<String, Value>, key: &str, ctx: Ctx) -> Result<u64, ConfigError> {
    unsigned(required(object, key, ctx)?, u64::MAX, || ctx.field(key))
}

fn wrong_type(value: &Value, expected: &'static str, at: Location) -> ConfigError {
    let found = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ConfigError::WrongType {
        at,
        expected,
        found,
    }
}

/// Reads a number the way `json_parse.c` does, then narrows it to `T`, whose largest value
/// `max` is only used for the message.
fn unsigned<T>(value: &Value, max: T, at: impl Fn() -> Location) -> Result<T, ConfigError>
where
    T: TryFrom<u64> + Into<u64>,
{
    let wide = match value {
        Value::Number(number) => number.as_u64().ok_or_else(|| ConfigError::Number {
            at: at(),
            text: number.to_string(),
            problem: if number.is_i64() {
                NumberProblem::Negative
            } else {
                NumberProblem::NotInteger
            },
        })?,
        Value::String(text) => parse_strtoumax(text).map_err(|problem| ConfigError::Number {
            at: at(),
            text: text.clone(),
            problem,
        })?,
        other => return Err(wrong_type(other, "a number or a numeric string", at())),
    };
    T::try_from(wide).map_err(|_| ConfigError::OutOfRange {
        at: at(),
        text: match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        },
        max: max.into(),
    })
}

/// C `strtoumax(text, &end, 0)` with hvisor-tool's checks: the whole string must be used.
/// Leading whitespace is accepted because strtoumax skips it; a sign is refused because
/// strtoumax would silently wrap "-1" to the largest value.
fn parse_strtoumax(text: &str) -> Result<u64, NumberProblem> {
    let text = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    if text.is_empty() {
        return Err(NumberProblem::Empty);
    }
    if text.starts_with(['+', '-']) {
        return Err(NumberProblem::Sign);
    }
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            if hex.is_empty() {
                return Err(NumberProblem::NoHexDigits);
            }
            (hex, 16)
        } else if let Some(octal) = text.strip_prefix('0').filter(|rest| !rest.is_empty()) {
            (octal, 8)
        } else {
            (text, 10)
        };
    // from_str_radix alone would accept a '+' here and says nothing about which character
    // is wrong.
    if let Some(digit) = digits.chars().find(|c| !c.is_digit(radix)) {
        return Err(NumberProblem::BadDigit { digit, radix });
    }
    u64::from_str_radix(digits, radix).map_err(|_| NumberProblem::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ORIGIN: &str = "test_cfg.json";

    fn parse_value(value: &Value) -> Result<VirtioConfig, ConfigError> {
        VirtioConfig::parse(&value.to_string(), Path::new(ORIGIN))
    }

    /// Two zones, two RAM windows in zone 1, one device of each type.
    fn base() -> Value {
        json!({
            "zones": [
                {
                    "id": 1,
                    "memory_region": [
                        { "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x30000000" },
                        { "zone0_ipa": "0x90000000", "zonex_ipa": "0x90000000", "size": "0x1000000" }
                    ],
                    "devices": [
                        { "type": "blk", "addr": "0xa003c00", "len": "0x200", "irq": 78,
                          "img": "rootfs.ext4", "status": "enable" },
                        { "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
                          "status": "enable" },
                        { "type": "net", "addr": "0xa003600", "len": "0x200", "irq": 75,
                          "tap": "tap0", "mac": ["0x00", "0x16", "0x3e", "0x10", "0x10", "0x10"],
                          "status": "enable" }
                    ]
                },
                {
                    "id": 2,
                    "memory_region": [
                        { "zone0_ipa": "0x60000000", "zonex_ipa": "0x0", "size": "0x10000000" }
                    ],
                    "devices": [
                        { "type": "rng", "addr": "0x10000000", "len": "0x1000", "irq": 33,
                          "status": "enable" }
                    ]
                }
            ]
        })
    }

    /// Replaces the value at `pointer`, adding the key if its parent object lacks it.
    fn set(config: &mut Value, pointer: &str, value: Value) {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        match config.pointer_mut(parent) {
            Some(Value::Object(object)) => {
                object.insert(key.to_owned(), value);
            }
            Some(Value::Array(array)) => array[key.parse::<usize>().unwrap()] = value,
            _ => panic!("no {parent} in the test config"),
        }
    }

    fn remove(config: &mut Value, pointer: &str, key: &str) {
        config
            .pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .and_then(|object| object.remove(key))
            .unwrap_or_else(|| panic!("no {pointer}/{key} in the test config"));
    }

    fn rng_at(addr: u64) -> Value {
        json!({ "type": "rng", "addr": addr, "len": 0x200, "irq": 40, "status": "enable" })
    }

    #[test]
    fn abi_example_parses() {
        let text = r#"{
          "zones": [
            {
              "id": 1,
              "memory_region": [
                { "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x30000000" }
              ],
              "devices": [
                { "type": "blk",     "addr": "0xa003c00", "len": "0x200", "irq": 78,
                  "img": "rootfs2.ext4", "status": "enable" },
                { "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
                  "status": "enable" },
                { "type": "net",     "addr": "0xa003600", "len": "0x200", "irq": 75,
                  "tap": "tap0", "mac": ["0x00","0x16","0x3e","0x10","0x10","0x10"],
                  "status": "disable" }
              ]
            }
          ]
        }"#;
        let config = VirtioConfig::parse(text, Path::new(ORIGIN)).unwrap();
        let expected = VirtioConfig {
            zones: vec![ZoneConfig {
                id: 1,
                memory_regions: vec![MemoryRegion {
                    zone0_ipa: 0x5000_0000,
                    zonex_ipa: 0x5000_0000,
                    size: 0x3000_0000,
                }],
                devices: vec![
                    DeviceConfig {
                        index: 0,
                        addr: 0xa00_3c00,
                        len: 0x200,
                        irq: 78,
                        kind: DeviceKind::Blk {
                            img: PathBuf::from("rootfs2.ext4"),
                            readonly: false,
                            serial: String::new(),
                        },
                    },
                    DeviceConfig {
                        index: 1,
                        addr: 0xa00_3800,
                        len: 0x200,
                        irq: 76,
                        kind: DeviceKind::Console {
                            socket: None,
                            log: None,
                        },
                    },
                ],
            }],
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn several_zones_windows_and_all_device_types() {
        let mut config = base();
        set(
            &mut config,
            "/zones/0/devices/0/readonly",
            Value::Bool(true),
        );
        set(&mut config, "/zones/0/devices/0/serial", json!("disk-0"));
        let config = parse_value(&config).unwrap();

        assert_eq!(config.zones.len(), 2);
        let zone = &config.zones[0];
        assert_eq!(zone.id, 1);
        assert_eq!(
            zone.memory_regions,
            vec![
                MemoryRegion {
                    zone0_ipa: 0x5000_0000,
                    zonex_ipa: 0x5000_0000,
                    size: 0x3000_0000
                },
                MemoryRegion {
                    zone0_ipa: 0x9000_0000,
                    zonex_ipa: 0x9000_0000,
                    size: 0x100_0000
                },
            ]
        );
        let kinds: Vec<&DeviceKind> = zone.devices.iter().map(|d| &d.kind).collect();
        assert_eq!(
            kinds,
            [
                &DeviceKind::Blk {
                    img: PathBuf::from("rootfs.ext4"),
                    readonly: true,
                    serial: "disk-0".to_owned(),
                },
                &DeviceKind::Console {
                    socket: None,
                    log: None,
                },
                &DeviceKind::Net {
                    tap: "tap0".to_owned(),
                    mac: [0x00, 0x16, 0x3e, 0x10, 0x10, 0x10],
                },
            ]
        );

        let zone = &config.zones[1];
        assert_eq!(zone.id, 2);
        assert_eq!(
            zone.memory_regions,
            [MemoryRegion {
                zone0_ipa: 0x6000_0000,
                zonex_ipa: 0,
                size: 0x1000_0000
            }]
        );
        // The rng window starts exactly where the RAM window ends: adjacent, not overlapping.
        assert_eq!(
            zone.devices,
            [DeviceConfig {
                index: 0,
                addr: 0x1000_0000,
                len: 0x1000,
                irq: 33,
                kind: DeviceKind::Rng {
                    source: None,
                    rate_limit: None,
                },
            }]
        );
    }

    #[test]
    fn disabled_devices_are_skipped_but_keep_their_index() {
        let mut config = base();
        set(&mut config, "/zones/0/devices/0/status", json!("disable"));
        // Types we do not implement and missing fields are fine on a disabled device, as
        // in hvisor-tool.
        set(
            &mut config,
            "/zones/0/devices/1",
            json!({ "type": "gpu", "status": "disable", "width": 1280 }),
        );
        // Any status other than "disable" enables the device.
        set(&mut config, "/zones/0/devices/2/status", json!("on"));
        let config = parse_value(&config).unwrap();
        let devices = &config.zones[0].devices;
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].index, 2);
        assert!(matches!(devices[0].kind, DeviceKind::Net { .. }));
    }

    #[test]
    fn unknown_keys_are_ignored_and_devices_may_be_absent() {
        let mut config = base();
        set(&mut config, "/zones/0/name", json!("linux"));
        set(
            &mut config,
            "/zones/0/memory_region/0/type",
            json!("normal"),
        );
        set(&mut config, "/zones/0/devices/1/comment", json!([1, 2]));
        set(&mut config, "/version", json!(2));
        remove(&mut config, "/zones/1", "devices");
        let config = parse_value(&config).unwrap();
        assert_eq!(config.zones[0].devices.len(), 3);
        assert!(config.zones[1].devices.is_empty());
    }

    #[test]
    fn number_forms() {
        let cases: &[(Value, u64)] = &[
            (json!("0x10"), 16),
            (json!("0X1f"), 31),
            (json!("0xFF"), 255),
            (json!("16"), 16),
            (json!(16), 16),
            (json!("010"), 8),
            (json!("0777"), 511),
            (json!("0"), 0),
            (json!("00"), 0),
            (json!(" \t0x20"), 32),
            (json!("18446744073709551615"), u64::MAX),
            (json!("0xffffffffffffffff"), u64::MAX),
            (json!(u64::MAX), u64::MAX),
        ];
        for (value, expected) in cases {
            let parsed = unsigned(value, u64::MAX, || {
                Ctx {
                    file: Path::new(ORIGIN),
                    zone: None,
                    entry: None,
                }
                .whole()
            });
            assert_eq!(parsed.unwrap(), *expected, "{value}");
        }

        let mut config = base();
        set(&mut config, "/zones/0/devices/0/irq", json!("010"));
        set(&mut config, "/zones/0/devices/1/irq", json!("0x4c"));
        set(&mut config, "/zones/0/devices/2/irq", json!("75"));
        set(
            &mut config,
            "/zones/0/memory_region/1/size",
            json!(0x100_0000),
        );
        let config = parse_value(&config).unwrap();
        let irqs: Vec<u32> = config.zones[0].devices.iter().map(|d| d.irq).collect();
        assert_eq!(irqs, [8, 76, 75]);
        assert_eq!(config.zones[0].memory_regions[1].size, 0x100_0000);
    }

    #[test]
    fn number_errors_name_field_and_text() {
        let cases: &[(Value, NumberProblem)] = &[
            (json!(""), NumberProblem::Empty),
            (json!("   "), NumberProblem::Empty),
            (json!("-1"), NumberProblem::Sign),
            (json!("+1"), NumberProblem::Sign),
            (json!("0x"), NumberProblem::NoHexDigits),
            (
                json!("0x1g"),
                NumberProblem::BadDigit {
                    digit: 'g',
                    radix: 16,
                },
            ),
            (
                json!("08"),
                NumberProblem::BadDigit {
                    digit: '8',
                    radix: 8,
                },
            ),
            (
                json!("12abc"),
                NumberProblem::BadDigit {
                    digit: 'a',
                    radix: 10,
                },
            ),
            (
                json!("0x10 "),
                NumberProblem::BadDigit {
                    digit: ' ',
                    radix: 16,
                },
            ),
            (
                json!("0x+1"),
                NumberProblem::BadDigit {
                    digit: '+',
                    radix: 16,
                },
            ),
            (json!("0x10000000000000000"), NumberProblem::Overflow),
            (json!("18446744073709551616"), NumberProblem::Overflow),
            (json!(-1), NumberProblem::Negative),
            (json!(1.5), NumberProblem::NotInteger),
            (json!(1e3), NumberProblem::NotInteger),
        ];
        for (value, problem) in cases {
            let mut config = base();
            set(&mut config, "/zones/0/devices/1/addr", value.clone());
            let error = parse_value(&config).unwrap_err();
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            match &error {
                ConfigError::Number {
                    text: got_text,
                    problem: got_problem,
                    ..
                } => {
                    assert_eq!(got_problem, problem, "{value}");
                    assert_eq!(got_text, &text);
                }
                other => panic!("{value}: unexpected error {other:?}"),
            }
            let message = error.to_string();
            assert!(
                message.starts_with(
                    "test_cfg.json: zones[0] (zone id 1), devices[1], field \"addr\": "
                ),
                "{message}"
            );
            assert!(message.contains(&format!("{text:?}")), "{message}");
        }
    }

    #[test]
    fn octal_hint_in_message() {
        let mut config = base();
        set(&mut config, "/zones/0/devices/0/irq", json!("09"));
        let message = parse_value(&config).unwrap_err().to_string();
        assert!(message.contains("octal"), "{message}");
    }

    type Edit = fn(&mut Value);
    type Check = fn(&ConfigError) -> bool;

    /// One case per validation rule: the edit that breaks the base config, what the
    /// message must contain, and the variant expected.
    fn validation_cases() -> Vec<(&'static str, Edit, Vec<&'static str>, Check)> {
        vec![
            (
                "top level not an object",
                |c| *c = json!([]),
                vec!["expected an object, found an array"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "zones missing",
                |c| *c = json!({ "zone": [] }),
                vec!["field \"zones\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "zones not an array",
                |c| set(c, "/zones", json!({})),
                vec!["field \"zones\"", "expected an array, found an object"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "zones empty",
                |c| set(c, "/zones", json!([])),
                vec!["field \"zones\"", "empty"],
                |e| matches!(e, ConfigError::NoZones { .. }),
            ),
            (
                "too many zones",
                |c| {
                    let ram = json!({ "zone0_ipa": "0x1000", "zonex_ipa": "0", "size": "0x1000" });
                    let zones: Vec<Value> = (0..33)
                        .map(|id| json!({ "id": id, "memory_region": [ram.clone()] }))
                        .collect();
                    set(c, "/zones", Value::Array(zones));
                },
                vec!["field \"zones\"", "33 zones"],
                |e| matches!(e, ConfigError::TooManyZones { count: 33, .. }),
            ),
            (
                "zone not an object",
                |c| set(c, "/zones/1", json!("zone2")),
                vec!["zones[1]:", "expected an object, found a string"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "zone id missing",
                |c| remove(c, "/zones/1", "id"),
                vec!["zones[1], field \"id\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "zone id too large",
                |c| set(c, "/zones/1/id", json!(32)),
                vec!["zones[1], field \"id\"", "32"],
                |e| matches!(e, ConfigError::ZoneIdTooLarge { id: 32, .. }),
            ),
            (
                "zone id beyond u32",
                |c| set(c, "/zones/1/id", json!("0x100000000")),
                vec!["zones[1], field \"id\"", "0x100000000", "out of range"],
                |e| {
                    matches!(
                        e,
                        ConfigError::OutOfRange {
                            max: 0xffff_ffff,
                            ..
                        }
                    )
                },
            ),
            (
                "duplicate zone id",
                |c| set(c, "/zones/1/id", json!("0x1")),
                vec!["zones[1] (zone id 1), field \"id\"", "zones[0]"],
                |e| {
                    matches!(
                        e,
                        ConfigError::DuplicateZoneId {
                            id: 1,
                            first: 0,
                            ..
                        }
                    )
                },
            ),
            (
                "memory_region missing",
                |c| remove(c, "/zones/1", "memory_region"),
                vec!["zones[1] (zone id 2), field \"memory_region\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "memory_region empty",
                |c| set(c, "/zones/1/memory_region", json!([])),
                vec!["zones[1] (zone id 2), field \"memory_region\""],
                |e| matches!(e, ConfigError::NoMemoryRegions { .. }),
            ),
            (
                "too many memory regions",
                |c| {
                    let regions: Vec<Value> = (1..=65u64)
                        .map(
                            |i| json!({ "zone0_ipa": i << 20, "zonex_ipa": i << 20, "size": 4096 }),
                        )
                        .collect();
                    set(c, "/zones/1/memory_region", Value::Array(regions));
                },
                vec!["zones[1] (zone id 2), field \"memory_region\"", "65"],
                |e| matches!(e, ConfigError::TooManyMemoryRegions { count: 65, .. }),
            ),
            (
                "memory region field missing",
                |c| remove(c, "/zones/0/memory_region/1", "zonex_ipa"),
                vec!["memory_region[1], field \"zonex_ipa\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "zone0_ipa zero",
                |c| set(c, "/zones/0/memory_region/1/zone0_ipa", json!("0")),
                vec![
                    "zones[0] (zone id 1), memory_region[1], field \"zone0_ipa\"",
                    "request ring page",
                ],
                |e| matches!(e, ConfigError::ZeroZone0Ipa { .. }),
            ),
            (
                "zone0_ipa unaligned",
                |c| set(c, "/zones/0/memory_region/1/zone0_ipa", json!("0x90000800")),
                vec!["memory_region[1], field \"zone0_ipa\"", "0x90000800"],
                |e| {
                    matches!(
                        e,
                        ConfigError::Unaligned {
                            value: 0x9000_0800,
                            ..
                        }
                    )
                },
            ),
            (
                "zonex_ipa unaligned",
                |c| set(c, "/zones/1/memory_region/0/zonex_ipa", json!("0x10")),
                vec!["zones[1] (zone id 2), memory_region[0], field \"zonex_ipa\""],
                |e| matches!(e, ConfigError::Unaligned { value: 0x10, .. }),
            ),
            (
                "size zero",
                |c| set(c, "/zones/0/memory_region/0/size", json!(0)),
                vec!["memory_region[0], field \"size\"", "must not be 0"],
                |e| matches!(e, ConfigError::Zero { .. }),
            ),
            (
                "size not a page multiple",
                |c| set(c, "/zones/0/memory_region/0/size", json!("0x1800")),
                vec!["memory_region[0], field \"size\"", "0x1800"],
                |e| matches!(e, ConfigError::Unaligned { value: 0x1800, .. }),
            ),
            (
                "zone0_ipa + size overflows",
                |c| {
                    set(
                        c,
                        "/zones/0/memory_region/1/zone0_ipa",
                        json!("0xfffffffffffff000"),
                    )
                },
                vec![
                    "memory_region[1], field \"size\"",
                    "zone0_ipa 0xfffffffffffff000 + 0x1000000",
                ],
                |e| matches!(e, ConfigError::Overflow { .. }),
            ),
            (
                "zonex_ipa + size overflows",
                |c| {
                    set(
                        c,
                        "/zones/0/memory_region/1/zonex_ipa",
                        json!("0xfffffffffffff000"),
                    )
                },
                vec![
                    "memory_region[1], field \"size\"",
                    "zonex_ipa 0xfffffffffffff000",
                ],
                |e| matches!(e, ConfigError::Overflow { .. }),
            ),
            (
                "memory regions overlap",
                |c| set(c, "/zones/0/memory_region/1/zonex_ipa", json!("0x7ffff000")),
                vec![
                    "zones[0] (zone id 1), memory_region[1], field \"zonex_ipa\"",
                    "memory_region[0]",
                ],
                |e| matches!(e, ConfigError::MemoryOverlap { other: 0, .. }),
            ),
            (
                "devices not an array",
                |c| set(c, "/zones/1/devices", json!({})),
                vec!["zones[1] (zone id 2), field \"devices\""],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "device not an object",
                |c| set(c, "/zones/1/devices/0", json!(7)),
                vec!["zones[1] (zone id 2), devices[0]:"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "type missing",
                |c| remove(c, "/zones/0/devices/1", "type"),
                vec![
                    "zones[0] (zone id 1), devices[1], field \"type\"",
                    "missing",
                ],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "type not a string",
                |c| set(c, "/zones/0/devices/1/type", json!(3)),
                vec!["devices[1], field \"type\"", "found a number"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "status missing",
                |c| remove(c, "/zones/0/devices/2", "status"),
                vec!["devices[2], field \"status\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "status not a string",
                |c| set(c, "/zones/0/devices/2/status", json!(false)),
                vec!["devices[2], field \"status\"", "found a boolean"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "unknown type",
                |c| set(c, "/zones/0/devices/1/type", json!("gpu")),
                vec!["devices[1], field \"type\"", "\"gpu\"", SUPPORTED_TYPES],
                |e| matches!(e, ConfigError::UnknownType { .. }),
            ),
            (
                "addr missing",
                |c| remove(c, "/zones/0/devices/1", "addr"),
                vec!["devices[1], field \"addr\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "addr not a number",
                |c| set(c, "/zones/0/devices/1/addr", json!(true)),
                vec!["devices[1], field \"addr\"", "found a boolean"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "addr zero",
                |c| set(c, "/zones/0/devices/0/addr", json!("0x0")),
                vec![
                    "zones[0] (zone id 1), devices[0], field \"addr\"",
                    "must not be 0",
                ],
                |e| matches!(e, ConfigError::Zero { .. }),
            ),
            (
                "len zero",
                |c| set(c, "/zones/0/devices/0/len", json!(0)),
                vec!["devices[0], field \"len\"", "must not be 0"],
                |e| matches!(e, ConfigError::Zero { .. }),
            ),
            (
                "irq zero",
                |c| set(c, "/zones/0/devices/0/irq", json!("00")),
                vec!["devices[0], field \"irq\"", "must not be 0"],
                |e| matches!(e, ConfigError::Zero { .. }),
            ),
            (
                "irq beyond u32",
                |c| set(c, "/zones/0/devices/0/irq", json!(0x1_0000_0000u64)),
                vec!["devices[0], field \"irq\"", "4294967296", "out of range"],
                |e| matches!(e, ConfigError::OutOfRange { .. }),
            ),
            (
                "addr + len overflows",
                |c| set(c, "/zones/0/devices/1/addr", json!("0xffffffffffffff00")),
                vec![
                    "devices[1], field \"len\"",
                    "addr 0xffffffffffffff00 + 0x200",
                ],
                |e| matches!(e, ConfigError::Overflow { .. }),
            ),
            (
                "device windows overlap",
                |c| set(c, "/zones/0/devices/1/addr", json!("0xa003d00")),
                vec![
                    "zones[0] (zone id 1), devices[1], field \"addr\"",
                    "devices[0]",
                ],
                |e| matches!(e, ConfigError::DeviceOverlap { other: 0, .. }),
            ),
            (
                "device window overlaps a later device",
                |c| set(c, "/zones/0/devices/2/addr", json!("0xa003700")),
                vec!["devices[2], field \"addr\"", "devices[1]"],
                |e| matches!(e, ConfigError::DeviceOverlap { other: 1, .. }),
            ),
            (
                "device window inside RAM",
                |c| set(c, "/zones/0/devices/2/addr", json!("0x90fffe00")),
                vec![
                    "zones[0] (zone id 1), devices[2], field \"addr\"",
                    "memory_region[1]",
                    "[0x90fffe00, 0x91000000)",
                ],
                |e| matches!(e, ConfigError::DeviceInRam { region: 1, .. }),
            ),
            (
                "device window straddles the end of RAM",
                |c| set(c, "/zones/1/devices/0/addr", json!("0xfffff00")),
                vec![
                    "zones[1] (zone id 2), devices[0], field \"addr\"",
                    "memory_region[0]",
                ],
                |e| matches!(e, ConfigError::DeviceInRam { region: 0, .. }),
            ),
            (
                "too many devices",
                |c| {
                    let devices: Vec<Value> = (0..6u64)
                        .map(|i| rng_at(0x2000_0000 + i * 0x1000))
                        .collect();
                    set(c, "/zones/1/devices", Value::Array(devices));
                },
                vec!["zones[1] (zone id 2), devices[5]:", "more than 8"],
                |e| matches!(e, ConfigError::TooManyDevices { .. }),
            ),
            (
                "mac missing",
                |c| remove(c, "/zones/0/devices/2", "mac"),
                vec!["devices[2], field \"mac\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "mac not an array",
                |c| set(c, "/zones/0/devices/2/mac", json!("00:16:3e:10:10:10")),
                vec!["devices[2], field \"mac\"", "expected an array"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "mac too short",
                |c| set(c, "/zones/0/devices/2/mac", json!([0, 1, 2, 3, 4])),
                vec!["devices[2], field \"mac\"", "found 5"],
                |e| matches!(e, ConfigError::MacLength { count: 5, .. }),
            ),
            (
                "mac too long",
                |c| set(c, "/zones/0/devices/2/mac", json!([0, 1, 2, 3, 4, 5, 6])),
                vec!["devices[2], field \"mac\"", "found 7"],
                |e| matches!(e, ConfigError::MacLength { count: 7, .. }),
            ),
            (
                "mac byte too large",
                |c| set(c, "/zones/0/devices/2/mac/3", json!("0x100")),
                vec!["devices[2], field \"mac[3]\"", "0x100", "255"],
                |e| matches!(e, ConfigError::OutOfRange { max: 255, .. }),
            ),
            (
                "mac byte malformed",
                |c| set(c, "/zones/0/devices/2/mac/0", json!("zz")),
                vec!["devices[2], field \"mac[0]\"", "\"zz\""],
                |e| matches!(e, ConfigError::Number { .. }),
            ),
            (
                "tap missing",
                |c| remove(c, "/zones/0/devices/2", "tap"),
                vec!["devices[2], field \"tap\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "tap empty",
                |c| set(c, "/zones/0/devices/2/tap", json!("")),
                vec!["devices[2], field \"tap\"", "empty"],
                |e| matches!(e, ConfigError::Empty { .. }),
            ),
            (
                "tap name too long",
                |c| set(c, "/zones/0/devices/2/tap", json!("tap-name-too-long")),
                vec!["devices[2], field \"tap\"", "17 bytes"],
                |e| {
                    matches!(
                        e,
                        ConfigError::TooLong {
                            len: 17,
                            max: 15,
                            ..
                        }
                    )
                },
            ),
            (
                "img missing",
                |c| remove(c, "/zones/0/devices/0", "img"),
                vec!["devices[0], field \"img\"", "missing"],
                |e| matches!(e, ConfigError::Missing { .. }),
            ),
            (
                "img empty",
                |c| set(c, "/zones/0/devices/0/img", json!("")),
                vec!["devices[0], field \"img\"", "empty"],
                |e| matches!(e, ConfigError::Empty { .. }),
            ),
            (
                "img not a string",
                |c| set(c, "/zones/0/devices/0/img", json!(["a.img"])),
                vec!["devices[0], field \"img\"", "expected a string"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "readonly not a boolean",
                |c| set(c, "/zones/0/devices/0/readonly", json!("yes")),
                vec!["devices[0], field \"readonly\"", "true or false"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "serial not a string",
                |c| set(c, "/zones/0/devices/0/serial", json!(42)),
                vec!["devices[0], field \"serial\"", "expected a string"],
                |e| matches!(e, ConfigError::WrongType { .. }),
            ),
            (
                "serial too long",
                |c| {
                    set(
                        c,
                        "/zones/0/devices/0/serial",
                        json!("123456789012345678901"),
                    )
                },
                vec!["devices[0], field \"serial\"", "21 bytes"],
                |e| {
                    matches!(
                        e,
                        ConfigError::TooLong {
                            len: 21,
                            max: 20,
                            ..
                        }
                    )
                },
            ),
        ]
    }

    #[test]
    fn base_config_is_valid() {
        parse_value(&base()).unwrap();
    }

    #[test]
    fn every_validation_rule_has_its_error() {
        for (name, edit, fragments, check) in validation_cases() {
            let mut config = base();
            edit(&mut config);
            let error = match parse_value(&config) {
                Ok(parsed) => panic!("{name}: accepted: {parsed:?}"),
                Err(error) => error,
            };
            assert!(check(&error), "{name}: unexpected error {error:?}");
            let message = error.to_string();
            assert!(!message.contains('\n'), "{name}: {message}");
            assert!(message.starts_with("test_cfg.json"), "{name}: {message}");
            for fragment in fragments {
                assert!(
                    message.contains(fragment),
                    "{name}: {message:?} lacks {fragment:?}"
                );
            }
        }
    }

    #[test]
    fn serial_of_exactly_twenty_bytes_and_eight_devices_are_accepted() {
        let mut config = base();
        set(
            &mut config,
            "/zones/0/devices/0/serial",
            json!("12345678901234567890"),
        );
        let devices: Vec<Value> = (0..5u64)
            .map(|i| rng_at(0x2000_0000 + i * 0x1000))
            .collect();
        set(&mut config, "/zones/1/devices", Value::Array(devices));
        let config = parse_value(&config).unwrap();
        let total: usize = config.zones.iter().map(|z| z.devices.len()).sum();
        assert_eq!(total, MAX_DEVICES);
    }

    #[test]
    fn disabled_devices_do_not_count_or_overlap() {
        let mut config = base();
        let mut devices: Vec<Value> = (0..5u64)
            .map(|i| rng_at(0x2000_0000 + i * 0x1000))
            .collect();
        // Same window as an enabled device, and a ninth device, but disabled.
        let mut ghost = rng_at(0x2000_0000);
        set(&mut ghost, "/status", json!("disable"));
        devices.push(ghost);
        set(&mut config, "/zones/1/devices", Value::Array(devices));
        let config = parse_value(&config).unwrap();
        assert_eq!(config.zones[1].devices.len(), 5);
    }

    #[test]
    fn same_addresses_in_different_zones_are_fine() {
        let mut config = base();
        set(&mut config, "/zones/1/devices/0/addr", json!("0xa003c00"));
        set(
            &mut config,
            "/zones/1/memory_region/0/zonex_ipa",
            json!("0x50000000"),
        );
        parse_value(&config).unwrap();
    }

    #[test]
    fn syntax_error_names_the_file_and_position() {
        let error = VirtioConfig::parse("{ \"zones\": [ }", Path::new(ORIGIN)).unwrap_err();
        assert!(matches!(error, ConfigError::Syntax { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.starts_with("test_cfg.json: not valid JSON"),
            "{message}"
        );
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn from_file_reads_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("virtio_cfg.json");
        fs::write(&path, base().to_string()).unwrap();
        let config = VirtioConfig::from_file(&path).unwrap();
        assert_eq!(config, parse_value(&base()).unwrap());

        let mut broken = base();
        set(&mut broken, "/zones/0/devices/0/irq", json!(0));
        fs::write(&path, broken.to_string()).unwrap();
        let message = VirtioConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("{}: zones[0]", path.display())),
            "{message}"
        );

        let missing = dir.path().join("absent.json");
        let error = VirtioConfig::from_file(&missing).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("absent.json"), "{error}");
    }
}
