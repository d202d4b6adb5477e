//! The KVM half (aarch64 only): one vCPU, an in-kernel vGICv3, zone RAM from memfds, an
//! arm64 Linux `Image` booted with the generated device tree. Every MMIO exit inside a
//! virtio window becomes one request on the bridge, built and published as hvisor does it;
//! results from the daemon become SPI pulses.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hvisor_bridge::abi::QUEUE_NOTIFY_OFFSET;
use kvm_bindings::{
    KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI, KVM_ARM_VCPU_PSCI_0_2,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    kvm_userspace_memory_region, kvm_vcpu_init,
};
use kvm_ioctls::{DeviceFd, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::bridge::{Access, Bridge, wait_eventfd};
use crate::config::Zone;
use crate::fdt::{self, BootInfo, GICD_BASE, GICR_BASE};
use crate::handoff;

/// KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE: core register n is at +2n.
const CORE_REG_BASE: u64 = 0x6030_0000_0010_0000;
const REG_PC: u64 = CORE_REG_BASE + 2 * 32;
const REG_PSTATE: u64 = CORE_REG_BASE + 2 * 33;
/// EL1h with D, A, I and F masked: the state the arm64 boot protocol asks for.
const PSTATE_EL1H_DAIF: u64 = 0x3c5;
/// Interrupt lines the vGIC is created with (INTIDs 0..128: SGIs, PPIs, 96 SPIs).
const GIC_NR_IRQS: u32 = 128;
/// 16550 used only as `earlycon` (no DT node): THR writes are printed, LSR reads say "empty".
const UART_BASE: u64 = 0x0900_0000;
const UART_LSR: u64 = UART_BASE + 5;
const UART_LSR_THRE_TEMT: u8 = 0x60;
/// The physical CPU id our single vCPU claims to run on (index into cfg_flags/cfg_values).
const VCPU_CPU_ID: u64 = 0;

pub struct Boot {
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: String,
}

/// What the run did, printed at the end.
#[derive(Default)]
struct Stats {
    sync_reads: u64,
    sync_writes: u64,
    posted: u64,
    stray: u64,
    wait_nanos: u64,
}

pub type Error = Box<dyn std::error::Error>;

/// Zone RAM: one memfd per window, mapped here and handed to the daemon.
pub struct ZoneRam {
    pub files: Vec<File>,
    pub memory: GuestMemoryMmap,
}

pub fn create_ram(zone: &Zone) -> Result<ZoneRam, Error> {
    let mut files = Vec::new();
    let mut ranges = Vec::new();
    for (i, window) in zone.ram.iter().enumerate() {
        let file = crate::bridge::memfd(&format!("zone{}-ram{i}", zone.id), window.size)?;
        ranges.push((
            GuestAddress(window.zonex_ipa),
            window.size as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        ));
        files.push(file);
    }
    ranges.sort_by_key(|r| r.0);
    let memory = GuestMemoryMmap::from_ranges_with_files(ranges)?;
    Ok(ZoneRam { files, memory })
}

fn set_reg(vcpu: &VcpuFd, id: u64, value: u64) -> Result<(), Error> {
    vcpu.set_one_reg(id, &value.to_le_bytes())?;
    Ok(())
}

fn set_gic_attr(gic: &DeviceFd, group: u32, attr: u64, addr: u64) -> Result<(), Error> {
    let attribute = kvm_device_attr {
        group,
        attr,
        addr,
        flags: 0,
    };
    gic.set_device_attr(&attribute)?;
    Ok(())
}

fn create_vm(ram: &ZoneRam) -> Result<(VmFd, VcpuFd, DeviceFd), Error> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm()?;
    for (slot, region) in ram.memory.iter().enumerate() {
        let host = ram
            .memory
            .get_host_address(region.start_addr())
            .map_err(|e| format!("zone RAM: {e}"))?;
        let memslot = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live shared mapping of `memory_size` bytes owned by
        // `ram.memory`, which outlives the VM (both live until the process ends).
        unsafe { vm.set_user_memory_region(memslot)? };
    }
    let vcpu = vm.create_vcpu(0)?;
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&init)?;

    let mut request = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut request)
        .map_err(|e| format!("in-kernel vGICv3: {e} (L1 must run with gic-version=3)"))?;
    let dist = GICD_BASE;
    let redist = GICR_BASE;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
        &dist as *const u64 as u64,
    )?;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
        &redist as *const u64 as u64,
    )?;
    let nr_irqs = GIC_NR_IRQS;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        &nr_irqs as *const u32 as u64,
    )?;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
    )?;
    Ok((vm, vcpu, gic))
}

