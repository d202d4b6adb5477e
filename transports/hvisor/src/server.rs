//! The daemon's request loop: drain the request ring, answer synchronous requests, sleep with
//! the fenced `need_wakeup` handshake, and turn completions into interrupts.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hvisor_vhost_core::log_limit::LogLimiter;
use log::{error, info, warn};
use vm_memory::mmap::FromRangesError;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::abi::{DeviceReq, MAX_CPUS, MAX_DEVS};
use super::config::{VirtioConfig, ZoneConfig};
use super::counters::{Counters, DeviceIdentity};
use super::devices::{DeviceError, OpenDevice};
use super::interrupt::{Injector, InterruptLine};
use super::mmio::MmioRegisters;
use super::poll::{Gap, InterruptCue, PollWindows};
use super::port::{HypervisorPort, PortError};
use super::ring::{RequestConsumer, answer};
use super::sync::Ordering;
use hvisor_vhost_core::stop::StopSignal;

/// Busy-poll window after the last request before sleeping: long enough to catch the next
/// register access of a driver's probe or I/O burst, short enough to idle at ~0% CPU.
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(
        "zone {zone}: memory_region[{region}] (zone0_ipa {zone0_ipa:#x}, {size:#x} bytes): cannot \
         map it: {source}"
    )]
    ZoneMemory {
        zone: u32,
        region: usize,
        zone0_ipa: u64,
        size: u64,
        source: FromRangesError,
    },
    #[error("zone {zone}: {source}")]
    ZoneLayout {
        zone: u32,
        source: vm_memory::GuestRegionCollectionError,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot start the interrupt thread: {0}")]
    Interrupts(io::Error),
    #[error("request loop: {0}")]
    Loop(io::Error),
}

/// A device window of a zone.
struct Window {
    zone: u32,
    base: u64,
    len: u64,
    name: String,
    registers: Box<dyn MmioRegisters>,
}

/// Stray accesses a guest may make at will (no device there, an impossible size) are logged
/// at most this many times per second.
const STRAY_ACCESS_LINES_PER_SECOND: u32 = 10;

pub struct Server {
    port: Arc<dyn HypervisorPort>,
    injector: Arc<Injector>,
    windows: Vec<Window>,
    /// The ceiling of the adaptive busy-poll windows (`--poll-us`).
    poll: Duration,
    cue: Arc<InterruptCue>,
    interrupts: Option<(EventFd, JoinHandle<()>)>,
    stray_accesses: LogLimiter,
    counters: Arc<Counters>,
}

fn map_zone(port: &dyn HypervisorPort, zone: &ZoneConfig) -> Result<GuestMemoryMmap, ServerError> {
    let mut regions = Vec::new();
    for (index, region) in zone.memory_regions.iter().enumerate() {
        let file_offset = port.zone_ram(zone.id, region)?;
        let mapped = usize::try_from(region.size)
            .map_err(|_| FromRangesError::InvalidGuestRegion)
            .and_then(|size| {
                GuestRegionMmap::from_range(GuestAddress(region.zonex_ipa), size, Some(file_offset))
            })
            .map_err(|source| ServerError::ZoneMemory {
                zone: zone.id,
                region: index,
                zone0_ipa: region.zone0_ipa,
                size: region.size,
                source,
            })?;
        regions.push(mapped);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|source| ServerError::ZoneLayout {
        zone: zone.id,
        source,
    })
}

impl Server {
    /// Maps the RAM of every zone with devices, starts `devices` (opened from `config` by
    /// [`devices::open_all`]) and the interrupt thread.
    pub fn new(
        config: &VirtioConfig,
        devices: Vec<OpenDevice>,
        port: Arc<dyn HypervisorPort>,
        poll: Duration,
    ) -> Result<Self, ServerError> {
        let cue = Arc::new(InterruptCue::new().map_err(ServerError::Loop)?);
        let injector = Arc::new(Injector::new(port.clone(), cue.clone()));
        let mut windows = Vec::new();
        let mut lines = Vec::new();
        let mut device_counters = Vec::new();
        let mut devices = devices.into_iter().peekable();
        for zone in config.served_zones() {
            let memory = GuestMemoryAtomic::new(map_zone(port.as_ref(), zone)?);
            while let Some(device) = devices.next_if(|device| device.zone == zone.id) {
                let (base, len, irq) = (device.config.addr, device.config.len, device.config.irq);
                let identity = DeviceIdentity {
                    name: device.name.clone(),
                    kind: device.config.kind.name(),
                    zone: zone.id,
                    addr: base,
                };
                let name = device.name.clone();
                let started = device.start(memory.clone(), injector.clone())?;
                info!("{name}: serving {len} bytes at {base:#x}, irq {irq}");
                lines.push(started.line);
                device_counters.push((identity, started.counters));
                windows.push(Window {
                    zone: zone.id,
                    base,
                    len,
                    name,
                    registers: started.registers,
                });
            }
        }
        // Vestigial in hvisor, but hvisor-tool publishes them; keep the page identical.
        let bridge = port.bridge();
        for (slot, window) in bridge.mmio_addrs.iter().zip(windows.iter().take(MAX_DEVS)) {
            slot.store(window.base, Ordering::Relaxed);
        }
        bridge.mmio_avail.store(1, Ordering::Release);
        let interrupts = spawn_interrupt_thread(lines).map_err(ServerError::Interrupts)?;
        let counters = Arc::new(Counters::new(injector.counters().clone(), device_counters));
        Ok(Server {
            port,
            injector,
            windows,
            poll,
            cue,
            interrupts: Some(interrupts),
            stray_accesses: LogLimiter::with_burst(
                module_path!(),
                Duration::from_secs(1),
                STRAY_ACCESS_LINES_PER_SECOND,
            ),
            counters,
        })
    }

