//! A simulator of hvisor's side of the virtio path, for tests, examples, benchmarks, and for
//! trying the hvisor transport on a workstation.
//!
//! The bridge page and each zone RAM window are memfds, the wake-up IPI and FINISH_REQ are
//! eventfds, and everything is handed to the daemon over the hand-off socket protocol — so
//! the daemon runs exactly the code it runs on hvisor, in another thread or another process.
//! Guest accesses follow hvisor's trampoline: fill the slot, release fence, store `req_rear`,
//! `fence(SeqCst)`, check `need_wakeup`; synchronous accesses spin on `cfg_flags[cpu]`.
//!
//! [`guest`] plays a zone's guest over it: a virtio-mmio driver with virtio-blk requests.

pub mod guest;

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use hvisor_transport::abi::{
    BRIDGE_MAP_SIZE, DeviceReq, DeviceRes, MAX_CPUS, QUEUE_NOTIFY_OFFSET, VirtioBridge,
};
use hvisor_transport::config::VirtioConfig;
use hvisor_transport::handoff::{self, DaemonReply, HypervisorHello, RamWindow};
use hvisor_transport::port::BridgeMapping;
use hvisor_transport::ring::HypervisorSide;
use hvisor_transport::sync::Ordering;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cpu {0} is beyond the bridge's {MAX_CPUS} entries")]
    BadCpu(u32),
    #[error("no answer from the daemon within {timeout:?} to {access}; ring state: {state}")]
    NoAnswer {
        timeout: Duration,
        access: String,
        state: String,
    },
    #[error("request ring stayed full for {0:?}")]
    RingFull(Duration),
    #[error("no interrupt within {0:?}")]
    NoInterrupt(Duration),
    #[error("zone {0} is not in the configuration")]
    NoZone(u32),
}

fn memfd(name: &std::ffi::CStr, size: u64) -> io::Result<File> {
    if i64::try_from(size).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            "more than a file can hold (2^63 - 1 bytes)",
        ));
    }
    // SAFETY: the name is NUL terminated; the result is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

struct SimulatedZone {
    id: u32,
    memory: GuestMemoryMmap,
    windows: Vec<(RamWindow, Arc<File>)>,
    /// Device windows, to tell posted QueueNotify writes from synchronous accesses.
    devices: Vec<(u64, u64)>,
}

/// Counters a test or benchmark may read.
#[derive(Debug, Default)]
pub struct SimulatorStats {
    pub requests: AtomicU64,
    pub wakeups_sent: AtomicU64,
    pub finish_signals: AtomicU64,
}

/// The hypervisor's side of one daemon.
pub struct Simulator {
    bridge_file: File,
    bridge: BridgeMapping,
    zones: Vec<SimulatedZone>,
    wakeup: EventFd,
    /// hvisor's `req_lock`, guarding the producers' copy of `req_rear`.
    request_lock: Mutex<u32>,
    interrupts: Mutex<VecDeque<DeviceRes>>,
    interrupt_arrived: Condvar,
    result_thread: Mutex<Option<(EventFd, JoinHandle<()>)>>,
    connection: Mutex<Option<UnixStream>>,
    posted_notify: bool,
    pub stats: SimulatorStats,
    detached: AtomicBool,
}

/// How the simulator plays hvisor.
#[derive(Clone, Copy, Debug)]
pub struct SimOptions {
    /// A write to QueueNotify at a device window's start is posted (`need_interrupt = 1`), as
    /// hvisor does when each device has its own virtio region.
    pub posted_notify: bool,
    /// All zone RAM windows in one memfd, one after the other at page-aligned offsets (the
    /// hand-off lets windows share a descriptor); otherwise one memfd per window.
    pub shared_ram_file: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            posted_notify: true,
            shared_ram_file: false,
        }
    }
}

/// A memory region of the configuration that cannot be simulated, named as in the file.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "zones[{zone_index}] (zone id {zone}), memory_region[{region}], field \"size\": cannot \
         back {size:#x} bytes of simulated zone RAM: {source}"
    )]
    Region {
        zone_index: usize,
        zone: u32,
        region: usize,
        size: u64,
        source: io::Error,
    },
    #[error("the bridge page: {0}")]
    Bridge(io::Error),
    #[error("{0}")]
    Setup(io::Error),
}

