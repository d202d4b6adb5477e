//! The parser and validator against hand-written files: every rule has its error.

use super::parse::unsigned;
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

/// hvisor-tool's gpu entry (from its board examples), with no backend named.
fn gpu_entry() -> Value {
    json!({ "type": "gpu", "addr": "0xa003800", "len": "0x200", "irq": 76,
            "status": "enable", "width": 1280, "height": 800 })
}

/// hvisor-tool's scmi entry (from its board examples), with no backend named.
fn scmi_entry() -> Value {
    json!({ "type": "scmi", "addr": "0x10000000", "len": "0x1000", "irq": 33,
            "status": "enable", "clock_ids": [0, 1], "reset_ids": [2],
            "allowed_list": [{ "id": 0, "name": "uart" }] })
}

/// Replaces devices[1] of zone 1 (the console) by a vhost-user device at the same place.
fn vhost_user_at_1(config: &mut Value) {
    set(
        config,
        "/zones/0/devices/1",
        json!({ "type": "vhost-user", "addr": "0xa003800", "len": "0x200", "irq": 76,
                "status": "enable", "socket": "/run/vfsd.sock", "device_id": 26 }),
    );
}

/// [`vhost_user_at_1`] with `field` of the entry set to `value`.
fn vhost_user_with(config: &mut Value, field: &str, value: Value) {
    vhost_user_at_1(config);
    set(config, &format!("/zones/0/devices/1/{field}"), value);
}

