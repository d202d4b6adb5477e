//! The zone's device tree, generated from the same JSON the daemon reads: RAM from
//! `memory_region`, one `virtio,mmio` node per enabled device.

use vm_fdt::{Error, FdtWriter};

use crate::config::Zone;

pub const GICD_BASE: u64 = 0x0800_0000;
pub const GICD_SIZE: u64 = 0x1_0000;
pub const GICR_BASE: u64 = 0x080a_0000;
/// Size of one vCPU's redistributor (RD and SGI frames); they follow each other from GICR_BASE.
pub const GICR_SIZE_PER_VCPU: u64 = 0x2_0000;
const GIC_PHANDLE: u32 = 1;
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// hvisor injects a virtio interrupt once per result (a list-register entry that is never
/// deasserted), which a guest sees as an edge; the stand-in pulses the line to match.
const IRQ_EDGE_RISING: u32 = 1;
const IRQ_LEVEL_HIGH: u32 = 4;

pub struct BootInfo<'a> {
    pub cmdline: &'a str,
    pub initrd: Option<(u64, u64)>,
}

pub fn build(zone: &Zone, boot: &BootInfo) -> Result<Vec<u8>, Error> {
    let mut f = FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_string("compatible", "linux,dummy-virt")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let cpus = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 1)?;
    f.property_u32("#size-cells", 0)?;
    // KVM gives vCPU n the MPIDR affinity n (Aff0 up to 15), which is what `reg` names.
    for index in 0..zone.cpus.len() as u32 {
        let cpu = f.begin_node(&format!("cpu@{index}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_string("compatible", "arm,arm-v8")?;
        f.property_string("enable-method", "psci")?;
        f.property_u32("reg", index)?;
        f.end_node(cpu)?;
    }
    f.end_node(cpus)?;

    for window in &zone.ram {
        let memory = f.begin_node(&format!("memory@{:x}", window.zonex_ipa))?;
        f.property_string("device_type", "memory")?;
        f.property_array_u64("reg", &[window.zonex_ipa, window.size])?;
        f.end_node(memory)?;
    }

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", boot.cmdline)?;
    if let Some((start, end)) = boot.initrd {
        f.property_u64("linux,initrd-start", start)?;
        f.property_u64("linux,initrd-end", end)?;
    }
    f.end_node(chosen)?;

    let gic = f.begin_node(&format!("intc@{GICD_BASE:x}"))?;
    f.property_string("compatible", "arm,gic-v3")?;
    f.property_null("interrupt-controller")?;
    f.property_u32("#interrupt-cells", 3)?;
    let redistributors = GICR_SIZE_PER_VCPU * zone.cpus.len() as u64;
    f.property_array_u64("reg", &[GICD_BASE, GICD_SIZE, GICR_BASE, redistributors])?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_null("ranges")?;
    f.property_array_u32("interrupts", &[GIC_PPI, 9, IRQ_LEVEL_HIGH])?;
    f.property_phandle(GIC_PHANDLE)?;
    f.end_node(gic)?;

    let timer = f.begin_node("timer")?;
    f.property_string("compatible", "arm,armv8-timer")?;
    f.property_null("always-on")?;
    let mut cells = Vec::new();
    for ppi in [13, 14, 11, 10] {
        cells.extend_from_slice(&[GIC_PPI, ppi, IRQ_LEVEL_HIGH]);
    }
    f.property_array_u32("interrupts", &cells)?;
    f.end_node(timer)?;

    let psci = f.begin_node("psci")?;
    f.property_string("compatible", "arm,psci-0.2")?;
    f.property_string("method", "hvc")?;
    f.end_node(psci)?;

    for device in &zone.devices {
        let node = f.begin_node(&format!("virtio_mmio@{:x}", device.addr))?;
        f.property_string("compatible", "virtio,mmio")?;
        f.property_array_u64("reg", &[device.addr, device.len])?;
        // The JSON holds the GIC INTID; an SPI's DT cell counts from INTID 32.
        f.property_array_u32("interrupts", &[GIC_SPI, device.irq - 32, IRQ_EDGE_RISING])?;
        f.property_null("dma-coherent")?;
        f.end_node(node)?;
    }

    f.end_node(root)?;
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Device, RamWindow};

    fn find(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn cpus_redistributors_and_virtio_nodes_follow_the_zone() {
        let zone = Zone {
            id: 1,
            ram: vec![RamWindow {
                zone0_ipa: 0x5000_0000,
                zonex_ipa: 0x4000_0000,
                size: 0x2000_0000,
            }],
            devices: vec![Device {
                kind: "blk".into(),
                addr: 0xa00_0200,
                len: 0x200,
                irq: 48,
            }],
            cpus: vec![4, 7],
        };
        let dtb = build(
            &zone,
            &BootInfo {
                cmdline: "quiet",
                initrd: None,
            },
        )
        .unwrap();
        assert!(find(&dtb, b"virtio_mmio@a000200\0"));
        assert!(find(&dtb, b"memory@40000000\0"));
        assert!(find(&dtb, b"cpu@1\0"));
        assert!(!find(&dtb, b"cpu@2\0"));
        // Two redistributors: reg = <0 GICD 0 GICD_SIZE 0 GICR 0 2*0x20000>.
        let gic_reg: Vec<u8> = [
            0,
            GICD_BASE as u32,
            0,
            GICD_SIZE as u32,
            0,
            GICR_BASE as u32,
            0,
            0x4_0000,
        ]
        .iter()
        .flat_map(|c: &u32| c.to_be_bytes())
        .collect();
        assert!(find(&dtb, &gic_reg));
        // reg = <0 0xa000200 0 0x200>, interrupts = <0 16 1>, big endian cells
        let reg: Vec<u8> = [0u32, 0xa00_0200, 0, 0x200]
            .iter()
            .flat_map(|c| c.to_be_bytes())
            .collect();
        assert!(find(&dtb, &reg));
        let irq: Vec<u8> = [0u32, 16, 1].iter().flat_map(|c| c.to_be_bytes()).collect();
        assert!(find(&dtb, &irq));
    }
}