impl Simulator {
    /// Creates the bridge page and every zone's RAM windows for `config`.
    pub fn new(config: &VirtioConfig, options: SimOptions) -> Result<Arc<Self>, SetupError> {
        let bridge_file =
            memfd(c"hvisor-bridge", BRIDGE_MAP_SIZE as u64).map_err(SetupError::Bridge)?;
        let bridge = BridgeMapping::map(&bridge_file).map_err(SetupError::Bridge)?;
        let shared_file = if options.shared_ram_file {
            Some(Arc::new(
                memfd(c"hvisor-zone-ram", 0).map_err(SetupError::Setup)?,
            ))
        } else {
            None
        };
        let mut shared_len = 0u64;
        let mut zones = Vec::new();
        for (zone_index, zone) in config.zones.iter().enumerate() {
            let mut windows = Vec::new();
            let mut regions = Vec::new();
            for (region_index, region) in zone.memory_regions.iter().enumerate() {
                let region_error = |source| SetupError::Region {
                    zone_index,
                    zone: zone.id,
                    region: region_index,
                    size: region.size,
                    source,
                };
                let (file, offset) = match &shared_file {
                    Some(file) => {
                        let offset = shared_len;
                        shared_len = region
                            .size
                            .checked_next_multiple_of(4096)
                            .and_then(|size| offset.checked_add(size))
                            .ok_or_else(|| region_error(io::ErrorKind::FileTooLarge.into()))?;
                        file.set_len(shared_len).map_err(|error| {
                            region_error(io::Error::other(format!(
                                "the shared file of {shared_len:#x} bytes: {error}"
                            )))
                        })?;
                        (file.clone(), offset)
                    }
                    None => {
                        let file = memfd(c"hvisor-zone-ram", region.size).map_err(region_error)?;
                        (Arc::new(file), 0)
                    }
                };
                let size = usize::try_from(region.size)
                    .map_err(|_| region_error(io::ErrorKind::FileTooLarge.into()))?;
                regions.push(
                    GuestRegionMmap::from_range(
                        GuestAddress(region.zonex_ipa),
                        size,
                        Some(FileOffset::from_arc(file.clone(), offset)),
                    )
                    .map_err(|error| region_error(io::Error::other(error)))?,
                );
                windows.push((
                    RamWindow {
                        zone: zone.id,
                        zone0_ipa: region.zone0_ipa,
                        size: region.size,
                        fd: 0,
                        offset,
                    },
                    file,
                ));
            }
            let memory = GuestMemoryMmap::from_regions(regions)
                .map_err(|error| SetupError::Setup(io::Error::other(error)))?;
            let devices = zone
                .devices
                .iter()
                .map(|device| (device.addr, device.len))
                .collect();
            zones.push(SimulatedZone {
                id: zone.id,
                memory,
                windows,
                devices,
            });
        }
        let wakeup = EventFd::new(EFD_NONBLOCK).map_err(SetupError::Setup)?;
        Ok(Arc::new(Simulator {
            bridge_file,
            bridge,
            zones,
            wakeup,
            request_lock: Mutex::new(0),
            interrupts: Mutex::new(VecDeque::new()),
            interrupt_arrived: Condvar::new(),
            result_thread: Mutex::new(None),
            connection: Mutex::new(None),
            posted_notify: options.posted_notify,
            stats: SimulatorStats::default(),
            detached: AtomicBool::new(false),
        }))
    }

    pub fn bridge(&self) -> &VirtioBridge {
        self.bridge.bridge()
    }

    /// Guest RAM of `zone`, as the guest sees it.
    pub fn memory(&self, zone: u32) -> Option<&GuestMemoryMmap> {
        self.zones.iter().find(|z| z.id == zone).map(|z| &z.memory)
    }

    /// Waits for one daemon on `path` and attaches it.
    pub fn listen_and_attach(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        let listener = hvisor_vhost_core::socket::listen_at(path).map_err(io::Error::other)?;
        let (stream, _) = listener.accept()?;
        self.attach(stream)
    }