/// Loads the Image, initrd and DTB as the arm64 boot protocol wants them; returns the entry
/// point and the DTB address.
fn load_guest(zone: &Zone, ram: &ZoneRam, boot: &Boot) -> Result<(u64, u64), Error> {
    let window = zone
        .ram
        .iter()
        .min_by_key(|w| w.zonex_ipa)
        .expect("zone has RAM");
    let base = window.zonex_ipa;
    let image =
        std::fs::read(&boot.kernel).map_err(|e| format!("{}: {e}", boot.kernel.display()))?;
    if image.len() < 64 || &image[56..60] != b"ARMd" {
        return Err(format!("{}: not an arm64 Image", boot.kernel.display()).into());
    }
    let text_offset = u64::from_le_bytes(image[8..16].try_into().unwrap());
    let image_size = u64::from_le_bytes(image[16..24].try_into().unwrap());
    let entry = base + text_offset;
    ram.memory.write_slice(&image, GuestAddress(entry))?;

    const TWO_MIB: u64 = 2 << 20;
    let mut initrd = None;
    if let Some(path) = &boot.initrd {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Well past the kernel's own footprint (image_size covers its BSS).
        let start = base + (text_offset + image_size).next_multiple_of(TWO_MIB) + 8 * TWO_MIB;
        ram.memory.write_slice(&bytes, GuestAddress(start))?;
        initrd = Some((start, start + bytes.len() as u64));
    }
    let dtb = fdt::build(
        zone,
        &BootInfo {
            cmdline: &boot.cmdline,
            initrd,
        },
    )?;
    let dtb_addr = base + window.size - TWO_MIB;
    ram.memory.write_slice(&dtb, GuestAddress(dtb_addr))?;
    Ok((entry, dtb_addr))
}

