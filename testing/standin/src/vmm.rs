//! The KVM half (aarch64 only): one VM per zone with one thread per vCPU, an in-kernel vGICv3,
//! zone RAM from memfds, and an arm64 Linux `Image` booted with the generated device tree.
//! Every MMIO exit inside a virtio window becomes one request on the shared bridge, built and
//! published as hvisor does it, with the vCPU's physical CPU id as `src_cpu`; results from the
//! daemon become SPI pulses in the VM of their target zone.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hvisor_bridge::abi::QUEUE_NOTIFY_OFFSET;
use kvm_bindings::{
    KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
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
/// Sent to a vCPU thread to get it out of KVM_RUN when its zone ends.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;
/// Set by SIGTERM/SIGINT: end every zone, print what each vCPU did (and what it was waiting
/// for: the useful part when a guest hangs), and fail.
static TERMINATE: AtomicBool = AtomicBool::new(false);
/// Reports of one kind (stray accesses, unexpected answers) printed per vCPU before counting
/// silently.
const REPORTS_PER_KIND: u64 = 10;

pub struct Boot {
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    /// Kernel command line of every zone; `{zone}` stands for the zone's id.
    pub cmdline: String,
    /// How long a vCPU waits for a synchronous answer before the run fails (hvisor: forever).
    pub answer_timeout: Option<Duration>,
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

/// One zone's VM and what its vCPU threads share.
struct Machine {
    zone: Zone,
    vm: VmFd,
    _gic: DeviceFd,
    _ram: ZoneRam,
    /// The earlycon line being assembled; any vCPU may print.
    console: Mutex<Vec<u8>>,
    injected: AtomicU64,
    /// Set when the zone ends: a vCPU kicked out of KVM_RUN (or out of waiting for an answer)
    /// returns instead of going on.
    stopping: AtomicBool,
}

impl Machine {
    /// Prints the earlycon output line by line, each line marked with the zone and the time
    /// since the start (the zones' guest clocks are not comparable, this one is).
    fn print(&self, bytes: &[u8], started: Instant) -> std::io::Result<()> {
        let mut line = self
            .console
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &byte in bytes {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "[zone {} +{:.1}s] {}",
                self.zone.id,
                started.elapsed().as_secs_f64(),
                text.trim_end_matches('\r')
            )?;
            line.clear();
        }
        Ok(())
    }
}

/// What every vCPU thread shares.
struct Shared {
    bridge: Arc<Bridge>,
    /// The hand-off connection, watched so that a dead daemon ends the run instead of hanging
    /// a vCPU.
    daemon: UnixStream,
    started: Instant,
    answer_timeout: Option<Duration>,
}

/// One vCPU's physical CPU id, counters, and the last `cfg_flags[cpu]` value it saw.
struct VcpuRecord {
    zone: u32,
    cpu: u64,
    last_flag: u64,
    sync_reads: u64,
    sync_writes: u64,
    posted: u64,
    stray: u64,
    /// Moves of `cfg_flags[cpu]` that answered nothing this vCPU asked: an answer meant for
    /// another CPU or request (or a posted one answered).
    unexpected_answers: u64,
    wait_nanos: u64,
    /// The request whose answer the vCPU stopped waiting for (zone ending, error), and for
    /// how long it had waited: the answer may still arrive.
    gave_up_waiting: Option<String>,
}

impl VcpuRecord {
    fn new(zone: u32, cpu: u64, bridge: &Bridge) -> Self {
        VcpuRecord {
            zone,
            cpu,
            last_flag: bridge.cfg_flag(cpu),
            sync_reads: 0,
            sync_writes: 0,
            posted: 0,
            stray: 0,
            unexpected_answers: 0,
            wait_nanos: 0,
            gave_up_waiting: None,
        }
    }

    /// At the end the counter must be where our last answer left it, or one further when we
    /// stopped waiting for an answer.
    fn check_final_flag(&mut self, flag: u64) {
        if !(self.gave_up_waiting.is_some() && flag == self.last_flag.wrapping_add(1)) {
            self.check_idle_flag(flag);
        }
    }

    /// Between our requests nobody may touch our completion counter.
    fn check_idle_flag(&mut self, flag: u64) {
        if flag != self.last_flag {
            let last = self.last_flag;
            self.unexpected(format_args!(
                "moved from {last} to {flag} while this CPU had no request outstanding"
            ));
            self.last_flag = flag;
        }
    }

    /// One answer moves the counter by exactly one.
    fn check_answer(&mut self, before: u64, flag: u64, access: &Access) {
        if flag != before.wrapping_add(1) {
            self.unexpected(format_args!(
                "moved from {before} to {flag} for one {} {:#x}",
                if access.is_write {
                    "write to"
                } else {
                    "read of"
                },
                access.address
            ));
        }
        self.last_flag = flag;
    }

    fn unexpected(&mut self, what: std::fmt::Arguments) {
        self.unexpected_answers += 1;
        if self.unexpected_answers <= REPORTS_PER_KIND {
            eprintln!(
                "[standin] zone {} cpu {}: cfg_flags[{}] {what}: an answer that was not ours",
                self.zone, self.cpu, self.cpu
            );
        }
    }

    fn stray(&mut self, what: &str, address: u64) {
        self.stray += 1;
        if self.stray <= REPORTS_PER_KIND {
            eprintln!(
                "[standin] zone {} cpu {}: MMIO {what} at {address:#x} outside every device \
                 window (ignored)",
                self.zone, self.cpu
            );
        }
    }

    fn summary(&self) -> String {
        let answers = self.sync_reads + self.sync_writes;
        let abandoned = match &self.gave_up_waiting {
            Some(request) => format!("; stopped waiting for the answer to {request}"),
            None => String::new(),
        };
        format!(
            "zone {} cpu {}: {} synchronous reads, {} synchronous writes, {} posted notifies, \
             {} unexpected cfg_flags changes, {} stray accesses; mean answer wait {:.0} us{abandoned}",
            self.zone,
            self.cpu,
            self.sync_reads,
            self.sync_writes,
            self.posted,
            self.unexpected_answers,
            self.stray,
            self.wait_nanos as f64 / 1000.0 / answers.max(1) as f64,
        )
    }
}

/// How a vCPU thread ended without an error.
enum Ended {
    /// PSCI SYSTEM_OFF/RESET from the guest, with KVM's event type.
    SystemEvent(u32),
    /// Its zone ended through another vCPU.
    Stopped,
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

/// A VM with the zone's RAM, `vcpus` vCPUs (all but the first powered off until the guest
/// starts them with PSCI CPU_ON) and a vGICv3 with one redistributor per vCPU.
fn create_vm(
    kvm: &Kvm,
    ram: &ZoneRam,
    vcpus: usize,
) -> Result<(VmFd, Vec<VcpuFd>, DeviceFd), Error> {
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
        // `ram.memory`, which the Machine keeps as long as the VM.
        unsafe { vm.set_user_memory_region(memslot)? };
    }
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    let mut fds = Vec::new();
    for index in 0..vcpus {
        let vcpu = vm.create_vcpu(index as u64)?;
        let mut vcpu_init = init;
        if index > 0 {
            vcpu_init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.vcpu_init(&vcpu_init)?;
        fds.push(vcpu);
    }

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
        (&raw const dist) as u64,
    )?;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
        (&raw const redist) as u64,
    )?;
    let nr_irqs = GIC_NR_IRQS;
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        (&raw const nr_irqs) as u64,
    )?;
    // After every vCPU exists: the redistributors are laid out for the vCPUs present now.
    set_gic_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
    )?;
    Ok((vm, fds, gic))
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
    let cmdline = boot.cmdline.replace("{zone}", &zone.id.to_string());
    let dtb = fdt::build(
        zone,
        &BootInfo {
            cmdline: &cmdline,
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

extern "C" fn ignore_kick(_signal: libc::c_int) {}

extern "C" fn request_termination(_signal: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// Installs the signal handlers: a no-op one for KICK_SIGNAL (a signal with a handler makes
/// KVM_RUN return EINTR; the default action would end the process) and one that sets TERMINATE.
fn install_signal_handlers() -> Result<(), Error> {
    let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] = [
        (KICK_SIGNAL, ignore_kick),
        (libc::SIGTERM, request_termination),
        (libc::SIGINT, request_termination),
    ];
    for (signal, handler) in handlers {
        // SAFETY: an all-zero sigaction (empty mask, no flags) is valid once the handler is set.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        // SAFETY: both handlers only touch an atomic (or nothing): async-signal-safe.
        if unsafe { libc::sigaction(signal, &raw const action, std::ptr::null_mut()) } != 0 {
            return Err(format!("sigaction: {}", std::io::Error::last_os_error()).into());
        }
    }
    Ok(())
}

/// Runs every zone until its guest powers off (PSCI SYSTEM_OFF). A vCPU error (a dead daemon,
/// an unexpected exit) ends every zone and is returned.
pub fn run(
    zones: Vec<(Zone, ZoneRam)>,
    bridge: Arc<Bridge>,
    finish: std::os::fd::OwnedFd,
    daemon: UnixStream,
    boot: &Boot,
) -> Result<(), Error> {
    install_signal_handlers()?;
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut machines = Vec::new();
    let mut all_vcpus = Vec::new();
    for (zone, ram) in zones {
        let (vm, vcpus, gic) = create_vm(&kvm, &ram, zone.cpus.len())?;
        let (entry, dtb_addr) = load_guest(&zone, &ram, boot)?;
        let boot_vcpu = &vcpus[0];
        set_reg(boot_vcpu, REG_PC, entry)?;
        set_reg(boot_vcpu, REG_PSTATE, PSTATE_EL1H_DAIF)?;
        set_reg(boot_vcpu, CORE_REG_BASE, dtb_addr)?;
        for x in 1..4 {
            set_reg(boot_vcpu, CORE_REG_BASE + 2 * x, 0)?;
        }
        machines.push(Arc::new(Machine {
            zone,
            vm,
            _gic: gic,
            _ram: ram,
            console: Mutex::new(Vec::new()),
            injected: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }));
        all_vcpus.push(vcpus);
    }
    let shared = Arc::new(Shared {
        bridge,
        daemon,
        started: Instant::now(),
        answer_timeout: boot.answer_timeout,
    });
    let dropped = Arc::new(AtomicU64::new(0));
    spawn_injector(
        machines.clone(),
        shared.bridge.clone(),
        finish,
        dropped.clone(),
    )?;

    // Each vCPU thread reports its zone's index when it ends; the first report ends the zone.
    let (ended, ends) = mpsc::channel::<usize>();
    let mut threads = Vec::new();
    for (index, (machine, vcpus)) in machines.iter().zip(all_vcpus).enumerate() {
        let mut zone_threads = Vec::new();
        for (vcpu, &cpu) in vcpus.into_iter().zip(&machine.zone.cpus) {
            let (machine, shared, ended) = (machine.clone(), shared.clone(), ended.clone());
            let handle = std::thread::Builder::new()
                .name(format!("zone{}-cpu{cpu}", machine.zone.id))
                .spawn(move || {
                    let mut record = VcpuRecord::new(machine.zone.id, cpu, &shared.bridge);
                    let outcome = run_vcpu(&machine, vcpu, &shared, &mut record);
                    record.check_final_flag(shared.bridge.cfg_flag(cpu));
                    let _ = ended.send(index);
                    (record, outcome.map_err(|e| e.to_string()))
                })?;
            zone_threads.push(handle);
        }
        threads.push(zone_threads);
    }
    drop(ended);

    let mut failure = None;
    let mut running = machines.len();
    while running > 0 && failure.is_none() {
        let index = match ends.recv_timeout(Duration::from_millis(100)) {
            Ok(index) => index,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if TERMINATE.load(Ordering::SeqCst) {
                    failure = Some("terminated by a signal before every guest powered off".into());
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if threads[index].is_empty() {
            continue;
        }
        running -= 1;
        let handles = std::mem::take(&mut threads[index]);
        failure = end_zone(&machines[index], handles, &shared).err();
    }
    for (machine, handles) in machines.iter().zip(threads) {
        if !handles.is_empty() {
            let _ = end_zone(machine, handles, &shared);
        }
    }
    let injected: u64 = machines
        .iter()
        .map(|m| m.injected.load(Ordering::Relaxed))
        .sum();
    eprintln!(
        "[standin] result ring: {injected} interrupts injected, {} results dropped (not a \
         device interrupt of a running zone)",
        dropped.load(Ordering::Relaxed)
    );
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

/// Stops the zone's remaining vCPUs, prints what each did, and returns the first error.
fn end_zone(
    machine: &Machine,
    handles: Vec<JoinHandle<(VcpuRecord, Result<Ended, String>)>>,
    shared: &Shared,
) -> Result<(), String> {
    machine.stopping.store(true, Ordering::SeqCst);
    let mut first_error = None;
    let mut event = None;
    for handle in handles {
        // A signal sent just before the thread enters KVM_RUN is lost, hence the repetition.
        while !handle.is_finished() {
            // SAFETY: the handle is not joined yet, so its pthread_t names a live (or
            // finished but unjoined) thread; KICK_SIGNAL has a no-op handler.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), KICK_SIGNAL) };
            std::thread::sleep(Duration::from_millis(5));
        }
        let Ok((record, outcome)) = handle.join() else {
            first_error.get_or_insert(format!("zone {}: a vCPU thread panicked", machine.zone.id));
            continue;
        };
        eprintln!("[standin] {}", record.summary());
        match outcome {
            Ok(Ended::SystemEvent(kind)) => event = Some(kind),
            Ok(Ended::Stopped) => {}
            Err(error) => {
                first_error.get_or_insert(format!("zone {}: {error}", machine.zone.id));
            }
        }
    }
    eprintln!(
        "[standin] zone {}: {} after {:.1} s; {} interrupts injected",
        machine.zone.id,
        match event {
            Some(kind) => format!("guest system event {kind} (power-off/reset)"),
            None => "stopped".to_owned(),
        },
        shared.started.elapsed().as_secs_f64(),
        machine.injected.load(Ordering::Relaxed)
    );
    first_error.map_or(Ok(()), Err)
}

/// hvisor injects from the result ring when the daemon's FINISH_REQ hypercall arrives; here
/// the FINISH eventfd plays the hypercall. Results are routed by `target_zone`; one that names
/// no running zone, or an irq none of that zone's devices has, is dropped and counted.
fn spawn_injector(
    machines: Vec<Arc<Machine>>,
    bridge: Arc<Bridge>,
    finish: std::os::fd::OwnedFd,
    dropped: Arc<AtomicU64>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("inject".into())
        .spawn(move || {
            while wait_eventfd(&finish) {
                bridge.drain_results(|result| {
                    let target = machines.iter().find(|m| {
                        m.zone.id == result.target_zone
                            && m.zone.devices.iter().any(|d| d.irq == result.irq_id)
                    });
                    let Some(machine) = target else {
                        if dropped.fetch_add(1, Ordering::Relaxed) < REPORTS_PER_KIND {
                            eprintln!(
                                "[standin] dropping result for zone {} irq {} (not a device \
                                 interrupt of a running zone)",
                                result.target_zone, result.irq_id
                            );
                        }
                        return;
                    };
                    // A rising edge latches the SPI pending in the vGIC whatever the guest is
                    // doing (even mid-handler: active+pending), so no result is lost; lowering
                    // at once leaves the next result its own edge. The vGIC delivers it to the
                    // vCPU the guest routed the SPI to (Linux: its boot CPU, the zone's first,
                    // where hvisor's get_target_cpu sends it).
                    let line = spi_line(result.irq_id);
                    machine.vm.set_irq_line(line, true).expect("KVM_IRQ_LINE");
                    machine.vm.set_irq_line(line, false).expect("KVM_IRQ_LINE");
                    machine.injected.fetch_add(1, Ordering::Relaxed);
                });
            }
            eprintln!("[standin] the FINISH eventfd failed; no more interrupts will be injected");
        })?;
    Ok(())
}

/// One vCPU's exit loop: UART output, device accesses through the bridge, power-off.
fn run_vcpu(
    machine: &Machine,
    mut vcpu: VcpuFd,
    shared: &Shared,
    record: &mut VcpuRecord,
) -> Result<Ended, Error> {
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if machine.stopping.load(Ordering::SeqCst) {
                    return Ok(Ended::Stopped);
                }
                continue;
            }
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        };
        match exit {
            VcpuExit::MmioWrite(address, data) => {
                if address == UART_BASE {
                    machine.print(data, shared.started)?;
                } else if let Some(device) =
                    machine.zone.devices.iter().find(|d| d.contains(address))
                {
                    let mut bytes = [0u8; 8];
                    bytes[..data.len()].copy_from_slice(data);
                    let access = Access {
                        cpu: record.cpu,
                        zone: machine.zone.id,
                        address,
                        size: data.len() as u64,
                        value: u64::from_le_bytes(bytes),
                        is_write: true,
                        need_interrupt: address - device.addr == QUEUE_NOTIFY_OFFSET,
                    };
                    if forward(machine, shared, &access, record)?.is_none() {
                        return Ok(Ended::Stopped);
                    }
                } else if !(UART_BASE..UART_BASE + 0x1000).contains(&address) {
                    record.stray("write", address);
                }
            }
            VcpuExit::MmioRead(address, data) => {
                data.fill(0);
                if address == UART_LSR {
                    data[0] = UART_LSR_THRE_TEMT;
                } else if let Some(device) =
                    machine.zone.devices.iter().find(|d| d.contains(address))
                {
                    let access = Access {
                        cpu: record.cpu,
                        zone: machine.zone.id,
                        address,
                        size: data.len() as u64,
                        value: 0,
                        is_write: false,
                        need_interrupt: address - device.addr == QUEUE_NOTIFY_OFFSET,
                    };
                    let Some(value) = forward(machine, shared, &access, record)? else {
                        return Ok(Ended::Stopped);
                    };
                    let len = data.len();
                    data.copy_from_slice(&value.to_le_bytes()[..len]);
                } else if !(UART_BASE..UART_BASE + 0x1000).contains(&address) {
                    record.stray("read", address);
                }
            }
            VcpuExit::SystemEvent(kind, _) => return Ok(Ended::SystemEvent(kind)),
            other => return Err(format!("unexpected vCPU exit {other:?}").into()),
        }
    }
}

/// One trapped access through the bridge, as `mmio_virtio_handler` does it: note the CPU's
/// completion counter, publish, and for a synchronous access wait for the answer. Checks on
/// the way that the counter moves by exactly one per answer and never between our requests.
/// `None`: the zone is ending and the answer is no longer awaited.
fn forward(
    machine: &Machine,
    shared: &Shared,
    access: &Access,
    record: &mut VcpuRecord,
) -> Result<Option<u64>, Error> {
    let bridge = &shared.bridge;
    let before = bridge.cfg_flag(access.cpu);
    record.check_idle_flag(before);
    bridge.publish(access);
    if access.need_interrupt {
        record.posted += 1;
        return Ok(Some(0));
    }
    let waited = Instant::now();
    let timed_out = || {
        shared
            .answer_timeout
            .is_some_and(|limit| waited.elapsed() >= limit)
    };
    let answer = bridge.wait_answer(access.cpu, before, || {
        !machine.stopping.load(Ordering::Relaxed)
            && handoff::peer_alive(&shared.daemon)
            && !timed_out()
    });
    let Ok((flag, value)) = answer else {
        let request = format!(
            "{} {:#x}",
            if access.is_write {
                "a write to"
            } else {
                "a read of"
            },
            access.address
        );
        record.gave_up_waiting = Some(format!(
            "{request} after {:.1} s",
            waited.elapsed().as_secs_f64()
        ));
        if machine.stopping.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let cpu = access.cpu;
        return Err(if timed_out() {
            format!(
                "cpu {cpu}: no answer to {request} within {:.0?} (cfg_flags[{cpu}] stayed at \
                 {before}; see the per-CPU lines above for answers that went elsewhere)",
                waited.elapsed()
            )
        } else {
            format!(
                "cpu {cpu}: the daemon closed the hypervisor socket while the vCPU waited for \
                 its answer to {request}"
            )
        }
        .into());
    };
    record.wait_nanos += waited.elapsed().as_nanos() as u64;
    record.check_answer(before, flag, access);
    if access.is_write {
        record.sync_writes += 1;
    } else {
        record.sync_reads += 1;
    }
    Ok(Some(value))
}