/// [`vhost_user_at_1`] without `field` in the entry.
fn vhost_user_without(config: &mut Value, field: &str) {
    vhost_user_at_1(config);
    remove(config, "/zones/0/devices/1", field);
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
            message
                .starts_with("test_cfg.json: zones[0] (zone id 1), devices[1], field \"addr\": "),
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
                    .map(|i| json!({ "zone0_ipa": i << 20, "zonex_ipa": i << 20, "size": 4096 }))
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
                );
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
                );
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
            |c| set(c, "/zones/0/devices/1/type", json!("sound")),
            vec!["devices[1], field \"type\"", "\"sound\"", SUPPORTED_TYPES],
            |e| matches!(e, ConfigError::UnknownType { .. }),
        ),
        (
            "gpu without an external backend",
            |c| set(c, "/zones/0/devices/1", gpu_entry()),
            vec![
                "zones[0] (zone id 1), devices[1], field \"socket\"",
                "a \"gpu\" device needs an external vhost-user backend given by \"socket\"",
            ],
            |e| matches!(e, ConfigError::NeedsBackend { .. }),
        ),
        (
            "scmi without an external backend",
            |c| set(c, "/zones/1/devices/0", scmi_entry()),
            vec![
                "zones[1] (zone id 2), devices[0], field \"socket\"",
                "a \"scmi\" device needs an external vhost-user backend given by \"socket\"",
            ],
            |e| matches!(e, ConfigError::NeedsBackend { .. }),
        ),
        (
            "vhost-user without socket",
            |c| vhost_user_without(c, "socket"),
            vec!["devices[1], field \"socket\"", "missing"],
            |e| matches!(e, ConfigError::Missing { .. }),
        ),
        (
            "vhost-user socket empty",
            |c| vhost_user_with(c, "socket", json!("")),
            vec!["devices[1], field \"socket\"", "must not be empty"],
            |e| matches!(e, ConfigError::Empty { .. }),
        ),
        (
            "vhost-user without device_id",
            |c| vhost_user_without(c, "device_id"),
            vec!["devices[1], field \"device_id\"", "missing"],
            |e| matches!(e, ConfigError::Missing { .. }),
        ),
        (
            "vhost-user device_id 0",
            |c| vhost_user_with(c, "device_id", json!(0)),
            vec!["devices[1], field \"device_id\"", "must not be 0"],
            |e| matches!(e, ConfigError::Zero { .. }),
        ),
        (
            "vhost-user device_id too large",
            |c| vhost_user_with(c, "device_id", json!(1u64 << 32)),
            vec!["devices[1], field \"device_id\"", "out of range"],
            |e| matches!(e, ConfigError::OutOfRange { .. }),
        ),
        (
            "vhost-user queue_size not a power of two",
            |c| vhost_user_with(c, "queue_size", json!(100)),
            vec![
                "devices[1], field \"queue_size\"",
                "100 is not a power of two from 1 to 32768",
            ],
            |e| matches!(e, ConfigError::NotPowerOfTwo { .. }),
        ),
        (
            "vhost-user queue_size too large",
            |c| vhost_user_with(c, "queue_size", json!(65536)),
            vec!["devices[1], field \"queue_size\"", "out of range"],
            |e| matches!(e, ConfigError::OutOfRange { .. }),
        ),
        (
            "vhost-user num_queues 0",
            |c| vhost_user_with(c, "num_queues", json!(0)),
            vec!["devices[1], field \"num_queues\"", "must not be 0"],
            |e| matches!(e, ConfigError::Zero { .. }),
        ),
        (
            "vhost-user num_queues above the limit",
            |c| vhost_user_with(c, "num_queues", json!(65)),
            vec![
                "devices[1], field \"num_queues\"",
                "65 is out of range, the maximum is 64",
            ],
            |e| matches!(e, ConfigError::OutOfRange { .. }),
        ),
        (
            "a socket on a blk entry must be a string",
            |c| set(c, "/zones/0/devices/0/socket", json!(5)),
            vec![
                "devices[0], field \"socket\"",
                "expected a string, found a number",
            ],
            |e| matches!(e, ConfigError::WrongType { .. }),
        ),
        (
            "two devices on one backend socket",
            |c| {
                set(c, "/zones/0/devices/0/socket", json!("/run/b.sock"));
                set(c, "/zones/1/devices/0/socket", json!("/run/b.sock"));
            },
            vec![
                "zones[1] (zone id 2), devices[0], field \"socket\"",
                "socket /run/b.sock already serves zones[0] (zone id 1), devices[0]",
            ],
            |e| matches!(e, ConfigError::SharedSocket { .. }),
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
                );
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
fn external_backends_serve_vhost_user_entries_and_any_type_with_a_socket() {
    let mut config = base();
    vhost_user_at_1(&mut config);
    set(&mut config, "/zones/0/devices/1/queue_size", json!("0x100"));
    set(&mut config, "/zones/0/devices/1/num_queues", json!(2));
    // hvisor-tool's blk entry, served by an external backend: "img" is the backend's business.
    set(
        &mut config,
        "/zones/0/devices/0/socket",
        json!("/run/blk.sock"),
    );
    let mut gpu = gpu_entry();
    set(&mut gpu, "/socket", json!("/run/gpu.sock"));
    set(&mut gpu, "/addr", json!("0xa003400"));
    let mut scmi = scmi_entry();
    set(&mut scmi, "/socket", json!("/run/scmi.sock"));
    config["zones"][0]["devices"]
        .as_array_mut()
        .unwrap()
        .push(gpu);
    set(&mut config, "/zones/1/devices/0", scmi);
    let config = parse_value(&config).unwrap();
    let external = |zone: usize, device: usize| match &config.zones[zone].devices[device].kind {
        DeviceKind::VhostUser(backend) => backend.clone(),
        other => panic!("zone {zone} device {device}: {other:?}"),
    };
    assert_eq!(
        external(0, 1),
        ExternalBackend {
            type_name: "vhost-user",
            socket: "/run/vfsd.sock".into(),
            device_id: 26,
            queue_size: Some(256),
            num_queues: Some(2),
        }
    );
    let blk = external(0, 0);
    assert_eq!((blk.type_name, blk.device_id), ("blk", 2));
    assert_eq!(blk.socket, Path::new("/run/blk.sock"));
    assert_eq!((blk.queue_size, blk.num_queues), (None, None));
    assert_eq!(config.zones[0].devices[0].kind.name(), "blk");
    let gpu = external(0, 3);
    assert_eq!((gpu.type_name, gpu.device_id), ("gpu", 16));
    let scmi = external(1, 0);
    assert_eq!((scmi.type_name, scmi.device_id), ("scmi", 32));
    // A net entry with a socket is external too.
    let mut config = base();
    set(
        &mut config,
        "/zones/0/devices/2/socket",
        json!("/run/net.sock"),
    );
    remove(&mut config, "/zones/0/devices/2", "tap");
    let config = parse_value(&config).unwrap();
    assert!(matches!(
        &config.zones[0].devices[2].kind,
        DeviceKind::VhostUser(ExternalBackend { device_id: 1, .. })
    ));
}

/// A console's "socket" keeps its meaning: the built-in console serves that Unix socket.
#[test]
fn a_console_socket_is_the_console_endpoint() {
    let mut config = base();
    set(
        &mut config,
        "/zones/0/devices/1/socket",
        json!("/tmp/console.sock"),
    );
    let config = parse_value(&config).unwrap();
    assert_eq!(
        config.zones[0].devices[1].kind,
        DeviceKind::Console {
            socket: Some("/tmp/console.sock".into()),
            log: None,
        }
    );
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