fn spi_line(intid: u32) -> u32 {
    (KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | intid
}

/// Runs the zone until the guest powers off (PSCI SYSTEM_OFF). `daemon` is the hand-off
/// connection, watched so that a dead daemon ends the run instead of hanging the vCPU.
pub fn run(
    zone: Zone,
    ram: ZoneRam,
    bridge: Arc<Bridge>,
    finish: std::os::fd::OwnedFd,
    daemon: UnixStream,
    boot: &Boot,
) -> Result<(), Error> {
    let (vm, mut vcpu, _gic) = create_vm(&ram)?;
    let (entry, dtb_addr) = load_guest(&zone, &ram, boot)?;
    set_reg(&vcpu, REG_PC, entry)?;
    set_reg(&vcpu, REG_PSTATE, PSTATE_EL1H_DAIF)?;
    set_reg(&vcpu, CORE_REG_BASE, dtb_addr)?;
    for x in 1..4 {
        set_reg(&vcpu, CORE_REG_BASE + 2 * x, 0)?;
    }

    let vm = Arc::new(vm);
    let injected = Arc::new(AtomicU64::new(0));
    {
        // hvisor injects from the result ring when the daemon's FINISH_REQ hypercall
        // arrives; here the FINISH eventfd plays the hypercall.
        let (vm, bridge, injected, zone_id) =
            (vm.clone(), bridge.clone(), injected.clone(), zone.id);
        let known: Vec<u32> = zone.devices.iter().map(|d| d.irq).collect();
        std::thread::Builder::new()
            .name("inject".into())
            .spawn(move || {
                while wait_eventfd(&finish) {
                    bridge.drain_results(|result| {
                        if result.target_zone != zone_id || !known.contains(&result.irq_id) {
                            eprintln!(
                                "[standin] dropping result for zone {} irq {} (not ours)",
                                result.target_zone, result.irq_id
                            );
                            return;
                        }
                        // A rising edge latches the SPI pending in the vGIC whatever the
                        // guest is doing (even mid-handler: active+pending), so no result is
                        // lost; lowering at once leaves the next result its own edge.
                        let line = spi_line(result.irq_id);
                        vm.set_irq_line(line, true).expect("KVM_IRQ_LINE");
                        vm.set_irq_line(line, false).expect("KVM_IRQ_LINE");
                        injected.fetch_add(1, Ordering::Relaxed);
                    });
                }
                eprintln!(
                    "[standin] the FINISH eventfd failed; no more interrupts will be injected"
                );
            })?;
    }

    let started = Instant::now();
    let mut stats = Stats::default();
    let mut out = std::io::stdout().lock();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(address, data)) => {
                if address == UART_BASE {
                    out.write_all(data)?;
                    if data.contains(&b'\n') {
                        out.flush()?;
                    }
                } else if let Some(device) = zone.devices.iter().find(|d| d.contains(address)) {
                    let mut bytes = [0u8; 8];
                    bytes[..data.len()].copy_from_slice(data);
                    let access = Access {
                        cpu: VCPU_CPU_ID,
                        zone: zone.id,
                        address,
                        size: data.len() as u64,
                        value: u64::from_le_bytes(bytes),
                        is_write: true,
                        need_interrupt: address - device.addr == QUEUE_NOTIFY_OFFSET,
                    };
                    forward(&bridge, &daemon, &access, &mut stats)?;
                } else if !(UART_BASE..UART_BASE + 0x1000).contains(&address) {
                    stray(&mut stats, "write", address);
                }
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                data.fill(0);
                if address == UART_LSR {
                    data[0] = UART_LSR_THRE_TEMT;
                } else if let Some(device) = zone.devices.iter().find(|d| d.contains(address)) {
                    let access = Access {
                        cpu: VCPU_CPU_ID,
                        zone: zone.id,
                        address,
                        size: data.len() as u64,
                        value: 0,
                        is_write: false,
                        need_interrupt: address - device.addr == QUEUE_NOTIFY_OFFSET,
                    };
                    let value = forward(&bridge, &daemon, &access, &mut stats)?;
                    let len = data.len();
                    data.copy_from_slice(&value.to_le_bytes()[..len]);
                } else if !(UART_BASE..UART_BASE + 0x1000).contains(&address) {
                    stray(&mut stats, "read", address);
                }
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                out.flush()?;
                let exits = stats.sync_reads + stats.sync_writes;
                eprintln!(
                    "[standin] guest system event {kind} (power-off/reset) after {:.1} s: \
                     {} synchronous reads, {} synchronous writes, {} posted notifies, \
                     {} interrupts injected, {} stray accesses; mean synchronous answer wait {:.0} us",
                    started.elapsed().as_secs_f64(),
                    stats.sync_reads,
                    stats.sync_writes,
                    stats.posted,
                    injected.load(Ordering::Relaxed),
                    stats.stray,
                    stats.wait_nanos as f64 / 1000.0 / exits.max(1) as f64,
                );
                return Ok(());
            }
            Ok(other) => return Err(format!("unexpected vCPU exit {other:?}").into()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        }
    }
}

fn stray(stats: &mut Stats, what: &str, address: u64) {
    stats.stray += 1;
    if stats.stray <= 20 {
        eprintln!("[standin] MMIO {what} at {address:#x} outside every device window (ignored)");
    }
}

/// One trapped access through the bridge, as `mmio_virtio_handler` does it: note the CPU's
/// completion counter, publish, and for a synchronous access wait for the answer.
fn forward(
    bridge: &Bridge,
    daemon: &UnixStream,
    access: &Access,
    stats: &mut Stats,
) -> Result<u64, Error> {
    let before = bridge.cfg_flag(access.cpu);
    bridge.publish(access);
    if access.need_interrupt {
        stats.posted += 1;
        return Ok(0);
    }
    let waited = Instant::now();
    let value = bridge
        .wait_answer(access.cpu, before, || handoff::peer_alive(daemon))
        .map_err(|_| {
            format!(
                "the daemon closed the hypervisor socket while the vCPU waited for its answer \
                 to {} {:#x}",
                if access.is_write {
                    "a write to"
                } else {
                    "a read of"
                },
                access.address
            )
        })?;
    stats.wait_nanos += waited.elapsed().as_nanos() as u64;
    if access.is_write {
        stats.sync_writes += 1;
    } else {
        stats.sync_reads += 1;
    }
    Ok(value)
}
