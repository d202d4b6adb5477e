//! An in-process hvisor test rig: the simulator plays hvisor, the daemon's `Server` runs on a
//! thread, the two joined by a socket pair exactly as across processes. Plus a virtio-blk
//! driver that polls its used ring (several can share one simulator), a gate that can hold
//! back FINISH_REQ as a hypervisor that stops draining results would, and a log capture.
//!
//! Every wait here is bounded by [`TIMEOUT`]: a daemon that stops answering fails the test
//! instead of hanging it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hvisor_sim::guest::MmioGuest;
use hvisor_sim::{SimOptions, Simulator};
use hvisor_transport::abi::DeviceRes;
use hvisor_transport::config::VirtioConfig;
use hvisor_transport::counters::Counters;
use hvisor_transport::handoff::{self, DaemonReply};
use hvisor_transport::mmio::reg;
use hvisor_transport::port::SocketPort;
use hvisor_transport::server::{Server, ServerError};
use hvisor_vhost::registry;
use hvisor_vhost_core::stop::StopSignal;
use virtio_guest_driver::blk::{Payload, RequestBuffers};
use virtio_guest_driver::{Buffer, DriverQueue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Bound of every wait for the daemon.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Guest-physical base of every zone's RAM (each zone has its own backing memory).
pub const RAM_BASE: u64 = 0x5000_0000;
pub const RAM_SIZE: u64 = 16 << 20;
pub const IMAGE_SIZE: u64 = 4 << 20;
pub const SECTOR: u64 = 512;
/// Stride of the guest RAM areas handed to drivers (rings, then buffers).
pub const AREA_SIZE: u64 = 0x4_0000;

// The driver's constants under the names the tests use; like the rest of this module, not
// every test binary uses each (see mod.rs).
#[allow(unused_imports)]
pub use virtio_guest_driver::blk::{
    F_FLUSH as VIRTIO_BLK_F_FLUSH, S_OK as BLK_S_OK, STATUS_UNWRITTEN, T_IN as BLK_T_IN,
    T_OUT as BLK_T_OUT,
};
#[allow(unused_imports)]
pub use virtio_guest_driver::{
    F_VERSION_1 as VIRTIO_F_VERSION_1, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};

/// The `n`th driver area of a zone's RAM.
pub fn area(n: u64) -> GuestAddress {
    GuestAddress(RAM_BASE + 0x10_0000 + n * AREA_SIZE)
}

/// One blk device of the rig's configuration, backed by a fresh zeroed image.
#[derive(Clone, Copy, Debug)]
pub struct BlkSpec {
    pub zone: u32,
    pub addr: u64,
    pub irq: u32,
}

/// A device of another type: where it sits, and the type's fields of its JSON entry, `"type"`
/// included (e.g. `json!({"type": "rng", "source": "/dev/urandom"})`).
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub zone: u32,
    pub addr: u64,
    pub irq: u32,
    pub fields: serde_json::Value,
}

pub struct RigOptions {
    pub devices: Vec<BlkSpec>,
    /// Devices of other types, after the blk devices in their zone's list.
    pub other_devices: Vec<DeviceSpec>,
    /// Routes FINISH_REQ through a [`ResultGate`] the test can pause.
    pub gated_results: bool,
    /// The simulator puts every RAM window into one file (see [`SimOptions`]).
    pub shared_ram_file: bool,
    pub poll: Duration,
}

impl RigOptions {
    pub fn new(devices: &[BlkSpec]) -> Self {
        RigOptions {
            devices: devices.to_vec(),
            other_devices: Vec::new(),
            gated_results: false,
            shared_ram_file: false,
            poll: hvisor_transport::server::DEFAULT_POLL,
        }
    }
}

