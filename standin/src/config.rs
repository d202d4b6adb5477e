//! The part of hvisor-tool's `virtio_cfg.json` the stand-in needs: one zone's RAM windows and
//! its device windows. The daemon reads the same file with its own, much stricter parser; this
//! one only has to agree on the meaning of the fields it uses (hex strings or JSON numbers,
//! read like C `strtoumax(s, &end, 0)`, and `"status": "disable"` entries skipped).

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

/// One zone as the stand-in runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: u32,
    pub ram: Vec<RamWindow>,
    pub devices: Vec<Device>,
}

/// Zone RAM: the daemon maps it by `zone0_ipa`, the guest sees it at `zonex_ipa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamWindow {
    pub zone0_ipa: u64,
    pub zonex_ipa: u64,
    pub size: u64,
}

/// An enabled virtio-mmio device window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub kind: String,
    pub addr: u64,
    pub len: u64,
    /// GIC INTID as hvisor injects it (an SPI, so at least 32).
    pub irq: u32,
}

impl Device {
    pub fn contains(&self, address: u64) -> bool {
        address >= self.addr && address - self.addr < self.len
    }
}

#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn error(origin: &Path, text: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{}: {text}", origin.display()))
}

/// Reads zone `zone_id` (or the first zone when `None`) from the JSON text.
pub fn parse_zone(text: &str, origin: &Path, zone_id: Option<u32>) -> Result<Zone, ConfigError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| error(origin, format!("not valid JSON: {e}")))?;
    let zones = root
        .get("zones")
        .and_then(Value::as_array)
        .ok_or_else(|| error(origin, "no \"zones\" array"))?;
    let mut chosen = None;
    for (index, zone) in zones.iter().enumerate() {
        let zone = zone
            .as_object()
            .ok_or_else(|| error(origin, format!("zones[{index}] is not an object")))?;
        let id = number(zone, "id").map_err(|e| error(origin, format!("zones[{index}]: {e}")))?;
        let id = u32::try_from(id)
            .map_err(|_| error(origin, format!("zones[{index}]: id {id} too large")))?;
        if zone_id.is_none_or(|wanted| wanted == id) {
            chosen = Some((index, id, zone));
            break;
        }
    }
    let (index, id, zone) = chosen.ok_or_else(|| match zone_id {
        Some(wanted) => error(origin, format!("no zone with id {wanted}")),
        None => error(origin, "the zones array is empty"),
    })?;
    let at = |what: String| error(origin, format!("zones[{index}] (zone id {id}), {what}"));

    let mut ram = Vec::new();
    let regions = zone
        .get("memory_region")
        .and_then(Value::as_array)
        .ok_or_else(|| at("no \"memory_region\" array".into()))?;
    for (i, region) in regions.iter().enumerate() {
        let region = region
            .as_object()
            .ok_or_else(|| at(format!("memory_region[{i}] is not an object")))?;
        let field = |name| number(region, name).map_err(|e| at(format!("memory_region[{i}]: {e}")));
        ram.push(RamWindow {
            zone0_ipa: field("zone0_ipa")?,
            zonex_ipa: field("zonex_ipa")?,
            size: field("size")?,
        });
    }
    if ram.is_empty() {
        return Err(at("no memory regions".into()));
    }

    let mut devices = Vec::new();
    let entries = match zone.get("devices") {
        Some(value) => value
            .as_array()
            .ok_or_else(|| at("\"devices\" is not an array".into()))?
            .as_slice(),
        None => &[],
    };
    for (i, entry) in entries.iter().enumerate() {
        let entry = entry
            .as_object()
            .ok_or_else(|| at(format!("devices[{i}] is not an object")))?;
        if entry.get("status").and_then(Value::as_str) == Some("disable") {
            continue;
        }
        let field = |name| number(entry, name).map_err(|e| at(format!("devices[{i}]: {e}")));
        let irq = field("irq")?;
        let irq = u32::try_from(irq)
            .ok()
            .filter(|irq| *irq >= 32)
            .ok_or_else(|| {
                at(format!(
                    "devices[{i}]: irq {irq} is not a GIC SPI INTID (32 and up)"
                ))
            })?;
        devices.push(Device {
            kind: entry
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            addr: field("addr")?,
            len: field("len")?,
            irq,
        });
    }
    Ok(Zone { id, ram, devices })
}

/// A JSON number, or a string read as C `strtoumax(s, &end, 0)` reads it.
fn number(object: &Map<String, Value>, name: &str) -> Result<u64, String> {
    match object.get(name) {
        None => Err(format!("field \"{name}\" is missing")),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("field \"{name}\": {n} is not an unsigned integer")),
        Some(Value::String(s)) => parse_c_number(s.trim())
            .ok_or_else(|| format!("field \"{name}\": {s:?} is not a number")),
        Some(other) => Err(format!("field \"{name}\": unexpected {other}")),
    }
}

fn parse_c_number(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(&text[1..], 8).ok()
    } else {
        text.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"zones":[{"id":1,
        "memory_region":[{"zone0_ipa":"0x50000000","zonex_ipa":"0x40000000","size":"0x20000000"}],
        "devices":[
          {"type":"blk","addr":"0xa000000","len":"0x200","irq":"0x30","img":"x","status":"enable"},
          {"type":"rng","addr":"0xa000200","len":512,"irq":"061","status":"disable"},
          {"type":"rng","addr":"0xa000400","len":512,"irq":50,"status":"enable"}]}]}"#;

    #[test]
    fn reads_hex_octal_and_numbers_and_skips_disabled_devices() {
        let zone = parse_zone(SAMPLE, Path::new("cfg.json"), None).unwrap();
        assert_eq!(zone.id, 1);
        assert_eq!(
            zone.ram,
            [RamWindow {
                zone0_ipa: 0x5000_0000,
                zonex_ipa: 0x4000_0000,
                size: 0x2000_0000
            }]
        );
        assert_eq!(zone.devices.len(), 2);
        assert_eq!(zone.devices[0].irq, 48);
        assert_eq!(zone.devices[1].addr, 0xa00_0400);
        assert!(zone.devices[1].contains(0xa00_05ff));
        assert!(!zone.devices[1].contains(0xa00_0600));
        assert_eq!(parse_c_number("010"), Some(8));
    }

    #[test]
    fn missing_zone_and_bad_irq_are_named() {
        let message = parse_zone(SAMPLE, Path::new("cfg.json"), Some(7))
            .unwrap_err()
            .to_string();
        assert_eq!(message, "cfg.json: no zone with id 7");
        let bad = SAMPLE.replace("\"0x30\"", "16");
        let message = parse_zone(&bad, Path::new("cfg.json"), None)
            .unwrap_err()
            .to_string();
        assert!(message.contains("devices[0]: irq 16"), "{message}");
    }
}
