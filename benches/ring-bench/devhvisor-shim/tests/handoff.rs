//! The shim's `/dev/hvisor` against the simulator's hypervisor side, through its entry points as
//! the C library's callers reach them: the hand-off at open, each ioctl, both kinds of mapping,
//! the wake-up eventfd, FINISH, and the errors for what it does not serve.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hvisor_sim::{SimOptions, Simulator};
use hvisor_transport::abi::{
    BRIDGE_MAP_SIZE, DeviceReq, HVISOR_FINISH_REQ, HVISOR_INIT_VIRTIO, HVISOR_SET_EVENTFD,
};
use hvisor_transport::config::VirtioConfig;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: usize = 1 << 20;
const CONFIG: &str = r#"{ "zones": [ { "id": 1,
    "memory_region": [ { "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x100000" } ],
    "devices": [ { "type": "blk", "addr": "0xa003c00", "len": "0x200", "irq": 78,
                   "img": "unused.img", "status": "enable" } ] } ] }"#;
/// `need_wakeup` in `struct virtio_bridge`.
const NEED_WAKEUP: usize = 2129;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn ioctl(fd: i32, request: u64, arg: usize) -> i32 {
    // SAFETY: the shim's ioctl with a request of hvisor.ko's and an integer argument.
    unsafe { devhvisor_shim::ioctl(fd, request as libc::c_ulong, arg) }
}

fn map(fd: i32, len: usize, offset: i64) -> *mut libc::c_void {
    // SAFETY: a fresh shared mapping chosen by the kernel; nothing else is at that address.
    unsafe {
        devhvisor_shim::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset,
        )
    }
}

#[test]
fn dev_hvisor_is_served_from_the_handoff_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hv.sock");
    let config = VirtioConfig::parse(CONFIG, Path::new("test.json")).unwrap();
    let sim = Simulator::new(&config, SimOptions::default()).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    // SAFETY: the only test of this binary, and no thread of it has started yet.
    unsafe { std::env::set_var("HVISOR_SHIM_SOCKET", &socket) };
    let attach = std::thread::spawn({
        let sim = sim.clone();
        move || {
            let (stream, _) = listener.accept().unwrap();
            sim.attach(stream)
        }
    });

    // SAFETY: a NUL-terminated path.
    let fd = unsafe { devhvisor_shim::open(c"/dev/hvisor".as_ptr(), libc::O_RDWR, 0) };
    assert!(fd >= 0, "open: errno {}", errno());
    attach.join().unwrap().unwrap();
    assert_eq!(ioctl(fd, HVISOR_INIT_VIRTIO, 0), 0);

    // The daemon's eventfd becomes the one the hypervisor side writes.
    let wakeup = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(
        ioctl(fd, HVISOR_SET_EVENTFD, wakeup.as_raw_fd() as usize),
        0
    );

    // Offset 0 is the bridge page the simulator sees.
    let bridge = map(fd, BRIDGE_MAP_SIZE, 0);
    assert_ne!(bridge, libc::MAP_FAILED, "errno {}", errno());
    let bridge = bridge.cast::<u8>();
    // SAFETY: inside the page mapped above; a byte the simulator reads with a fence.
    unsafe { bridge.add(NEED_WAKEUP).write_volatile(1) };
    let request = DeviceReq {
        src_cpu: 0,
        address: 0xa00_3c00,
        size: 4,
        value: 0,
        src_zone: 1,
        is_write: false,
        need_interrupt: false,
    };
    assert!(sim.publish_raw(&request));
    assert_eq!(
        wakeup.read().unwrap(),
        1,
        "the wake-up reached the daemon's eventfd"
    );
    // SAFETY: `req_rear` at offset 4 of the mapped page.
    let rear = unsafe { bridge.add(4).cast::<u32>().read_volatile() };
    assert_eq!(rear, 1);

    // Offset zone0_ipa is that zone's RAM.
    let ram = map(fd, RAM_SIZE, RAM as i64);
    assert_ne!(ram, libc::MAP_FAILED, "errno {}", errno());
    // SAFETY: inside the RAM window mapped above.
    unsafe { ram.cast::<u8>().add(0x1234).write_volatile(0x5a) };
    let byte: u8 = sim
        .memory(1)
        .unwrap()
        .read_obj(GuestAddress(RAM + 0x1234))
        .unwrap();
    assert_eq!(byte, 0x5a);

    // FINISH reaches the simulator's result thread.
    assert_eq!(ioctl(fd, HVISOR_FINISH_REQ, 0), 0);
    let started = Instant::now();
    while sim.stats.finish_signals.load(Ordering::Relaxed) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no FINISH seen");
        std::thread::sleep(Duration::from_millis(1));
    }

    // What hvisor.ko serves and a hand-off does not: refused, not faked.
    assert_eq!(ioctl(fd, 0x8008_0105, 0), -1, "HVISOR_ZONE_LIST");
    assert_eq!(errno(), libc::ENOTTY);
    assert_eq!(map(fd, 4096, 0x6000_0000), libc::MAP_FAILED);
    assert_eq!(errno(), libc::EINVAL);
    assert_eq!(
        map(fd, 2 * RAM_SIZE, RAM as i64),
        libc::MAP_FAILED,
        "larger than the window"
    );

    // SAFETY: the shim's descriptor, closed once.
    assert_eq!(unsafe { devhvisor_shim::close(fd) }, 0);
    assert_eq!(ioctl(fd, HVISOR_INIT_VIRTIO, 0), -1);
    assert_eq!(errno(), libc::EBADF);
    sim.detach();
}
