//! The virtio-mmio target: fuzzed ring requests (register reads and writes of any size, from
//! any vCPU, synchronous or posted, inside and outside the device windows) served by the
//! daemon's request loop ([`Server::handle`]) for an rng, a blk and a console device whose
//! queues run on their real worker threads over a guest RAM the fuzzer also writes.
//!
//! Input: a guest memory image length `L` (2 bytes, little endian), the image, then requests
//! of [`REQUEST_LEN`] bytes each (see [`decode`]).
//!
//! Checks, per request: a synchronous request from a vCPU the bridge has an entry for is
//! answered exactly once, a posted one never; the identification registers read what
//! virtio-mmio says they hold. The server and its devices live for the whole process (one
//! set of worker threads, not one per input); each input ends with a device reset of every
//! device, which must quiesce them, so inputs do not leak state into each other, and starts on
//! freshly written RAM.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hvisor_bridge::abi::{DeviceReq, MAX_CPUS, VirtioBridge};
use hvisor_bridge::ring::HypervisorSide;
use hvisor_transport::config::{MemoryRegion, VirtioConfig};
use hvisor_transport::mmio::{MAGIC_VALUE, VERSION, reg};
use hvisor_transport::port::{HypervisorPort, PortError};
use hvisor_transport::server::Server;
use hvisor_vhost::registry::open_hvisor_devices;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Bytes of one encoded request.
pub const REQUEST_LEN: usize = 14;
const ZONE: u32 = 1;
/// Guest RAM of the zone, at guest address 0.
const RAM_SIZE: usize = 0x4000;
/// Device windows: rng, blk, console.
const WINDOWS: [(u64, u32); 3] = [(0x1000_0000, 4), (0x1000_1000, 2), (0x1000_2000, 3)];
const WINDOW_LEN: u64 = 0x200;
/// Bytes of the blk device's image.
const DISK_SIZE: u64 = 1 << 16;

/// hvisor's side of the bridge, in this process: the page, the zone RAM memfd, the wake-up.
struct FuzzPort {
    bridge: Box<VirtioBridge>,
    ram: Arc<std::fs::File>,
    wakeup: EventFd,
}

impl HypervisorPort for FuzzPort {
    fn bridge(&self) -> &VirtioBridge {
        &self.bridge
    }

    /// The one zone's one region: the whole memfd.
    fn zone_ram(&self, _zone: u32, _region: &MemoryRegion) -> Result<FileOffset, PortError> {
        Ok(FileOffset::from_arc(self.ram.clone(), 0))
    }

    fn wakeup(&self) -> &EventFd {
        &self.wakeup
    }

    fn finish_request(&self) -> io::Result<()> {
        Ok(())
    }
}

struct Rig {
    server: Server,
    port: Arc<FuzzPort>,
    /// The harness's own mapping of the zone RAM.
    ram: GuestMemoryMmap,
    /// The blk device's image.
    disk: std::fs::File,
    /// An input started and has not reset the devices yet.
    dirty: bool,
    _files: tempfile::TempDir,
}

fn memfd(size: u64) -> io::Result<std::fs::File> {
    // SAFETY: the name is NUL terminated; the result is checked below.
    let fd: RawFd = unsafe { libc::memfd_create(c"fuzz-zone-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

fn config_text(disk: &Path, console: &Path) -> String {
    format!(
        r#"{{"zones": [{{"id": {ZONE},
            "memory_region": [{{"zone0_ipa": "0x80000000", "zonex_ipa": "0x0", "size": "{RAM_SIZE:#x}"}}],
            "devices": [
              {{"type": "rng", "status": "enable", "addr": "{rng:#x}", "len": "{WINDOW_LEN:#x}", "irq": 33}},
              {{"type": "blk", "status": "enable", "addr": "{blk:#x}", "len": "{WINDOW_LEN:#x}", "irq": 34,
                "img": "{disk}"}},
              {{"type": "console", "status": "enable", "addr": "{con:#x}", "len": "{WINDOW_LEN:#x}", "irq": 35,
                "socket": "{console}"}}
            ]}}]}}"#,
        rng = WINDOWS[0].0,
        blk = WINDOWS[1].0,
        con = WINDOWS[2].0,
        disk = disk.display(),
        console = console.display(),
    )
}

