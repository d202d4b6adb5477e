//! The hand-off target: any message as the hypervisor's hello (docs/hypervisor-socket.md),
//! read by `HypervisorHello::from_json` and then checked against a fixed set of descriptors
//! by `Handoff::check`, exactly as the daemon does before it replies.
//!
//! The descriptors sent with every message: 0 a bridge-sized memfd, 1 an eventfd, 2 a 64 KiB
//! memfd, 3 a pipe, 4 an empty memfd, 5 /dev/null. An accepted hand-off must be safe to map
//! (checked here with fstat, independently of the checker); a refused one must say why.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;
use std::sync::OnceLock;

use hvisor_transport::config::MemoryRegion;
use hvisor_transport::handoff::{Handoff, HypervisorHello};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const PAGE: u64 = 4096;
/// The zone RAM the daemon wants a window for.
const REGION: (u32, MemoryRegion) = (
    1,
    MemoryRegion {
        zone0_ipa: 0x8000,
        zonex_ipa: 0,
        size: 0x4000,
    },
);

fn memfd(size: u64) -> File {
    // SAFETY: the name is NUL terminated; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-handoff".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("memfd size");
    file
}

/// The descriptors of every message, opened once; each input gets duplicates.
fn descriptors() -> &'static [File] {
    static FILES: OnceLock<Vec<File>> = OnceLock::new();
    FILES.get_or_init(|| {
        let eventfd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        // SAFETY: a fresh duplicate that the File alone owns.
        let eventfd = unsafe { File::from_raw_fd(eventfd.try_clone().expect("dup").into_raw_fd()) };
        let mut pipe = [-1; 2];
        // SAFETY: `pipe` has room for the two descriptors; the result is checked.
        let created = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(created, 0, "pipe2");
        // SAFETY: fresh descriptors that nothing else owns; the write end is closed at once.
        let (pipe, _) = unsafe { (File::from_raw_fd(pipe[0]), File::from_raw_fd(pipe[1])) };
        vec![
            memfd(PAGE),
            eventfd,
            memfd(0x10000),
            pipe,
            memfd(0),
            File::open("/dev/null").expect("/dev/null"),
        ]
    })
}

pub fn handoff_hello(data: &[u8]) {
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let hello = match HypervisorHello::from_json(&message) {
        Ok(hello) => hello,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let files: Vec<Option<File>> = descriptors()
        .iter()
        .map(|file| Some(file.try_clone().expect("dup")))
        .collect();
    let handoff = match Handoff::check(&hello, files, &[REGION]) {
        Ok(handoff) => handoff,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    assert!(
        handoff.bridge.metadata().expect("fstat").len() >= PAGE,
        "a bridge smaller than a page accepted"
    );
    let covered = handoff.windows.iter().any(|window| {
        window.zone == REGION.0
            && window.zone0_ipa <= REGION.1.zone0_ipa
            && window.zone0_ipa + window.size >= REGION.1.zone0_ipa + REGION.1.size
    });
    assert!(
        covered,
        "no window covers the zone's RAM, yet the hand-off was accepted"
    );
    for window in &handoff.windows {
        let metadata = window.file.metadata().expect("fstat");
        assert!(
            !metadata.file_type().is_fifo() && !metadata.file_type().is_char_device(),
            "a window on a {:?} accepted",
            metadata.file_type()
        );
        assert_eq!(window.offset % PAGE, 0, "unaligned window offset accepted");
        assert!(window.size > 0);
        assert!(
            window
                .offset
                .checked_add(window.size)
                .is_some_and(|end| end <= metadata.len()),
            "window {}+{} past the end of its {}-byte file accepted",
            window.offset,
            window.size,
            metadata.len()
        );
    }
}
