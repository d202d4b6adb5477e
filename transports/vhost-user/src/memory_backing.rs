//! Guest memory files from a vhost-user frontend: checked when they arrive, watched while
//! they are mapped.
//!
//! A file mapping faults with SIGBUS where the file has no page behind it, and vm-memory maps
//! whatever size it is told without looking at the file. So a memory region larger than its
//! file, or starting past its end, is refused when it arrives ([`RegionFile::check_covers`]).
//!
//! The frontend can still shrink the file later. Files sealed against shrinking
//! (F_SEAL_SHRINK, as QEMU's memory-backend-memfd seals them by default) cannot; the others
//! are watched ([`FaultWatch`]): a SIGBUS handler recognises an access beyond the end of a
//! watched file, maps an anonymous zero page over the faulting page so the access completes
//! (a read sees zeroes, a write goes nowhere), records the fault and wakes the connection's
//! relay, which logs it and disconnects that frontend. Any other SIGBUS gets the handler that
//! was installed before (by default: the process dies, as it would without this).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// A file identity as both fstat and /proc/self/maps give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileKey {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
}

impl std::fmt::Display for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {}:{} inode {}",
            self.major, self.minor, self.inode
        )
    }
}

/// What the daemon needs to know about a region's file before it maps it.
#[derive(Clone, Copy, Debug)]
pub struct RegionFile {
    pub key: FileKey,
    /// Only regular files (memfd, tmpfs, hugetlbfs) have a size that bounds the mapping;
    /// other kinds are left to mmap.
    pub regular: bool,
    pub size: u64,
    /// F_SEAL_SHRINK is set: the file can never get shorter.
    pub sealed_against_shrinking: bool,
}

/// A region that reaches past the end of its file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{size:#x} bytes at file offset {offset:#x} reach past the end of its file ({file_size:#x} bytes)"
)]
pub struct Uncovered {
    pub size: u64,
    pub offset: u64,
    pub file_size: u64,
}

impl RegionFile {
    pub fn inspect(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: fstat writes a stat into the zeroed local, which outlives the call.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: see above; `fd` is a live descriptor for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_GET_SEALS only reads the file's seals; files that cannot have seals
        // answer EINVAL, which reads as "not sealed".
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        Ok(RegionFile {
            key: FileKey {
                major: libc::major(stat.st_dev),
                minor: libc::minor(stat.st_dev),
                inode: stat.st_ino,
            },
            regular: stat.st_mode & libc::S_IFMT == libc::S_IFREG,
            size: u64::try_from(stat.st_size).unwrap_or(0),
            sealed_against_shrinking: seals >= 0 && seals & libc::F_SEAL_SHRINK != 0,
        })
    }

    /// Whether `size` bytes from `offset` all lie within the file, so none of them can fault.
    pub fn check_covers(&self, offset: u64, size: u64) -> Result<(), Uncovered> {
        let covered = offset.checked_add(size).is_some_and(|end| end <= self.size);
        if self.regular && !covered {
            return Err(Uncovered {
                size,
                offset,
                file_size: self.size,
            });
        }
        Ok(())
    }

    /// Whether the file can later get shorter than the mapping, so it must be watched.
    pub fn may_shrink(&self) -> bool {
        self.regular && !self.sealed_against_shrinking
    }
}

/// Files watched at once, over all connections: a frontend gets at most 8 regions per table
/// and 509 memory slots, usually all in one or a few files.
const WATCH_SLOTS: usize = 1024;
const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;
const NO_FAULT: u64 = u64::MAX;