/// The daemon's side of `virtio_cfg.json` for `devices` and `others`: one RAM window per zone,
/// each zone mapped from its own place in root Linux's view but seen by its guest at
/// [`RAM_BASE`].
fn config_json(devices: &[BlkSpec], images: &[PathBuf], others: &[DeviceSpec]) -> String {
    let blk = devices
        .iter()
        .zip(images)
        .map(|(device, image)| DeviceSpec {
            zone: device.zone,
            addr: device.addr,
            irq: device.irq,
            fields: serde_json::json!({ "type": "blk", "img": image }),
        });
    let all: Vec<DeviceSpec> = blk.chain(others.iter().cloned()).collect();
    let mut zones: Vec<u32> = Vec::new();
    for device in &all {
        if !zones.contains(&device.zone) {
            zones.push(device.zone);
        }
    }
    let zones: Vec<serde_json::Value> = zones
        .iter()
        .map(|&zone| {
            let devices: Vec<serde_json::Value> = all
                .iter()
                .filter(|device| device.zone == zone)
                .map(|device| {
                    let mut entry = serde_json::json!({
                        "addr": format!("{:#x}", device.addr),
                        "len": "0x200",
                        "irq": device.irq,
                        "status": "enable",
                    });
                    if let (Some(entry), Some(fields)) =
                        (entry.as_object_mut(), device.fields.as_object())
                    {
                        entry.extend(fields.clone());
                    }
                    entry
                })
                .collect();
            serde_json::json!({
                "id": zone,
                "memory_region": [{
                    "zone0_ipa": format!("{:#x}", 0x4000_0000 + u64::from(zone) * 0x1000_0000),
                    "zonex_ipa": format!("{RAM_BASE:#x}"),
                    "size": format!("{RAM_SIZE:#x}"),
                }],
                "devices": devices,
            })
        })
        .collect();
    serde_json::json!({ "zones": zones }).to_string()
}

/// A simulated hvisor and a daemon serving it, connected and running.
pub struct Rig {
    pub sim: Arc<Simulator>,
    /// Image of each device of [`RigOptions::devices`], in the same order.
    pub images: Vec<PathBuf>,
    /// The daemon's counters.
    pub counters: Arc<Counters>,
    stop: Arc<StopSignal>,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    gate: Option<(Arc<ResultGate>, JoinHandle<io::Result<()>>)>,
    _dir: tempfile::TempDir,
}

impl Rig {
    pub fn start(options: RigOptions) -> Rig {
        capture_logs();
        let dir = tempfile::tempdir().expect("temporary directory");
        let images: Vec<PathBuf> = (0..options.devices.len())
            .map(|n| {
                let path = dir.path().join(format!("disk{n}.img"));
                File::create(&path)
                    .and_then(|file| file.set_len(IMAGE_SIZE))
                    .expect("creating an image");
                path
            })
            .collect();
        let config = VirtioConfig::parse(
            &config_json(&options.devices, &images, &options.other_devices),
            Path::new("test.json"),
        )
        .expect("the test configuration is valid");
        let devices = registry::open_hvisor_devices(&config).expect("opening the devices");
        let sim = Simulator::new(
            &config,
            SimOptions {
                shared_ram_file: options.shared_ram_file,
                ..SimOptions::default()
            },
        )
        .expect("simulator");
        let (sim_end, daemon_end) = timed_pair();
        // Gated: the simulator talks to the gate, and the gate to the daemon.
        let (sim_end, gate) = if options.gated_results {
            let (gated_sim_end, gate_end) = timed_pair();
            (gated_sim_end, Some(spawn_gate(gate_end, sim_end)))
        } else {
            (sim_end, None)
        };
        let attaching = {
            let sim = sim.clone();
            thread::spawn(move || sim.attach(sim_end))
        };
        let port =
            SocketPort::attach(daemon_end, Path::new("pair"), &config).expect("daemon hand-off");
        join_within(attaching, "the simulator's hand-off").expect("simulator hand-off");
        let server =
            Server::new(&config, devices, Arc::new(port), options.poll).expect("daemon start");
        let stop = StopSignal::new().expect("stop signal");
        let counters = server.counters().clone();
        let server = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("daemon".into())
                .spawn(move || {
                    let mut server = server;
                    let result = server.run(&stop);
                    // Dropped here, so that joining this thread also proves the teardown.
                    drop(server);
                    result
                })
                .expect("daemon thread")
        };
        let gate =
            gate.map(|(gate, relay)| (gate.recv_timeout(TIMEOUT).expect("gate hand-off"), relay));
        Rig {
            sim,
            images,
            counters,
            stop,
            server: Some(server),
            gate,
            _dir: dir,
        }
    }

    pub fn memory(&self, zone: u32) -> &GuestMemoryMmap {
        self.sim.memory(zone).expect("zone of the configuration")
    }

    pub fn mmio(&self, device: BlkSpec, cpu: u32) -> MmioGuest<'_> {
        MmioGuest {
            cpu,
            ..MmioGuest::new(&self.sim, device.zone, device.addr)
        }
    }

    pub fn gate(&self) -> &ResultGate {
        &self.gate.as_ref().expect("a rig with gated results").0
    }

    /// Stops the daemon as SIGTERM does; returns what `Server::run` returned.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.stop.request();
        let result = self.join_server();
        self.sim.detach();
        result
    }

    /// The hypervisor side goes away; returns what `Server::run` returned.
    pub fn hang_up(mut self) -> Result<(), ServerError> {
        self.sim.detach();
        self.join_server()
    }

    fn join_server(&mut self) -> Result<(), ServerError> {
        let server = self.server.take().expect("joined once");
        join_within(server, "the daemon's stop")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.request();
        self.sim.detach();
        if let Some(server) = self.server.take() {
            // Best effort after a failure: a daemon that does not stop is left behind.
            let deadline = Instant::now() + TIMEOUT;
            while !server.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            if server.is_finished() {
                let _ = server.join();
            }
        }
        if let Some((_, relay)) = self.gate.take() {
            if relay.is_finished() {
                let _ = relay.join();
            }
        }
    }
}

