//! The part of hvisor-tool's `virtio_cfg.json` the stand-in needs: each zone's RAM windows and
//! device windows, plus the physical CPU ids its vCPUs claim (from the command line). The daemon reads the same file with its own, much stricter parser; this
//! one only has to agree on the meaning of the fields it uses (hex strings or JSON numbers,
//! read like C `strtoumax(s, &end, 0)`, and `"status": "disable"` entries skipped).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use hvisor_bridge::abi::MAX_CPUS;
use serde_json::{Map, Value};

/// Most vCPUs the stand-in gives one zone.
pub const MAX_VCPUS: usize = 8;

/// One zone as the stand-in runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: u32,
    pub ram: Vec<RamWindow>,
    pub devices: Vec<Device>,
    /// Physical CPU id of each vCPU, in vCPU order (the first one boots): what hvisor puts in
    /// `src_cpu` and uses to index `cfg_flags`/`cfg_values`.
    pub cpus: Vec<u64>,
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

/// `--zone ID[:CPU,CPU...]`: a zone to run and, optionally, the physical CPU ids its vCPUs
/// claim (the first one boots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneChoice {
    pub id: u32,
    pub cpus: Option<Vec<u64>>,
}

impl FromStr for ZoneChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |what: &str| format!("--zone {text:?}: {what} (expected ID or ID:CPU,CPU...)");
        let (id, cpus) = match text.split_once(':') {
            Some((id, cpus)) => (id, Some(cpus)),
            None => (text, None),
        };
        let id = id.parse().map_err(|_| bad("the zone id is not a number"))?;
        let cpus = cpus
            .map(|list| {
                list.split(',')
                    .map(|cpu| {
                        cpu.parse()
                            .map_err(|_| bad(&format!("cpu {cpu:?} is not a number")))
                    })
                    .collect::<Result<Vec<u64>, String>>()
            })
            .transpose()?;
        Ok(ZoneChoice { id, cpus })
    }
}

/// Reads the zones to run: the `chosen` ones in that order, or every zone of the file. Each
/// vCPU gets a physical CPU id, the index into `cfg_flags`/`cfg_values` it puts in `src_cpu`:
/// the listed ones, else the lowest free ids from 1 (CPU 0 stays the root zone's, as on hvisor).
pub fn parse_zones(
    text: &str,
    origin: &Path,
    chosen: &[ZoneChoice],
) -> Result<Vec<Zone>, ConfigError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| error(origin, format!("not valid JSON: {e}")))?;
    let entries = root
        .get("zones")
        .and_then(Value::as_array)
        .ok_or_else(|| error(origin, "no \"zones\" array"))?;
    let mut zones = Vec::new();
    for (index, zone) in entries.iter().enumerate() {
        let zone = zone
            .as_object()
            .ok_or_else(|| error(origin, format!("zones[{index}] is not an object")))?;
        let id = number(zone, "id").map_err(|e| error(origin, format!("zones[{index}]: {e}")))?;
        let id = u32::try_from(id)
            .map_err(|_| error(origin, format!("zones[{index}]: id {id} too large")))?;
        zones.push((index, id, zone));
    }
    let selected: Vec<_> = if chosen.is_empty() {
        if zones.is_empty() {
            return Err(error(origin, "the zones array is empty"));
        }
        zones
            .iter()
            .map(|&(index, id, zone)| (index, id, zone, None))
            .collect()
    } else {
        let mut selected = Vec::new();
        for (n, choice) in chosen.iter().enumerate() {
            if chosen[..n].iter().any(|earlier| earlier.id == choice.id) {
                return Err(ConfigError(format!("--zone {} is given twice", choice.id)));
            }
            let &(index, id, zone) = zones
                .iter()
                .find(|(_, id, _)| *id == choice.id)
                .ok_or_else(|| error(origin, format!("no zone with id {}", choice.id)))?;
            selected.push((index, id, zone, choice.cpus.clone()));
        }
        selected
    };
    let mut parsed = Vec::new();
    for (index, id, zone, cpus) in selected {
        let at = |what: String| error(origin, format!("zones[{index}] (zone id {id}), {what}"));
        parsed.push((parse_zone_body(id, zone, at)?, cpus));
    }
    assign_cpus(parsed)
}