    /// The daemon's counters, for reports while it serves and after it stopped.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Serves one request taken from the ring: the register access, then the answer a
    /// synchronous request waits for.
    pub fn handle(&mut self, request: DeviceReq) {
        self.counters.ring.requests.increment();
        let size = match request.size {
            1 | 2 | 4 | 8 => request.size as u8,
            other => {
                self.counters.ring.errors.increment();
                self.stray_accesses.warn(format_args!(
                    "zone {} cpu {}: access of {other} bytes at {:#x}; only 1, 2, 4 or 8 are \
                     possible; answered 0",
                    request.src_zone, request.src_cpu, request.address
                ));
                self.answer(&request, 0);
                return;
            }
        };
        let window = self.windows.iter_mut().find(|window| {
            window.zone == request.src_zone
                && request.address >= window.base
                && request.address - window.base < window.len
        });
        let value = match window {
            None => {
                self.counters.ring.errors.increment();
                self.stray_accesses.warn(format_args!(
                    "zone {} cpu {}: {} of {size} bytes at {:#x}, where no device is; {}",
                    request.src_zone,
                    request.src_cpu,
                    if request.is_write { "write" } else { "read" },
                    request.address,
                    if request.need_interrupt {
                        "dropped"
                    } else {
                        "answered 0"
                    }
                ));
                0
            }
            Some(window) => {
                let offset = request.address - window.base;
                if offset + u64::from(size) > window.len {
                    warn!(
                        "{}: access at {offset:#x} crosses the window's end",
                        window.name
                    );
                }
                if request.is_write {
                    window.registers.write(offset, size, request.value);
                    0
                } else {
                    window.registers.read(offset, size)
                }
            }
        };
        self.answer(&request, value);
    }

    /// Synchronous requests are answered, posted ones never: an answer the vCPU does not
    /// wait for would satisfy its next synchronous request with a stale value.
    fn answer(&self, request: &DeviceReq, value: u64) {
        let ring = &self.counters.ring;
        if request.need_interrupt {
            ring.posted_notifies.increment();
            return;
        }
        // Counted before the answer, which releases the vCPU: a guest that reads the counters
        // next finds its own requests in them.
        if usize::try_from(request.src_cpu).is_ok_and(|cpu| cpu < MAX_CPUS) {
            ring.sync_answers.increment();
        } else {
            ring.errors.increment();
        }
        if !answer(self.port.bridge(), request.src_cpu, value) {
            error!(
                "zone {}: request from cpu {} at {:#x} cannot be answered: cpu id beyond the \
                 bridge's 32 entries",
                request.src_zone, request.src_cpu, request.address
            );
        }
    }