/// A connected pair whose hand-off reads fail rather than wait forever.
fn timed_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socket pair");
    for stream in [&a, &b] {
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("socket timeout");
    }
    (a, b)
}

/// Joins `handle` if it finishes within [`TIMEOUT`]; panics naming `what` otherwise.
pub fn join_within<T>(handle: JoinHandle<T>, what: &str) -> T {
    let deadline = Instant::now() + TIMEOUT;
    while !handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A buffer area after the queues' (each queue has its own [`area`]).
pub fn buffer(n: u64) -> GuestAddress {
    GuestAddress(area(8).0 + n * 0x1_0000)
}

/// A buffer of `len` bytes at `addr` for the device to fill.
pub fn writable(addr: GuestAddress, len: u32) -> Buffer {
    Buffer {
        addr,
        len,
        device_writable: true,
    }
}

/// Waits for interrupt `irq` of the zone of `mmio`'s device and acknowledges it as Linux's
/// handler does.
pub fn take_interrupt(rig: &Rig, mmio: &MmioGuest, irq: u32, what: &str) -> TestResult {
    let interrupt = rig
        .sim
        .wait_interrupt(TIMEOUT)
        .ok_or_else(|| format!("no interrupt for {what}"))?;
    let configured = DeviceRes {
        target_zone: mmio.zone,
        irq_id: irq,
    };
    assert_eq!(interrupt, configured, "{what}");
    let status = mmio.acknowledge_interrupt()?;
    assert_eq!(status & 1, 1, "{what}: InterruptStatus {status:#x}");
    Ok(())
}

/// Waits for the next used chain of `queue`: (head, used length).
pub fn wait_used(queue: &mut DriverQueue, memory: &GuestMemoryMmap) -> TestResult<(u16, u32)> {
    let mut used = None;
    wait_until("a used-ring entry", || {
        used = queue.pop_used(memory)?;
        Ok(used.is_some())
    })?;
    Ok(used.expect("set when the wait ends"))
}

/// Two requests of 1000 and 3000 bytes (in [`buffer`]s 0 and 1) to the rng device behind
/// `mmio`, whose queue 0 is `queue` and live: each completes with interrupt `irq` and fills
/// its buffer with the next bytes of `content`, the device's source.
pub fn check_rng_requests(
    rig: &Rig,
    mmio: &MmioGuest,
    irq: u32,
    queue: &mut DriverQueue,
    content: &[u8],
) -> TestResult {
    let memory = rig.memory(mmio.zone);
    let mut start = 0;
    for (n, len) in [(0u64, 1000u32), (1, 3000)] {
        memory.write_slice(&vec![0xa5; len as usize], buffer(n))?;
        let head = queue.add(memory, &[writable(buffer(n), len)])?;
        mmio.notify(0)?;
        take_interrupt(rig, mmio, irq, "an rng request")?;
        assert_eq!(wait_used(queue, memory)?, (head, len));
        let mut filled = vec![0u8; len as usize];
        memory.read_slice(&mut filled, buffer(n))?;
        assert!(
            filled[..] == content[start..start + len as usize],
            "request {n}: not the source's bytes at {start}"
        );
        start += len as usize;
    }
    Ok(())
}

/// Polls `condition` until it holds; an error naming `what` after [`TIMEOUT`].
pub fn wait_until(what: &str, condition: impl FnMut() -> TestResult<bool>) -> TestResult {
    wait_until_within(TIMEOUT, what, condition)
}

/// [`wait_until`] with its own bound.
pub fn wait_until_within(
    bound: Duration,
    what: &str,
    mut condition: impl FnMut() -> TestResult<bool>,
) -> TestResult {
    let deadline = Instant::now() + bound;
    while !condition()? {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {bound:?} waiting for {what}").into());
        }
        thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// Stands between the daemon's FINISH_REQ eventfd and the simulator: while paused it holds
/// the signals back, so the simulator stops draining the result ring.
pub struct ResultGate {
    state: Mutex<GateState>,
    to_simulator: EventFd,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    /// FINISH_REQ signals seen while paused.
    held: u64,
}

impl ResultGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// Lets the signals through again, starting with the ones held back.
    pub fn resume(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.paused = false;
        if std::mem::take(&mut state.held) > 0 {
            self.to_simulator.write(1)?;
        }
        Ok(())
    }

    /// FINISH_REQ signals held back since the gate was paused.
    pub fn held(&self) -> u64 {
        self.lock().held
    }

    fn finish_signalled(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.paused {
            state.held += 1;
            Ok(())
        } else {
            self.to_simulator.write(1)
        }
    }
}

/// Relays the hand-off between `simulator` and `daemon`, keeping the daemon's FINISH_REQ
/// eventfd and giving the simulator one of the gate's instead. Once the simulator hangs up,
/// hangs up on the daemon too.
fn spawn_gate(
    simulator: UnixStream,
    daemon: UnixStream,
) -> (mpsc::Receiver<Arc<ResultGate>>, JoinHandle<io::Result<()>>) {
    let (sender, receiver) = mpsc::channel();
    let relay = thread::spawn(move || {
        let (hello, files): (serde_json::Value, Vec<Option<File>>) = handoff::receive(&simulator)?;
        let fds: Vec<RawFd> = files.iter().flatten().map(AsRawFd::as_raw_fd).collect();
        handoff::send(&daemon, &hello, &fds)?;
        let (reply, mut files): (DaemonReply, Vec<Option<File>>) = handoff::receive(&daemon)?;
        let mut finish = files
            .get_mut(reply.finish_fd)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other("the daemon sent no FINISH_REQ eventfd"))?;
        let gate = Arc::new(ResultGate {
            state: Mutex::new(GateState::default()),
            to_simulator: EventFd::new(EFD_NONBLOCK)?,
        });
        handoff::send(
            &simulator,
            &DaemonReply::new(0),
            &[gate.to_simulator.as_raw_fd()],
        )?;
        let _ = sender.send(gate.clone());
        const FINISH: u64 = 0;
        const HANGUP: u64 = 1;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            finish.as_raw_fd(),
            EpollEvent::new(EventSet::IN, FINISH),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            simulator.as_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, HANGUP),
        )?;
        let mut events = [EpollEvent::default(); 2];
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            for event in &events[..ready] {
                if event.data() == HANGUP {
                    return daemon.shutdown(std::net::Shutdown::Both);
                }
                // The daemon's eventfd is non-blocking: a counter already read is no error.
                match finish.read(&mut [0u8; 8]) {
                    Ok(_) => gate.finish_signalled()?,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error),
                }
            }
        }
    });
    (receiver, relay)
}

