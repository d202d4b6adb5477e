//! Reading zones, memory regions and devices field by field, with errors that name the field.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::validate::{end_fits, max_len, page_aligned};
use super::*;

pub(super) fn parse_zone(value: &Value, index: usize, ctx: Ctx) -> Result<ZoneConfig, ConfigError> {
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

pub(super) fn parse_region(value: &Value, ctx: Ctx) -> Result<MemoryRegion, ConfigError> {
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
    /// A type only an external vhost-user backend serves, with its virtio device id.
    ExternalOnly(u32),
    VhostUser,
}

impl KindTag {
    /// The virtio device id of a type (virtio 1.2, 5); `None` for `vhost-user`, whose entry
    /// gives it.
    fn device_id(self) -> Option<u32> {
        match self {
            KindTag::Net => Some(1),
            KindTag::Blk => Some(2),
            KindTag::Console => Some(3),
            KindTag::Rng => Some(4),
            KindTag::ExternalOnly(id) => Some(id),
            KindTag::VhostUser => None,
        }
    }
}

/// Returns `None` for a disabled device.
pub(super) fn parse_device(
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
    let (tag, type_name) = match type_name {
        "blk" => (KindTag::Blk, "blk"),
        "net" => (KindTag::Net, "net"),
        "console" => (KindTag::Console, "console"),
        "rng" => (KindTag::Rng, "rng"),
        "gpu" => (KindTag::ExternalOnly(16), "gpu"),
        "scmi" => (KindTag::ExternalOnly(32), "scmi"),
        "vhost-user" => (KindTag::VhostUser, "vhost-user"),
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

    // A console's "socket" is where the built-in console serves; any other type's names the
    // external backend that serves the device.
    let socket = match tag {
        KindTag::Console => None,
        _ => optional_path(device, "socket", ctx)?,
    };
    let kind = match (tag, socket) {
        (tag, Some(socket)) => parse_external(device, ctx, type_name, tag.device_id(), socket)?,
        (KindTag::VhostUser, None) => {
            return Err(ConfigError::Missing {
                at: ctx.field("socket"),
            });
        }
        (KindTag::ExternalOnly(_), None) => {
            return Err(ConfigError::NeedsBackend {
                at: ctx.field("socket"),
                type_name,
            });
        }
        (KindTag::Blk, None) => parse_blk(device, ctx)?,
        (KindTag::Net, None) => parse_net(device, ctx)?,
        (KindTag::Console, None) => DeviceKind::Console {
            socket: optional_path(device, "socket", ctx)?,
            log: optional_path(device, "log", ctx)?,
        },
        (KindTag::Rng, None) => DeviceKind::Rng {
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

/// A device of `type_name` served by the vhost-user backend at `socket`; `device_id` comes
/// from the type, or (for `vhost-user`) from the entry.
fn parse_external(
    device: &Map<String, Value>,
    ctx: Ctx,
    type_name: &'static str,
    device_id: Option<u32>,
    socket: PathBuf,
) -> Result<DeviceKind, ConfigError> {
    let device_id = match device_id {
        Some(id) => id,
        None => {
            let id = unsigned(required(device, "device_id", ctx)?, u32::MAX, || {
                ctx.field("device_id")
            })?;
            if id == 0 {
                // Device id 0 is reserved: virtio-mmio drivers take it for "no device here".
                return Err(ConfigError::Zero {
                    at: ctx.field("device_id"),
                });
            }
            id
        }
    };
    let queue_size = device
        .get("queue_size")
        .map(|value| {
            let size = unsigned(value, u16::MAX, || ctx.field("queue_size"))?;
            if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(ConfigError::NotPowerOfTwo {
                    at: ctx.field("queue_size"),
                    value: u64::from(size),
                    max: u64::from(MAX_QUEUE_SIZE),
                });
            }
            Ok(size)
        })
        .transpose()?;
    let num_queues = device
        .get("num_queues")
        .map(|value| {
            let count = unsigned(value, u16::MAX, || ctx.field("num_queues"))?;
            if count == 0 {
                return Err(ConfigError::Zero {
                    at: ctx.field("num_queues"),
                });
            }
            if count > MAX_REMOTE_QUEUES {
                return Err(ConfigError::OutOfRange {
                    at: ctx.field("num_queues"),
                    text: count.to_string(),
                    max: u64::from(MAX_REMOTE_QUEUES),
                });
            }
            Ok(count)
        })
        .transpose()?;
    Ok(DeviceKind::VhostUser(ExternalBackend {
        type_name,
        socket,
        device_id,
        queue_size,
        num_queues,
    }))
}

pub(super) fn parse_blk(device: &Map<String, Value>, ctx: Ctx) -> Result<DeviceKind, ConfigError> {
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

pub(super) fn parse_net(device: &Map<String, Value>, ctx: Ctx) -> Result<DeviceKind, ConfigError> {
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

pub(super) fn required<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<&'v Value, ConfigError> {
    object
        .get(key)
        .ok_or_else(|| ConfigError::Missing { at: ctx.field(key) })
}

pub(super) fn object(
    value: &Value,
    at: impl FnOnce() -> Location,
) -> Result<&Map<String, Value>, ConfigError> {
    value
        .as_object()
        .ok_or_else(|| wrong_type(value, "an object", at()))
}

pub(super) fn array(
    value: &Value,
    at: impl FnOnce() -> Location,
) -> Result<&Vec<Value>, ConfigError> {
    value
        .as_array()
        .ok_or_else(|| wrong_type(value, "an array", at()))
}

pub(super) fn string(value: &Value, at: impl FnOnce() -> Location) -> Result<&str, ConfigError> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(value, "a string", at()))
}

pub(super) fn string_field<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<&'v str, ConfigError> {
    string(required(object, key, ctx)?, || ctx.field(key))
}

pub(super) fn non_empty_string_field<'v>(
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
pub(super) fn optional_path(
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

pub(super) fn u64_field(
    object: &Map<String, Value>,
    key: &str,
    ctx: Ctx,
) -> Result<u64, ConfigError> {
    unsigned(required(object, key, ctx)?, u64::MAX, || ctx.field(key))
}

pub(super) fn wrong_type(value: &Value, expected: &'static str, at: Location) -> ConfigError {
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
pub(super) fn unsigned<T>(
    value: &Value,
    max: T,
    at: impl Fn() -> Location,
) -> Result<T, ConfigError>
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
pub(super) fn parse_strtoumax(text: &str) -> Result<u64, NumberProblem> {
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
