//! hvisor's half of the `virtio_bridge` page: the request producer (what
//! `mmio_virtio_handler` does on a trapped access) and the result-ring consumer (what
//! `hv_virtio_inject_irq` does on `HVISOR_FINISH_REQ`). Only the page layout comes from
//! `hvisor_bridge::abi`; the protocol steps are written here from docs/hvisor-abi.md sections 3 to 5.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use hvisor_bridge::abi::{BRIDGE_MAP_SIZE, DeviceRes, MAX_CPUS, MAX_REQ, VirtioBridge};

/// One trapped access, as hvisor fills a `device_req` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub cpu: u64,
    pub zone: u32,
    pub address: u64,
    pub size: u64,
    pub value: u64,
    pub is_write: bool,
    pub need_interrupt: bool,
}

/// The bridge page, created here and shared with the daemon as a memfd.
pub struct Bridge {
    page: NonNull<VirtioBridge>,
    memfd: File,
    /// hvisor's `req_lock`: vCPUs of several CPUs may publish at once.
    producer: Mutex<()>,
    wakeup: OwnedFd,
}

// SAFETY: the page is only accessed through `VirtioBridge`'s atomics, which are safe to share
// between threads; the mapping lives as long as `Bridge`.
unsafe impl Send for Bridge {}
// SAFETY: as above; the producer steps that must not interleave are serialised by `producer`.
unsafe impl Sync for Bridge {}

impl Drop for Bridge {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference outlives `self`.
        unsafe { libc::munmap(self.page.as_ptr().cast(), BRIDGE_MAP_SIZE) };
    }
}

/// Waiting for a synchronous answer ended without one: `keep_waiting` said to stop.
#[derive(Debug)]
pub struct GaveUp;

impl Bridge {
    /// A zero-filled page in a fresh memfd; `wakeup` is the eventfd standing in for the
    /// wake-up IRQ that hvisor injects into the root zone.
    pub fn new(wakeup: OwnedFd) -> io::Result<Self> {
        let memfd = memfd("hvisor-bridge", BRIDGE_MAP_SIZE as u64)?;
        // SAFETY: a fresh shared mapping of a file we own, of the file's length; the result
        // is checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BRIDGE_MAP_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A page-aligned mapping of a zero-filled file is a valid all-zero `VirtioBridge`
        // (atomics of zero), which is the state hvisor.ko hands over.
        let page = NonNull::new(raw.cast()).expect("mmap returned NULL");
        Ok(Self {
            page,
            memfd,
            producer: Mutex::new(()),
            wakeup,
        })
    }

    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    pub fn wakeup_fd(&self) -> &OwnedFd {
        &self.wakeup
    }

    fn page(&self) -> &VirtioBridge {
        // SAFETY: `page` points at a live, aligned mapping of at least
        // size_of::<VirtioBridge>() bytes for the lifetime of `self`.
        unsafe { self.page.as_ref() }
    }

    /// The completion counter of `cpu`, read before publishing a synchronous request.
    pub fn cfg_flag(&self, cpu: u64) -> u64 {
        let flag = self.page().cfg_flags[cpu as usize].load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        flag
    }

    /// Publishes `access` in the request ring in hvisor's order: fill the slot, release
    /// fence, store `req_rear`; then SeqCst fence, load `need_wakeup`, and wake the daemon if
    /// it announced it is going to sleep. Waits (with hvisor's doubling backoff) while the
    /// ring is full.
    pub fn publish(&self, access: &Access) {
        assert!((access.cpu as usize) < MAX_CPUS, "cpu id out of range");
        let page = self.page();
        let mut backoff = 1u32;
        let mut guard = self
            .producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rear = loop {
            let front = page.req_front.load(Ordering::Relaxed);
            let rear = page.req_rear.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if (rear + 1) % MAX_REQ != front {
                break rear;
            }
            drop(guard);
            for _ in 0..backoff {
                std::hint::spin_loop();
            }
            // Unlike hvisor's physical CPU, our vCPU thread shares L1's CPUs with the daemon:
            // give them up so the daemon can drain the ring.
            std::thread::yield_now();
            backoff = (backoff * 2).min(1024);
            guard = self
                .producer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        };
        let slot = &page.req_list[(rear % MAX_REQ) as usize];
        slot.src_cpu.store(access.cpu, Ordering::Relaxed);
        slot.address.store(access.address, Ordering::Relaxed);
        slot.size.store(access.size, Ordering::Relaxed);
        slot.value.store(access.value, Ordering::Relaxed);
        slot.src_zone.store(access.zone, Ordering::Relaxed);
        slot.is_write
            .store(u8::from(access.is_write), Ordering::Relaxed);
        slot.need_interrupt
            .store(u8::from(access.need_interrupt), Ordering::Relaxed);
        fence(Ordering::Release);
        page.req_rear.store((rear + 1) % MAX_REQ, Ordering::Relaxed);
        drop(guard);

        // The Dekker half that pairs with the daemon's "need_wakeup = 1; fence; load rear":
        // with a full fence on both sides one of us sees the other's store.
        fence(Ordering::SeqCst);
        if page.need_wakeup.load(Ordering::Relaxed) == 1 {
            signal_eventfd(&self.wakeup);
        }
    }