/// One watched file. The signal handler reads it without locks: `state` is stored with
/// Release after the other fields, and loaded with Acquire before them.
struct WatchSlot {
    state: AtomicU8,
    device: AtomicU64,
    inode: AtomicU64,
    owner: AtomicU64,
    /// File offset of the first access past the end, or `NO_FAULT`.
    fault_offset: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: WatchSlot = WatchSlot {
    state: AtomicU8::new(FREE),
    device: AtomicU64::new(0),
    inode: AtomicU64::new(0),
    owner: AtomicU64::new(0),
    fault_offset: AtomicU64::new(NO_FAULT),
};
static SLOTS: [WatchSlot; WATCH_SLOTS] = [EMPTY_SLOT; WATCH_SLOTS];
/// Readable after the handler recovered from a fault; -1 until installed.
static FAULT_EVENT: AtomicI32 = AtomicI32::new(-1);
/// /proc/self/maps, opened ahead so the handler needs no new descriptor (there may be none
/// left); -1 until installed.
static MAPS: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS action before ours, for faults that are not ours to recover.
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicI32 = AtomicI32::new(0);
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

fn device_word(key: FileKey) -> u64 {
    u64::from(key.major) << 32 | u64::from(key.minor)
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot watch guest memory files for truncation ({0}); seal the file against \
         shrinking (F_SEAL_SHRINK) to use it"
    )]
    Install(io::Error),
    #[error("{WATCH_SLOTS} guest memory files are watched already")]
    Full,
}

/// A fault the handler recovered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub file: FileKey,
    /// Offset in the file of the first access past its end.
    pub offset: u64,
}

/// The guest memory files of one frontend connection that may shrink under their mappings.
/// Dropping it stops watching them: drop it only once nothing accesses their mappings any
/// more (the connection's worker threads have been joined).
pub struct FaultWatch {
    owner: u64,
    slots: Mutex<Vec<(usize, FileKey)>>,
}

impl FaultWatch {
    pub fn new() -> Self {
        FaultWatch {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            slots: Mutex::new(Vec::new()),
        }
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<(usize, FileKey)>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches `file` from now on; call it before the file is mapped. Installs the SIGBUS
    /// handler on first use; if that fails, the file cannot be watched, and a caller should
    /// refuse it rather than risk the fault.
    pub fn watch(&self, file: &RegionFile) -> Result<(), WatchError> {
        install().map_err(WatchError::Install)?;
        let mut slots = self.lock_slots();
        if slots.iter().any(|&(_, key)| key == file.key) {
            return Ok(());
        }
        let index = SLOTS
            .iter()
            .position(|slot| {
                slot.state
                    .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
            .ok_or(WatchError::Full)?;
        let slot = &SLOTS[index];
        slot.device.store(device_word(file.key), Ordering::Relaxed);
        slot.inode.store(file.key.inode, Ordering::Relaxed);
        slot.owner.store(self.owner, Ordering::Relaxed);
        slot.fault_offset.store(NO_FAULT, Ordering::Relaxed);
        slot.state.store(LIVE, Ordering::Release);
        slots.push((index, file.key));
        Ok(())
    }

    /// The first fault recovered in one of this connection's files, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.lock_slots().iter().find_map(|&(index, file)| {
            let offset = SLOTS[index].fault_offset.load(Ordering::Acquire);
            (offset != NO_FAULT).then_some(Fault { file, offset })
        })
    }

    /// Readable once a fault was recovered in any watched file (of any connection; see
    /// [`Self::fault`]). Drain it with [`drain_fault_event`]. -1, which poll skips, while
    /// nothing was ever watched.
    pub fn fault_event(&self) -> RawFd {
        FAULT_EVENT.load(Ordering::Relaxed)
    }
}

impl Drop for FaultWatch {
    fn drop(&mut self) {
        for &(index, _) in self.lock_slots().iter() {
            SLOTS[index].state.store(FREE, Ordering::Release);
        }
    }
}

/// Resets the fault event after a wake-up.
pub fn drain_fault_event() {
    let mut count = 0u64;
    // SAFETY: reads at most 8 bytes into a live local; the eventfd is non-blocking.
    unsafe {
        libc::read(
            FAULT_EVENT.load(Ordering::Relaxed),
            (&raw mut count).cast(),
            size_of::<u64>(),
        )
    };
}