/// A virtio-blk driver with one queue that polls its used ring rather than waiting for the
/// simulator's interrupts, which are one queue for all devices: drivers running at once would
/// take each other's. It still takes every interrupt its device raises: after each request it
/// waits for InterruptStatus and acknowledges it, so each request raises exactly one.
pub struct PolledBlk<'a> {
    pub mmio: MmioGuest<'a>,
    pub queue: DriverQueue,
    pub memory: &'a GuestMemoryMmap,
    pub buffers: RequestBuffers,
}

impl<'a> PolledBlk<'a> {
    /// The largest payload of one request.
    pub const DATA_LEN: u32 = 64 * 1024;

    /// Resets and initializes the device behind `mmio` (VERSION_1 and FLUSH) with a queue of
    /// `queue_size` entries at `at`.
    pub fn start(mmio: MmioGuest<'a>, at: GuestAddress, queue_size: u16) -> TestResult<Self> {
        let memory = mmio.sim.memory(mmio.zone).ok_or("zone without RAM")?;
        let device = mmio.probe()?;
        if device != virtio_guest_driver::blk::DEVICE_ID {
            return Err(format!("device id {device} is not blk").into());
        }
        mmio.initialize(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH)?;
        let queue = mmio.setup_queue(0, queue_size, at)?;
        mmio.driver_ok()?;
        Ok(PolledBlk::new(mmio, queue, memory))
    }

    /// A driver for a device already set up with `queue`; buffers follow the rings.
    pub fn new(mmio: MmioGuest<'a>, queue: DriverQueue, memory: &'a GuestMemoryMmap) -> Self {
        let buffers = RequestBuffers::at(queue.layout.end(), Self::DATA_LEN);
        PolledBlk {
            mmio,
            queue,
            memory,
            buffers,
        }
    }

    /// Publishes a request and notifies the device; returns the chain's head.
    pub fn post(&mut self, request_type: u32, sector: u64, payload: Payload) -> TestResult<u16> {
        let chain = self
            .buffers
            .chain(self.memory, request_type, sector, payload)?;
        let head = self.queue.add(self.memory, &chain)?;
        self.mmio.notify(0)?;
        Ok(head)
    }

