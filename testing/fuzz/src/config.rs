//! The `virtio_cfg.json` target: any text, parsed and validated as the daemon reads its
//! configuration. An accepted configuration must hold every promise `VirtioConfig` documents
//! (checked here independently of the validator); a refused one must say where in the file
//! the problem is.

use std::path::Path;

use hvisor_transport::config::{MAX_DEVICES, MAX_MEMORY_REGIONS, MAX_ZONES, VirtioConfig};

const FILE_NAME: &str = "fuzz-virtio_cfg.json";

fn overlaps((a, a_len): (u64, u64), (b, b_len): (u64, u64)) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

pub fn virtio_cfg(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let config = match VirtioConfig::parse(&text, Path::new(FILE_NAME)) {
        Ok(config) => config,
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.contains(FILE_NAME),
                "the error does not name the file: {message}"
            );
            return;
        }
    };
    assert!(!config.zones.is_empty() && config.zones.len() <= MAX_ZONES as usize);
    let mut devices = 0;
    for (index, zone) in config.zones.iter().enumerate() {
        assert!(zone.id < MAX_ZONES, "zone id {} accepted", zone.id);
        assert!(
            config.zones[..index]
                .iter()
                .all(|other| other.id != zone.id),
            "zone id {} accepted twice",
            zone.id
        );
        assert!(
            (1..=MAX_MEMORY_REGIONS).contains(&zone.memory_regions.len()),
            "zone {} has {} memory regions",
            zone.id,
            zone.memory_regions.len()
        );
        let ram: Vec<(u64, u64)> = zone
            .memory_regions
            .iter()
            .map(|region| (region.zonex_ipa, region.size))
            .collect();
        for (i, region) in zone.memory_regions.iter().enumerate() {
            for value in [region.zone0_ipa, region.zonex_ipa, region.size] {
                assert_eq!(
                    value % 4096,
                    0,
                    "unaligned memory region {region:?} accepted"
                );
            }
            assert!(region.size > 0, "empty memory region accepted");
            assert!(region.zonex_ipa.checked_add(region.size).is_some());
            assert!(region.zone0_ipa.checked_add(region.size).is_some());
            assert!(
                ram[..i].iter().all(|&other| !overlaps(other, ram[i])),
                "overlapping memory regions accepted: {ram:x?}"
            );
        }
        for (i, device) in zone.devices.iter().enumerate() {
            devices += 1;
            let window = (device.addr, device.len);
            assert!(device.len > 0, "empty device window accepted");
            assert!(device.addr.checked_add(device.len).is_some());
            assert!(
                zone.devices[..i]
                    .iter()
                    .all(|other| !overlaps((other.addr, other.len), window)),
                "overlapping device windows accepted"
            );
            assert!(
                ram.iter().all(|&region| !overlaps(region, window)),
                "a device window inside RAM accepted"
            );
        }
    }
    assert!(devices <= MAX_DEVICES, "{devices} devices accepted");
}