/// Installs the handler once per process; a failure is returned to every caller.
fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Option<i32>> = OnceLock::new();
    let failure = INSTALLED.get_or_init(|| {
        install_handler()
            .err()
            .map(|error| error.raw_os_error().unwrap_or(libc::EIO))
    });
    match *failure {
        None => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn install_handler() -> io::Result<()> {
    // SAFETY: creates a descriptor this module owns for the rest of the process.
    let event = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if event < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: opens a descriptor this module owns for the rest of the process.
    let maps = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if maps < 0 {
        let error = io::Error::last_os_error();
        // SAFETY: closes the eventfd made above, which nothing else knows of.
        unsafe { libc::close(event) };
        return Err(error);
    }
    FAULT_EVENT.store(event, Ordering::Relaxed);
    MAPS.store(maps, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid "default" action to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: initialises the mask inside the local.
    unsafe { libc::sigemptyset(&raw mut action.sa_mask) };
    // SAFETY: as above.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; `on_sigbus` is async-signal-safe (see it).
    if unsafe { libc::sigaction(libc::SIGBUS, &raw const action, &raw mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    PREVIOUS_HANDLER.store(previous.sa_sigaction, Ordering::Relaxed);
    PREVIOUS_FLAGS.store(previous.sa_flags, Ordering::Relaxed);
    Ok(())
}

/// The SIGBUS handler. Async-signal-safe: atomics, pread, mmap, write, sigaction only; no
/// allocation, no lock.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR && recover(address) {
        return;
    }
    pass_on(signal, info, context);
}

/// Maps a zero page over `address` if it lies in a shared mapping of a watched file; records
/// the fault and wakes the relays.
fn recover(address: usize) -> bool {
    let Some(mapping) = find_mapping(address) else {
        return false;
    };
    if !mapping.shared {
        return false;
    }
    let device = device_word(mapping.file);
    let Some(slot) = SLOTS.iter().find(|slot| {
        slot.state.load(Ordering::Acquire) == LIVE
            && slot.device.load(Ordering::Relaxed) == device
            && slot.inode.load(Ordering::Relaxed) == mapping.file.inode
    }) else {
        return false;
    };
    if !map_zero_page(address, mapping.start, mapping.end) {
        return false;
    }
    let offset = mapping.offset + (address - mapping.start) as u64;
    let _ =
        slot.fault_offset
            .compare_exchange(NO_FAULT, offset, Ordering::Release, Ordering::Relaxed);
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live local to the module's eventfd.
    unsafe {
        libc::write(
            FAULT_EVENT.load(Ordering::Relaxed),
            (&raw const one).cast(),
            size_of::<u64>(),
        )
    };
    true
}

/// Replaces the page under `address` with anonymous memory. Huge-page mappings can only be
/// split at their page size, so larger aligned sizes are tried until one fits the mapping.
fn map_zero_page(address: usize, start: usize, end: usize) -> bool {
    const PAGE_SIZES: [usize; 3] = [4 << 10, 2 << 20, 1 << 30];
    PAGE_SIZES.iter().any(|&size| {
        let page = address & !(size - 1);
        if page < start || page + size > end {
            return false;
        }
        // SAFETY: the range lies inside a mapping of a guest memory file whose pages there
        // no longer exist; MAP_FIXED replaces exactly that range, which stays owned by the
        // same GuestMemoryMmap region and is unmapped with it.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        mapped != libc::MAP_FAILED
    })
}

/// Hands a SIGBUS we do not recover to the action installed before ours.
fn pass_on(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let handler = PREVIOUS_HANDLER.load(Ordering::Relaxed);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Ignoring a fault would re-run the faulting access forever: restore the default
        // and return, so the access faults again and the process dies as it would have.
        // SAFETY: a zeroed sigaction with SIG_DFL is the default action.
        let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
        default.sa_sigaction = libc::SIG_DFL;
        // SAFETY: passes a live local; sigaction is async-signal-safe.
        unsafe { libc::sigaction(signal, &raw const default, std::ptr::null_mut()) };
        return;
    }
    if PREVIOUS_FLAGS.load(Ordering::Relaxed) & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so this is its
        // three-argument handler, called with what the kernel gave us.
        let previous: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        previous(signal, info, context);
    } else {
        // SAFETY: the previous action is a one-argument handler.
        let previous: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        previous(signal);
    }
}