    /// Waits for chain `head` in the used ring; returns its used length.
    pub fn wait_used(&mut self, head: u16) -> TestResult<u32> {
        let mut used = None;
        wait_until("a used-ring entry", || {
            if let Some((used_head, len)) = self.queue.pop_used(self.memory)? {
                if used_head != head {
                    return Err(format!("chain {used_head} completed, {head} expected").into());
                }
                used = Some(len);
            }
            Ok(used.is_some())
        })?;
        Ok(used.expect("set when the wait ends"))
    }

    /// Waits until InterruptStatus shows a used buffer, then acknowledges what it shows.
    pub fn acknowledge_interrupt(&self) -> TestResult<u32> {
        let mut status = 0;
        wait_until("InterruptStatus bit 0", || {
            status = self.mmio.read(reg::INTERRUPT_STATUS)?;
            Ok(status & 1 == 1)
        })?;
        self.mmio.write(reg::INTERRUPT_ACK, status)?;
        Ok(status)
    }

    /// Waits for request `head` and its interrupt; returns the status byte and used length.
    pub fn complete(&mut self, head: u16) -> TestResult<(u8, u32)> {
        let len = self.wait_used(head)?;
        self.acknowledge_interrupt()?;
        Ok((self.buffers.status(self.memory)?, len))
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> TestResult<u8> {
        let head = self.post(BLK_T_OUT, sector, Payload::Out(data))?;
        Ok(self.complete(head)?.0)
    }

    pub fn read(&mut self, sector: u64, len: u32) -> TestResult<(u8, Vec<u8>)> {
        let head = self.post(BLK_T_IN, sector, Payload::In(len))?;
        let (status, _) = self.complete(head)?;
        Ok((status, self.buffers.data(self.memory, len)?))
    }
}

/// `len` bytes that differ with `seed`, so data landing in the wrong place shows.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(0x9e37_79b9)) as u8
        })
        .collect()
}

/// One write and read-back through `blk`, checked in guest memory and in `image`.
pub fn write_and_verify(blk: &mut PolledBlk, image: &Path, sector: u64, seed: u32) -> TestResult {
    let data = pattern(seed, 4096);
    assert_eq!(blk.write(sector, &data)?, BLK_S_OK, "write status");
    let (status, back) = blk.read(sector, 4096)?;
    assert_eq!(status, BLK_S_OK, "read status");
    assert!(back == data, "data read back differs (seed {seed})");
    assert!(
        image_bytes(image, sector, data.len()) == data,
        "{} does not hold the data written (seed {seed})",
        image.display()
    );
    Ok(())
}

/// An rng device's source in `dir` (`entropy.bin`), and the bytes it holds.
pub fn entropy_source(dir: &Path) -> TestResult<(PathBuf, Vec<u8>)> {
    let source = dir.join("entropy.bin");
    let content = pattern(9, 8192);
    std::fs::write(&source, &content)?;
    Ok((source, content))
}

/// `len` bytes of `image` at `sector`, as the host sees them.
pub fn image_bytes(image: &Path, sector: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; len];
    File::open(image)
        .and_then(|file| file.read_exact_at(&mut bytes, sector * SECTOR))
        .unwrap_or_else(|error| panic!("reading {}: {error}", image.display()));
    bytes
}

static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Log lines kept per test binary.
const MAX_LINES: usize = 20_000;

/// Prints the daemon's log through the test harness (shown for failing tests) and keeps its
/// warnings and errors for [`logged`].
struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // A daemon stuck in a loop can log millions of lines; keep the first ones.
        static LINES: AtomicUsize = AtomicUsize::new(0);
        match LINES.fetch_add(1, Ordering::Relaxed) {
            count if count < MAX_LINES => {}
            MAX_LINES => {
                eprintln!("(log capture: further lines dropped)");
                return;
            }
            _ => return,
        }
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        eprintln!("{line}");
        if record.level() <= log::Level::Warn {
            WARNINGS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
        }
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static CAPTURE: Capture = Capture;
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&CAPTURE).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    });
}

/// Whether a warning or error containing every one of `parts` was logged, by any test of
/// this binary (tests run in parallel, so pick parts only one test can cause).
pub fn logged(parts: &[&str]) -> bool {
    logged_count(parts) > 0
}

/// How many warnings and errors containing every one of `parts` were logged, as [`logged`].
pub fn logged_count(parts: &[&str]) -> usize {
    WARNINGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|line| parts.iter().all(|part| line.contains(part)))
        .count()
}