impl Rig {
    fn new() -> Self {
        let files = tempfile::tempdir().expect("temporary directory");
        let disk_path: PathBuf = files.path().join("disk.img");
        let disk = std::fs::File::create(&disk_path).expect("disk image");
        disk.set_len(DISK_SIZE).expect("disk image");
        let console = files.path().join("console.sock");
        let config =
            VirtioConfig::parse(&config_text(&disk_path, &console), Path::new("fuzz.json"))
                .expect("the rig's configuration");
        let ram = Arc::new(memfd(RAM_SIZE as u64).expect("zone RAM"));
        let port = Arc::new(FuzzPort {
            bridge: Box::default(),
            ram: ram.clone(),
            wakeup: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        });
        let devices = open_hvisor_devices(&config).expect("devices");
        let server =
            Server::new(&config, devices, port.clone(), Duration::ZERO).expect("request loop");
        let region = GuestRegionMmap::from_range(
            GuestAddress(0),
            RAM_SIZE,
            Some(FileOffset::from_arc(ram, 0)),
        )
        .expect("harness mapping of the zone RAM");
        Rig {
            server,
            port,
            ram: GuestMemoryMmap::from_regions(vec![region]).expect("one region"),
            disk,
            dirty: true,
            _files: files,
        }
    }

    /// Serves `request` and checks that it was answered as it must be; returns the answer.
    fn serve(&mut self, request: DeviceReq) -> Option<u64> {
        let hypervisor = HypervisorSide::new(&self.port.bridge);
        let cpu = usize::try_from(request.src_cpu)
            .ok()
            .filter(|&cpu| cpu < MAX_CPUS);
        let flag_before = cpu.map(|cpu| hypervisor.cfg_flag(cpu));
        self.server.handle(request);
        let (Some(cpu), Some(before)) = (cpu, flag_before) else {
            return None;
        };
        let flag = hypervisor.cfg_flag(cpu);
        if request.need_interrupt {
            assert_eq!(flag, before, "posted request {request:?} was answered");
            None
        } else {
            assert_eq!(
                flag,
                before.wrapping_add(1),
                "synchronous request {request:?} was not answered exactly once"
            );
            Some(hypervisor.cfg_value(cpu))
        }
    }

    /// A synchronous Status=0 on every device: returns once their queues are quiet.
    fn reset_all(&mut self) {
        for (base, _) in WINDOWS {
            self.serve(DeviceReq {
                src_cpu: 0,
                address: base + reg::STATUS,
                size: 4,
                value: 0,
                src_zone: ZONE,
                is_write: true,
                need_interrupt: false,
            });
        }
        let hypervisor = HypervisorSide::new(&self.port.bridge);
        while hypervisor.pop_result().is_some() {}
    }
}

/// One request from `REQUEST_LEN` bytes: vCPU, flags (bit 0 write, bit 1 posted), window
/// (0..=2 a device, 3 no device, 4 another zone), size (1, 2, 4 or 8 by the low bits, or the
/// raw byte when its high nibble is 0xf), register offset (2 bytes, within the window and a
/// little beyond), value (8 bytes).
pub fn decode(bytes: &[u8; REQUEST_LEN]) -> DeviceReq {
    let window = bytes[2] % 5;
    let offset = u64::from(u16::from_le_bytes([bytes[4], bytes[5]])) % (WINDOW_LEN + 0x10);
    let base = match window {
        0..=2 => WINDOWS[usize::from(window)].0,
        _ => 0x2000_0000,
    };
    DeviceReq {
        src_cpu: u64::from(bytes[0]),
        address: base + offset,
        size: if bytes[3] >= 0xf0 {
            u64::from(bytes[3] & 0xf)
        } else {
            1 << (bytes[3] % 4)
        },
        value: u64::from_le_bytes(bytes[6..14].try_into().expect("8 bytes")),
        src_zone: if window == 4 { ZONE + 1 } else { ZONE },
        is_write: bytes[1] & 1 != 0,
        need_interrupt: bytes[1] & 2 != 0,
    }
}