/// One line of /proc/self/maps, as far as the handler needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    shared: bool,
    offset: u64,
    file: FileKey,
}

/// The mapping that contains `address`, read from /proc/self/maps with no allocation.
fn find_mapping(address: usize) -> Option<Mapping> {
    let maps = MAPS.load(Ordering::Relaxed);
    let mut scanner = MapsScanner::new(address);
    let mut chunk = [0u8; 512];
    let mut position: libc::off_t = 0;
    loop {
        // SAFETY: reads into a live local buffer of the given length. pread from 0 makes
        // the kernel generate the file afresh, so the descriptor can be shared.
        let read = unsafe { libc::pread(maps, chunk.as_mut_ptr().cast(), chunk.len(), position) };
        if read <= 0 {
            return scanner.finish();
        }
        position += read as libc::off_t;
        if let Some(mapping) = scanner.feed(&chunk[..read as usize]) {
            return Some(mapping);
        }
    }
}

/// Finds the /proc/self/maps line of one address in a byte stream fed in pieces, keeping only
/// the start of the current line (the fields before the path).
struct MapsScanner {
    address: usize,
    line: [u8; 128],
    length: usize,
}

impl MapsScanner {
    fn new(address: usize) -> Self {
        MapsScanner {
            address,
            line: [0; 128],
            length: 0,
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Option<Mapping> {
        for &byte in bytes {
            if byte == b'\n' {
                let found = self.end_line();
                if found.is_some() {
                    return found;
                }
            } else if self.length < self.line.len() {
                self.line[self.length] = byte;
                self.length += 1;
            }
        }
        None
    }

    /// A last line without a newline.
    fn finish(&mut self) -> Option<Mapping> {
        self.end_line()
    }

    fn end_line(&mut self) -> Option<Mapping> {
        let line = &self.line[..self.length];
        self.length = 0;
        parse_maps_line(line).filter(|m| m.start <= self.address && self.address < m.end)
    }
}

/// `start-end perms offset major:minor inode [path]`, numbers in hex but the inode.
fn parse_maps_line(line: &[u8]) -> Option<Mapping> {
    let mut fields = line.split(|&b| b == b' ').filter(|field| !field.is_empty());
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let device = fields.next()?;
    let inode = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let colon = device.iter().position(|&b| b == b':')?;
    Some(Mapping {
        start: usize::try_from(parse_number(&range[..dash], 16)?).ok()?,
        end: usize::try_from(parse_number(&range[dash + 1..], 16)?).ok()?,
        shared: perms.get(3) == Some(&b's'),
        offset: parse_number(offset, 16)?,
        file: FileKey {
            major: u32::try_from(parse_number(&device[..colon], 16)?).ok()?,
            minor: u32::try_from(parse_number(&device[colon + 1..], 16)?).ok()?,
            inode: parse_number(inode, 10)?,
        },
    })
}

fn parse_number(digits: &[u8], radix: u32) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| {
        let digit = char::from(digit).to_digit(radix)?;
        value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    const MAPS_TEXT: &str = "\
558e71203000-558e71205000 r--p 00000000 fe:00 247030                     /usr/bin/cat
7f1c2a000000-7f1c2b000000 rw-s 00200000 00:01 2053                       /memfd:guest ram (deleted)
7ffd1b9e0000-7ffd1ba01000 rw-p 00000000 00:00 0                          [stack]";

    #[test]
    fn the_line_of_an_address_is_found_in_any_chunking() {
        let expected = Mapping {
            start: 0x7f1c_2a00_0000,
            end: 0x7f1c_2b00_0000,
            shared: true,
            offset: 0x20_0000,
            file: FileKey {
                major: 0,
                minor: 1,
                inode: 2053,
            },
        };
        for chunk in [1, 7, 64, 512] {
            let mut scanner = MapsScanner::new(0x7f1c_2a12_3456);
            let found = MAPS_TEXT
                .as_bytes()
                .chunks(chunk)
                .find_map(|piece| scanner.feed(piece))
                .or_else(|| scanner.finish());
            assert_eq!(found, Some(expected), "chunks of {chunk}");
        }
        // The last line has no newline; an address outside every line finds nothing.
        let mut scanner = MapsScanner::new(0x7ffd_1b9e_0010);
        assert!(scanner.feed(MAPS_TEXT.as_bytes()).is_none());
        assert!(
            scanner
                .finish()
                .is_some_and(|m| !m.shared && m.file.inode == 0)
        );
        let mut scanner = MapsScanner::new(0x1000);
        assert!(scanner.feed(MAPS_TEXT.as_bytes()).is_none());
        assert!(scanner.finish().is_none());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for line in [
            &b""[..],
            b"zz-10 rw-s 0 0:1 2",
            b"10-20 rw-s 0 01 2",
            b"10-20 rw-s 0 0:1",
            b"10-20 rw-s 0 0:1 x",
            b"10-ffffffffffffffffff rw-s 0 0:1 2",
        ] {
            assert_eq!(
                parse_maps_line(line),
                None,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    fn memfd(len: u64, seal: bool) -> File {
        let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
        // SAFETY: a valid NUL-terminated name; the new descriptor is owned by the file.
        let fd = unsafe { libc::memfd_create(c"memory-backing-test".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: memfd_create just returned this descriptor.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len).unwrap();
        if seal {
            // SAFETY: adds a seal to a memfd this test owns.
            let ret = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(ret, 0);
        }
        file
    }

    #[test]
    fn a_region_must_lie_within_its_file() {
        let file = RegionFile::inspect(memfd(8192, false).as_fd()).unwrap();
        assert!(file.regular && file.may_shrink());
        assert_eq!(file.check_covers(0, 8192), Ok(()));
        assert_eq!(file.check_covers(4096, 4096), Ok(()));
        assert_eq!(
            file.check_covers(0, 12288),
            Err(Uncovered {
                size: 12288,
                offset: 0,
                file_size: 8192
            })
        );
        assert!(
            file.check_covers(12288, 4096).is_err(),
            "offset past the end"
        );
        assert!(file.check_covers(u64::MAX, 2).is_err(), "wrapping end");
        let sealed = RegionFile::inspect(memfd(4096, true).as_fd()).unwrap();
        assert!(sealed.sealed_against_shrinking && !sealed.may_shrink());
    }

    #[test]
    fn a_fault_in_a_watched_file_is_recovered_and_reported() {
        let watch = FaultWatch::new();
        let file = memfd(2 * 4096, false);
        watch
            .watch(&RegionFile::inspect(file.as_fd()).unwrap())
            .unwrap();
        // SAFETY: maps two pages of the test's memfd; unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let second = base as usize + 4096;
        // SAFETY: in the mapping; the file still has both pages.
        unsafe { std::ptr::write_volatile(second as *mut u8, 0x5a) };
        file.set_len(4096).unwrap();
        // SAFETY: in the mapping; the page past the new end faults and is replaced.
        let read = unsafe { std::ptr::read_volatile((second + 8) as *const u8) };
        assert_eq!(read, 0, "the replaced page reads as zeroes");
        assert_eq!(
            watch.fault(),
            Some(Fault {
                file: RegionFile::inspect(file.as_fd()).unwrap().key,
                offset: 4096 + 8
            })
        );
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(base, 2 * 4096) };
    }

    #[test]
    fn watch_slots_are_given_back() {
        let file = RegionFile::inspect(memfd(4096, false).as_fd()).unwrap();
        for _ in 0..2 * WATCH_SLOTS {
            let watch = FaultWatch::new();
            watch.watch(&file).unwrap();
            watch.watch(&file).unwrap();
            assert_eq!(watch.lock_slots().len(), 1, "one slot per file");
        }
    }
}
