//! The rules a field's type does not express: alignment, sizes, overlaps and limits.

use super::*;

/// Checks that need whole zones: overlaps and the global device limit.
pub(super) fn validate(zones: &[ZoneConfig], ctx: Ctx) -> Result<(), ConfigError> {
    let mut enabled = 0;
    // Each external backend's socket, with where it was first named.
    let mut sockets: Vec<(&Path, String)> = Vec::new();
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
            if let DeviceKind::VhostUser(backend) = &device.kind {
                if let Some((_, first)) = sockets.iter().find(|(s, _)| *s == backend.socket) {
                    return Err(ConfigError::SharedSocket {
                        at: ctx.field("socket"),
                        socket: backend.socket.clone().into_boxed_path(),
                        other: first.clone(),
                    });
                }
                let entry = format!(
                    "zones[{zone_index}] (zone id {}), devices[{}]",
                    zone.id, device.index
                );
                sockets.push((&backend.socket, entry));
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

pub(super) fn page_aligned(value: u64, ctx: Ctx, field: &str) -> Result<(), ConfigError> {
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
pub(super) fn end_fits(
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

pub(super) fn max_len(text: &str, max: usize, ctx: Ctx, field: &str) -> Result<(), ConfigError> {
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