/// Encodes a request the way [`decode`] reads it (for seeds).
pub fn encode(cpu: u8, write: bool, window: u8, size: u8, offset: u16, value: u64) -> Vec<u8> {
    let size_code = match size {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        other => 0xf0 | other,
    };
    let mut bytes = vec![cpu, u8::from(write), window, size_code];
    bytes.extend_from_slice(&offset.to_le_bytes());
    bytes.extend_from_slice(&value.to_le_bytes());
    bytes
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| Mutex::new(Rig::new()))
}

pub fn mmio(data: &[u8]) {
    run(data, None);
}

/// What an input did, for tests: a digest of the values its synchronous register reads
/// returned, except InterruptStatus and Status, which show how far the queue workers got (a
/// matter of timing); `None` for an input too short to be one.
pub fn digest(data: &[u8]) -> Option<u64> {
    let mut answers = Vec::new();
    run(data, Some(&mut answers))?;
    let mut hasher = DefaultHasher::new();
    answers.hash(&mut hasher);
    Some(hasher.finish())
}

fn run(data: &[u8], mut answers: Option<&mut Vec<(u64, u64)>>) -> Option<()> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let image_len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (image, requests) = rest.split_at(image_len);
    let mut rig = rig()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Every input ends with a reset; one that did not get there (it panicked) is made up for.
    if rig.dirty {
        rig.reset_all();
    }
    rig.dirty = true;
    // All of RAM rewritten: the image, then zeroes over whatever an earlier input left.
    static ZEROES: [u8; RAM_SIZE] = [0; RAM_SIZE];
    let image = &image[..image.len().min(RAM_SIZE)];
    rig.ram
        .write_slice(image, GuestAddress(0))
        .expect("zone RAM");
    if image.len() < RAM_SIZE {
        rig.ram
            .write_slice(&ZEROES[image.len()..], GuestAddress(image.len() as u64))
            .expect("zone RAM");
    }
    for bytes in requests.chunks_exact(REQUEST_LEN) {
        let request = decode(bytes.try_into().expect("REQUEST_LEN bytes"));
        let answer = rig.serve(request);
        if let (Some(answers), Some(value), false) = (&mut answers, answer, request.is_write) {
            let register = request.address % 0x1000;
            let timing = |start: u64| (start..start + 4).contains(&register);
            if !timing(reg::INTERRUPT_STATUS) && !timing(reg::STATUS) {
                answers.push((request.address, value));
            }
        }
        let window = WINDOWS.iter().find(|(base, _)| {
            request.src_zone == ZONE
                && request.address >= *base
                && request.address < base + WINDOW_LEN
        });
        if let (Some(value), Some((base, device_id)), false, 4) =
            (answer, window, request.is_write, request.size)
        {
            let expected = match request.address - base {
                reg::MAGIC_VALUE => Some(u64::from(MAGIC_VALUE)),
                reg::VERSION => Some(u64::from(VERSION)),
                reg::DEVICE_ID => Some(u64::from(*device_id)),
                _ => None,
            };
            if let Some(expected) = expected {
                assert_eq!(
                    value, expected,
                    "{request:?} read a wrong identification register"
                );
            }
        }
    }
    rig.reset_all();
    // The disk zeroed (cut to nothing and grown again) now that no worker uses it.
    rig.disk
        .set_len(0)
        .and_then(|()| rig.disk.set_len(DISK_SIZE))
        .expect("zeroing the disk");
    rig.dirty = false;
    Some(())
}