    /// Hands the shared memory to the daemon at the other end of `stream` and starts
    /// draining the result ring.
    pub fn attach(self: &Arc<Self>, stream: UnixStream) -> io::Result<()> {
        let mut fds: Vec<RawFd> = vec![self.bridge_file.as_raw_fd(), self.wakeup.as_raw_fd()];
        let mut windows = Vec::new();
        for zone in &self.zones {
            for (window, file) in &zone.windows {
                let fd = file.as_raw_fd();
                let position = fds.iter().position(|&sent| sent == fd).unwrap_or_else(|| {
                    fds.push(fd);
                    fds.len() - 1
                });
                windows.push(RamWindow {
                    fd: position,
                    ..window.clone()
                });
            }
        }
        handoff::send(&stream, &HypervisorHello::new(0, 1, windows), &fds)?;
        let (reply, mut files): (DaemonReply, Vec<Option<File>>) = handoff::receive(&stream)?;
        reply
            .check()
            .map_err(|message| io::Error::new(io::ErrorKind::InvalidData, message))?;
        let finish_file = files
            .get_mut(reply.finish_fd)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "finish_fd was not sent"))?;
        // SAFETY: the daemon sent an eventfd that we now own alone.
        let finish =
            unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(finish_file)) };
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let simulator = self.clone();
        let exit_for_thread = exit.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("sim-results".into())
            .spawn(move || simulator.drain_results(finish, exit_for_thread))?;
        *self.lock(&self.result_thread) = Some((exit, handle));
        *self.lock(&self.connection) = Some(stream);
        Ok(())
    }

    fn lock<'a, T>(&self, mutex: &'a Mutex<T>) -> MutexGuard<'a, T> {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// hvisor's FINISH_REQ handler: move every result into the pending-interrupt list.
    fn drain_results(&self, finish: EventFd, exit: EventFd) {
        let epoll = match Epoll::new() {
            Ok(epoll) => epoll,
            Err(error) => {
                warn!("simulator: {error}");
                return;
            }
        };
        for (fd, token) in [(finish.as_raw_fd(), 0), (exit.as_raw_fd(), 1)] {
            if let Err(error) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                warn!("simulator: {error}");
                return;
            }
        }
        let mut events = [EpollEvent::default(); 2];
        let hypervisor = HypervisorSide::new(self.bridge());
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    warn!("simulator: {error}");
                    return;
                }
            };
            if events[..ready].iter().any(|event| event.data() == 1) {
                return;
            }
            let _ = finish.read();
            self.stats.finish_signals.fetch_add(1, Ordering::Relaxed);
            let mut pending = self.lock(&self.interrupts);
            while let Some(result) = hypervisor.pop_result() {
                pending.push_back(result);
            }
            self.interrupt_arrived.notify_all();
        }
    }

    /// Waits up to `timeout` for the next injected interrupt.
    pub fn wait_interrupt(&self, timeout: Duration) -> Option<DeviceRes> {
        let deadline = Instant::now() + timeout;
        let mut pending = self.lock(&self.interrupts);
        loop {
            if let Some(result) = pending.pop_front() {
                return Some(result);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            pending = self
                .interrupt_arrived
                .wait_timeout(pending, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Interrupts injected so far and not yet taken.
    pub fn take_interrupts(&self) -> Vec<DeviceRes> {
        self.lock(&self.interrupts).drain(..).collect()
    }

    fn is_posted(&self, zone: u32, address: u64, write: bool) -> bool {
        self.posted_notify
            && write
            && self.zones.iter().any(|z| {
                z.id == zone
                    && z.devices
                        .iter()
                        .any(|&(base, _)| address == base + QUEUE_NOTIFY_OFFSET)
            })
    }

    /// The ring and handshake state, for diagnostics.
    pub fn ring_state(&self, cpu: usize) -> String {
        let bridge = self.bridge();
        format!(
            "req_front {} req_rear {} need_wakeup {} res_front {} res_rear {} cfg_flags[{cpu}] {}",
            bridge.req_front.load(Ordering::Relaxed),
            bridge.req_rear.load(Ordering::Relaxed),
            bridge.need_wakeup.load(Ordering::Relaxed),
            bridge.res_front.load(Ordering::Relaxed),
            bridge.res_rear.load(Ordering::Relaxed),
            bridge
                .cfg_flags
                .get(cpu)
                .map_or(0, |flag| flag.load(Ordering::Relaxed)),
        )
    }

    /// Publishes `request` as is, without waiting for an answer, and sends the wake-up if the
    /// daemon asked for one: for requests `access` would not produce (a posted write where no
    /// device is, a CPU id beyond the page). False when the ring is full.
    pub fn publish_raw(&self, request: &DeviceReq) -> bool {
        let hypervisor = HypervisorSide::new(self.bridge());
        let pushed = {
            let mut rear = self.lock(&self.request_lock);
            hypervisor.try_push(&mut rear, request)
        };
        if pushed && hypervisor.needs_wakeup() {
            self.stats.wakeups_sent.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = self.wakeup.write(1) {
                warn!("simulator: wake-up failed: {error}");
            }
        }
        pushed
    }

    /// Sends the wake-up IPI whatever `need_wakeup` says, as an operator would to rescue a
    /// daemon that slept through a request (a lost wake-up). Not counted in `wakeups_sent`,
    /// which counts only the wake-ups the protocol asked for.
    pub fn kick_daemon(&self) -> io::Result<()> {
        self.wakeup.write(1)
    }

    /// One trapped access of the vCPU on physical `cpu`: returns the value read (0 for
    /// writes). Synchronous accesses wait for the daemon's answer up to `timeout`.
    pub fn access(
        &self,
        cpu: u32,
        zone: u32,
        address: u64,
        size: u8,
        write: Option<u64>,
        timeout: Duration,
    ) -> Result<u64, SimError> {
        let index = cpu as usize;
        if index >= MAX_CPUS {
            return Err(SimError::BadCpu(cpu));
        }
        let posted = self.is_posted(zone, address, write.is_some());
        let request = DeviceReq {
            src_cpu: u64::from(cpu),
            address,
            size: u64::from(size),
            value: write.unwrap_or(0),
            src_zone: zone,
            is_write: write.is_some(),
            need_interrupt: posted,
        };
        let hypervisor = HypervisorSide::new(self.bridge());
        let before = hypervisor.cfg_flag(index);
        let started = Instant::now();
        let mut backoff = 1u32;
        loop {
            let pushed = {
                let mut rear = self.lock(&self.request_lock);
                hypervisor.try_push(&mut rear, &request)
            };
            if pushed {
                break;
            }
            if started.elapsed() > timeout {
                return Err(SimError::RingFull(timeout));
            }
            for _ in 0..backoff {
                std::hint::spin_loop();
            }
            backoff = (backoff * 2).min(1024);
            std::thread::yield_now();
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if hypervisor.needs_wakeup() {
            self.stats.wakeups_sent.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = self.wakeup.write(1) {
                warn!("simulator: wake-up failed: {error}");
            }
        }
        if posted {
            return Ok(0);
        }
        let mut spins = 0u32;
        while hypervisor.cfg_flag(index) == before {
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 {
                if started.elapsed() > timeout {
                    return Err(SimError::NoAnswer {
                        timeout,
                        access: format!(
                            "{} of {size} bytes at {address:#x} by zone {zone} cpu {cpu}",
                            if write.is_some() { "write" } else { "read" }
                        ),
                        state: self.ring_state(index),
                    });
                }
                // Two cores may host the daemon and several vCPU threads: let them run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(hypervisor.cfg_value(index))
    }

    /// Stops draining results and closes the connection, which tells the daemon to stop.
    /// (The result thread holds the simulator, so this is explicit rather than `Drop`.)
    pub fn detach(&self) {
        if self.detached.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some((exit, handle)) = self.lock(&self.result_thread).take() {
            if exit.write(1).is_ok() {
                let _ = handle.join();
            }
        }
        if let Some(stream) = self.lock(&self.connection).take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        debug!("simulator detached");
    }
}