    /// Serves requests until `stop` is requested or the hypervisor side goes away.
    pub fn run(&mut self, stop: &StopSignal) -> Result<(), ServerError> {
        const WAKEUP: u64 = 0;
        const STOP: u64 = 1;
        const HANGUP: u64 = 2;
        const CUE: u64 = 3;
        let port = self.port.clone();
        let bridge = port.bridge();
        let epoll = Epoll::new().map_err(ServerError::Loop)?;
        let watch = |fd: RawFd, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(ServerError::Loop)
        };
        let cue = self.cue.clone();
        watch(port.wakeup().as_raw_fd(), EventSet::IN, WAKEUP)?;
        watch(stop.wake_fd(), EventSet::IN, STOP)?;
        watch(cue.wake_fd(), EventSet::IN, CUE)?;
        if let Some(hangup) = port.hangup() {
            watch(
                hangup.as_raw_fd(),
                EventSet::IN | EventSet::READ_HANG_UP,
                HANGUP,
            )?;
        }
        let mut consumer = RequestConsumer::new(bridge);
        let mut events = [EpollEvent::default(); 4];
        let counters = self.counters.clone();
        let ring = &counters.ring;
        info!(
            "serving {} device(s); adaptive busy-poll window up to {:?}",
            self.windows.len(),
            self.poll
        );
        let mut windows = PollWindows::new(self.poll);
        let mut gap = Gap::AfterAccess;
        loop {
            // Drain, including before the first sleep: requests published before we set
            // `need_wakeup` brought no wake-up.
            consumer.announce_awake();
            let mut idle_since = Instant::now();
            let mut posted = cue.posted();
            // The ring ran empty and we spin: the next request is a poll hit, a sleep ends
            // the window as a miss.
            let mut polling = false;
            loop {
                if let Some(request) = consumer.pop() {
                    if std::mem::take(&mut polling) {
                        ring.poll_hits.increment();
                    }
                    gap = if request.need_interrupt {
                        Gap::AfterNotify
                    } else {
                        Gap::AfterAccess
                    };
                    self.handle(request);
                    idle_since = Instant::now();
                } else if stop.is_requested() {
                    return Ok(());
                } else if cue.posted() != posted {
                    // An interrupt went out: its driver's status read and acknowledgement
                    // follow, so the window starts again.
                    posted = cue.posted();
                    gap = Gap::AfterAccess;
                    idle_since = Instant::now();
                } else if idle_since.elapsed() < windows.get(gap) {
                    polling = true;
                    // Spins rather than yields: with a CPU hog beside the daemon, every
                    // sched_yield handed the hog a whole time slice (ring-bench --pin with a
                    // hog: 64 KiB rounds 6.6 ms/request yielding, 0.19 ms spinning), though
                    // yielding was faster on a quiet machine (86 against 106 us).
                    std::hint::spin_loop();
                } else if consumer.prepare_to_sleep() {
                    if std::mem::take(&mut polling) {
                        ring.poll_misses.increment();
                    }
                    break;
                }
            }
            // A posted interrupt wakes us only if the window after an access would poll.
            if !windows.get(Gap::AfterAccess).is_zero() && !cue.going_to_sleep(posted) {
                gap = Gap::AfterAccess;
                continue;
            }
            ring.sleeps.increment();
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(ServerError::Loop(error)),
            };
            cue.awake();
            windows.woke(gap, idle_since.elapsed());
            // Each sleep is counted as ended by the hypervisor's wake-up if it came, else by a
            // posted interrupt.
            let mut woken_by_hypervisor = false;
            for event in &events[..ready] {
                match event.data() {
                    WAKEUP => {
                        woken_by_hypervisor = true;
                        // Drains the counter; the ring is read in the next round either way.
                        let _ = port.wakeup().read();
                    }
                    CUE => {
                        cue.woken();
                        gap = Gap::AfterAccess;
                    }
                    STOP => return Ok(()),
                    _ => {
                        info!("the hypervisor side closed its connection; stopping");
                        return Ok(());
                    }
                }
            }
            if woken_by_hypervisor {
                ring.wakeups.increment();
            } else {
                ring.interrupt_wakeups.increment();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.injector.stop();
        for window in &mut self.windows {
            window.registers.shutdown();
        }
        if let Some((exit, handle)) = self.interrupts.take() {
            if exit.write(1).is_ok() && handle.join().is_err() {
                error!("the interrupt thread panicked");
            }
        }
    }
}

/// One thread turns the signals that do not come from a queue's worker (configuration
/// changes, queues signalled while the driver stopped them) into interrupts on their
/// device's line.
fn spawn_interrupt_thread(lines: Vec<Arc<InterruptLine>>) -> io::Result<(EventFd, JoinHandle<()>)> {
    let epoll = Epoll::new()?;
    // Token = position in `sources`: a line and one of its signals.
    let mut sources = Vec::new();
    for line in &lines {
        for (index, signal) in line.interrupt_thread_signals().into_iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                signal,
                EpollEvent::new(EventSet::IN, sources.len() as u64),
            )?;
            sources.push((line.clone(), index));
        }
    }
    let exit = EventFd::new(EFD_NONBLOCK)?;
    let exit_token = sources.len() as u64;
    epoll.ctl(
        ControlOperation::Add,
        exit.as_raw_fd(),
        EpollEvent::new(EventSet::IN, exit_token),
    )?;
    let handle = std::thread::Builder::new()
        .name("interrupts".into())
        .spawn(move || {
            let mut events = vec![EpollEvent::default(); sources.len() + 1];
            loop {
                let ready = match epoll.wait(-1, &mut events) {
                    Ok(ready) => ready,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        error!("interrupt thread: {error}");
                        return;
                    }
                };
                for event in &events[..ready] {
                    let token = event.data();
                    if token == exit_token {
                        return;
                    }
                    let (line, index) = &sources[token as usize];
                    line.interrupt_thread_signalled(*index);
                }
            }
        })?;
    Ok((exit, handle))
}