    /// Waits until the daemon has answered `cpu`'s synchronous request (its `cfg_flags` entry
    /// moved away from `before`) and returns the new flag and `cfg_values[cpu]`. hvisor spins
    /// forever on a CPU of its own; our vCPU threads share L1's CPUs with the daemon and with
    /// each other, so we spin briefly, then poll every few microseconds asleep, and every 10 ms
    /// ask `keep_waiting` whether waiting still makes sense.
    pub fn wait_answer(
        &self,
        cpu: u64,
        before: u64,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<(u64, u64), GaveUp> {
        let page = self.page();
        let mut spins = 0u32;
        let mut next_check = Instant::now() + Duration::from_millis(10);
        loop {
            let flag = page.cfg_flags[cpu as usize].load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if flag != before {
                return Ok((flag, page.cfg_values[cpu as usize].load(Ordering::Relaxed)));
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
                continue;
            }
            std::thread::sleep(Duration::from_micros(20));
            if Instant::now() >= next_check {
                if !keep_waiting() {
                    return Err(GaveUp);
                }
                next_check = Instant::now() + Duration::from_millis(10);
            }
        }
    }

    /// Takes every entry off the result ring, in order, as `hv_virtio_inject_irq` does:
    /// indices, acquire fence, entry, release fence, advance `res_front`.
    pub fn drain_results(&self, mut inject: impl FnMut(DeviceRes)) -> usize {
        let page = self.page();
        let mut taken = 0;
        loop {
            let front = page.res_front.load(Ordering::Relaxed);
            let rear = page.res_rear.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if front == rear {
                return taken;
            }
            let slot = &page.res_list[(front % MAX_REQ) as usize];
            let result = DeviceRes {
                target_zone: slot.target_zone.load(Ordering::Relaxed),
                irq_id: slot.irq_id.load(Ordering::Relaxed),
            };
            fence(Ordering::Release);
            page.res_front
                .store((front + 1) % MAX_REQ, Ordering::Relaxed);
            inject(result);
            taken += 1;
        }
    }
}

/// A memfd of `size` bytes (zero-filled, pages allocated on first touch).
pub fn memfd(name: &str, size: u64) -> io::Result<File> {
    let name = std::ffi::CString::new(name).expect("memfd name has no NUL");
    // SAFETY: `name` is a valid C string; the returned descriptor is checked and then owned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and then owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd (cannot block: the counter would have to reach 2^64 - 1).
pub fn signal_eventfd(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to a descriptor we hold.
    let written = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    assert_eq!(written, 8, "eventfd write failed");
}

/// Blocks until the eventfd's counter is non-zero and resets it; `false` on an error. Works
/// on non-blocking eventfds too (the daemon creates its FINISH eventfd with EFD_NONBLOCK).
pub fn wait_eventfd(fd: &OwnedFd) -> bool {
    let mut count = [0u8; 8];
    loop {
        // SAFETY: reads at most 8 bytes into a live buffer from a descriptor we hold.
        let got = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
        if got == 8 {
            return true;
        }
        if got >= 0 {
            return false;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let mut poll = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polls one live descriptor; errors (EINTR) just lead to another read.
                unsafe { libc::poll(&raw mut poll, 1, -1) };
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waiting_works_on_a_non_blocking_eventfd() {
        // SAFETY: plain syscall; the result is checked and then owned.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        let signaller = {
            let fd = fd.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                signal_eventfd(&fd);
            })
        };
        assert!(wait_eventfd(&fd));
        signaller.join().unwrap();
    }

    /// Plays the daemon's side by hand to check the producer's slot contents, the wake-up
    /// rule and the answer handshake.
    #[test]
    fn publish_fills_the_slot_and_wakes_only_a_sleeping_consumer() {
        let wake = eventfd().unwrap();
        let bridge = Arc::new(Bridge::new(wake).unwrap());
        let access = Access {
            cpu: 3,
            zone: 1,
            address: 0xa00_0050,
            size: 4,
            value: 0,
            is_write: true,
            need_interrupt: true,
        };
        bridge.publish(&access);
        let page = bridge.page();
        assert_eq!(page.req_rear.load(Ordering::Relaxed), 1);
        let slot = &page.req_list[0];
        assert_eq!(slot.address.load(Ordering::Relaxed), 0xa00_0050);
        assert_eq!(slot.src_cpu.load(Ordering::Relaxed), 3);
        assert_eq!(slot.src_zone.load(Ordering::Relaxed), 1);
        assert_eq!(slot.need_interrupt.load(Ordering::Relaxed), 1);

        page.need_wakeup.store(1, Ordering::Relaxed);
        bridge.publish(&Access {
            need_interrupt: false,
            is_write: false,
            ..access
        });
        assert!(wait_eventfd(bridge.wakeup_fd()));

        let before = bridge.cfg_flag(3);
        let daemon = {
            let bridge = bridge.clone();
            std::thread::spawn(move || {
                let page = bridge.page();
                page.cfg_values[3].store(0x7472_6976, Ordering::Relaxed);
                fence(Ordering::Release);
                page.cfg_flags[3].fetch_add(1, Ordering::Relaxed);
            })
        };
        assert_eq!(
            bridge.wait_answer(3, before, || true).unwrap(),
            (before + 1, 0x7472_6976)
        );
        daemon.join().unwrap();
    }

    #[test]
    fn results_drain_in_order_and_wrap() {
        let bridge = Bridge::new(eventfd().unwrap()).unwrap();
        let page = bridge.page();
        let mut seen = Vec::new();
        for round in 0..3u32 {
            for i in 0..20u32 {
                let rear = page.res_rear.load(Ordering::Relaxed);
                page.res_list[rear as usize]
                    .irq_id
                    .store(round * 100 + i, Ordering::Relaxed);
                page.res_list[rear as usize]
                    .target_zone
                    .store(1, Ordering::Relaxed);
                page.res_rear.store((rear + 1) % MAX_REQ, Ordering::Release);
            }
            assert_eq!(bridge.drain_results(|r| seen.push(r.irq_id)), 20);
        }
        let expected: Vec<u32> = (0..3)
            .flat_map(|round| (0..20).map(move |i| round * 100 + i))
            .collect();
        assert_eq!(seen, expected);
    }
}