/// Gives every zone its CPU ids and checks they fit the bridge and are not shared.
fn assign_cpus(zones: Vec<(Zone, Option<Vec<u64>>)>) -> Result<Vec<Zone>, ConfigError> {
    let mut taken: Vec<(u64, u32)> = Vec::new();
    for (zone, cpus) in &zones {
        let Some(cpus) = cpus else { continue };
        if cpus.is_empty() || cpus.len() > MAX_VCPUS {
            return Err(ConfigError(format!(
                "--zone {}: {} vCPUs; the stand-in runs 1 to {MAX_VCPUS} per zone",
                zone.id,
                cpus.len()
            )));
        }
        for &cpu in cpus {
            if cpu as usize >= MAX_CPUS {
                return Err(ConfigError(format!(
                    "--zone {}: cpu {cpu} is beyond the bridge's {MAX_CPUS} cfg_flags/cfg_values \
                     entries",
                    zone.id
                )));
            }
            if let Some(&(_, owner)) = taken.iter().find(|(used, _)| *used == cpu) {
                return Err(ConfigError(format!(
                    "--zone {}: cpu {cpu} is already zone {owner}'s; each vCPU needs its own \
                     physical CPU id",
                    zone.id
                )));
            }
            taken.push((cpu, zone.id));
        }
    }
    let mut next_free = 1;
    let mut result = Vec::new();
    for (mut zone, cpus) in zones {
        zone.cpus = match cpus {
            Some(cpus) => cpus,
            None => {
                while taken.iter().any(|(used, _)| *used == next_free) {
                    next_free += 1;
                }
                if next_free as usize >= MAX_CPUS {
                    return Err(ConfigError(format!(
                        "zone {}: no free cpu id below {MAX_CPUS} left",
                        zone.id
                    )));
                }
                taken.push((next_free, zone.id));
                vec![next_free]
            }
        };
        result.push(zone);
    }
    Ok(result)
}

/// One zone's RAM windows and enabled devices; `at` prefixes errors with where they are.
fn parse_zone_body(
    id: u32,
    zone: &Map<String, Value>,
    at: impl Fn(String) -> ConfigError,
) -> Result<Zone, ConfigError> {
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
    Ok(Zone {
        id,
        ram,
        devices,
        cpus: Vec::new(),
    })
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

    const TWO_ZONES: &str = r#"{"zones":[
        {"id":1,"memory_region":[{"zone0_ipa":"0x50000000","zonex_ipa":"0x40000000","size":"0x10000000"}],
         "devices":[{"type":"blk","addr":"0xa000000","len":"0x200","irq":48}]},
        {"id":2,"memory_region":[{"zone0_ipa":"0x60000000","zonex_ipa":"0x40000000","size":"0x10000000"}],
         "devices":[{"type":"blk","addr":"0xa000000","len":"0x200","irq":52}]}]}"#;

    fn zones(text: &str, chosen: &[&str]) -> Result<Vec<Zone>, String> {
        let chosen = chosen
            .iter()
            .map(|c| c.parse())
            .collect::<Result<Vec<ZoneChoice>, String>>()?;
        parse_zones(text, Path::new("cfg.json"), &chosen).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_hex_octal_and_numbers_and_skips_disabled_devices() {
        let zone = zones(SAMPLE, &[]).unwrap().remove(0);
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
        let message = zones(SAMPLE, &["7"]).unwrap_err();
        assert_eq!(message, "cfg.json: no zone with id 7");
        let bad = SAMPLE.replace("\"0x30\"", "16");
        let message = zones(&bad, &[]).unwrap_err();
        assert!(message.contains("devices[0]: irq 16"), "{message}");
    }

    #[test]
    fn every_zone_runs_by_default_with_one_vcpu_each_from_cpu_1() {
        let all = zones(TWO_ZONES, &[]).unwrap();
        let ids: Vec<(u32, Vec<u64>)> = all.iter().map(|z| (z.id, z.cpus.clone())).collect();
        assert_eq!(ids, [(1, vec![1]), (2, vec![2])]);
        assert_eq!(all[1].ram[0].zone0_ipa, 0x6000_0000);
    }

    #[test]
    fn chosen_cpus_are_kept_and_the_others_get_the_next_free_ids() {
        let all = zones(TWO_ZONES, &["2", "1:1,3"]).unwrap();
        let ids: Vec<(u32, Vec<u64>)> = all.iter().map(|z| (z.id, z.cpus.clone())).collect();
        assert_eq!(ids, [(2, vec![2]), (1, vec![1, 3])]);
        assert_eq!(zones(TWO_ZONES, &["1:5"]).unwrap()[0].cpus, [5]);
    }

    #[test]
    fn shared_out_of_range_and_malformed_cpus_are_refused() {
        let cases: [(&[&str], &str); 6] = [
            (&["1:1,2", "2:2"], "cpu 2 is already zone 1's"),
            (&["1:32"], "cpu 32 is beyond the bridge's 32"),
            (&["1:1,2,3,4,5,6,7,8,9"], "9 vCPUs"),
            (&["1", "1"], "--zone 1 is given twice"),
            (&["1:x"], "cpu \"x\" is not a number"),
            (&["one"], "the zone id is not a number"),
        ];
        for (chosen, expected) in cases {
            let message = zones(TWO_ZONES, chosen).unwrap_err();
            assert!(message.contains(expected), "{chosen:?}: {message}");
        }
    }
}
