//! Backing stores: a raw image file, a block device, or an in-memory disk.
//!
//! A [`Storage`] describes the disk and gives each queue the [`Engine`] that carries out its
//! operations. Data moves between guest memory and the backing file straight on the guest's
//! buffers (zero-copy). [`IoBuffers`] is the only way to name those buffers, and it can only be
//! built from [`VolatileSlice`]s, which vouch for the memory behind each pointer.

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::warn;
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

use crate::config::IoEngine;
use crate::engine::{Engine, FileEngine, SyncEngine};
use crate::uring::UringEngine;
use crate::virtio_blk::SECTOR_SIZE;

/// `_IOR(0x12, 114, size_t)`: device size in bytes (not exported by the libc crate).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 127)`: zero a byte range, unmapping where the device can.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Linux caps one vectored call at `IOV_MAX` buffers; longer lists are sent in several calls.
const IOV_MAX: usize = 1024;

/// Alignment that satisfies O_DIRECT on every file system and block device (a page).
const DIRECT_ALIGN: usize = 4096;

/// One aligned page of a bounce buffer.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedPage([u8; DIRECT_ALIGN]);

/// A zeroed buffer whose start is aligned for O_DIRECT, for the rare requests whose guest
/// buffers are not (and for zero filling).
struct BounceBuffer {
    pages: Vec<AlignedPage>,
    len: usize,
}

impl BounceBuffer {
    fn zeroed(len: usize) -> Self {
        BounceBuffer {
            pages: vec![AlignedPage([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the pages are contiguous `repr(C)` byte arrays holding at least `len` bytes,
        // borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Guest buffers of one request, kept as the `iovec` list the kernel consumes.
///
/// The lifetime ties the list to the guest-memory borrow its slices came from, so no pointer can
/// outlive the mapping. The backing `Vec` is borrowed so that a queue worker reuses one
/// allocation for every request.
pub struct IoBuffers<'a> {
    iovecs: &'a mut Vec<libc::iovec>,
    len: usize,
    _guest_memory: PhantomData<VolatileSlice<'a, ()>>,
}

impl<'a> IoBuffers<'a> {
    /// Starts an empty list in `storage` (cleared first).
    pub fn new(storage: &'a mut Vec<libc::iovec>) -> Self {
        storage.clear();
        IoBuffers {
            iovecs: storage,
            len: 0,
            _guest_memory: PhantomData,
        }
    }

    /// Appends a guest buffer.
    pub fn push<B: BitmapSlice>(&mut self, slice: &VolatileSlice<'a, B>) {
        if slice.is_empty() {
            return;
        }
        // Writes through this pointer (reads from disk into the guest) bypass the dirty-page
        // bitmap; the devices use `()` bitmaps and do not offer dirty logging.
        let base = slice.ptr_guard_mut().as_ptr();
        self.iovecs.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: slice.len(),
        });
        self.len += slice.len();
    }

    /// Total bytes in all buffers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands the list to an engine that completes it later, leaving `spare` (cleared) in its place, so
    /// that neither side allocates.
    ///
    /// The pointers in the returned list are valid only while the guest memory they came from
    /// stays mapped; the engine must finish with them before it lets that borrow go.
    pub(crate) fn swap_out(self, spare: &mut Vec<libc::iovec>) {
        spare.clear();
        std::mem::swap(self.iovecs, spare);
    }

    /// Rebuilds the list of an operation that an engine started, to finish it here.
    ///
    /// # Safety
    /// Every entry of `iovecs` must point to guest memory that stays mapped and unaliased by
    /// Rust references for `'a`, as `push` guarantees for the lists it built.
    pub(crate) unsafe fn from_started(iovecs: &'a mut Vec<libc::iovec>) -> Self {
        let len = iovecs.iter().map(|iov| iov.iov_len).sum();
        IoBuffers {
            iovecs,
            len,
            _guest_memory: PhantomData,
        }
    }

    /// The list as the kernel reads it.
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        self.iovecs
    }
}

/// Drops the first `done` bytes from an iovec list after a short transfer.
fn advance(iovecs: &mut [libc::iovec], mut done: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iovecs.len() && done >= iovecs[first].iov_len {
        done -= iovecs[first].iov_len;
        first += 1;
    }
    let rest = &mut iovecs[first..];
    if let Some(iov) = rest.first_mut() {
        // SAFETY: `done < iov_len` here, so the new base stays inside the same buffer.
        iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
        iov.iov_len -= done;
    }
    rest
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Disk to guest memory.
    Read,
    /// Guest memory to disk.
    Write,
}

/// What kind of object backs the disk; decides how ranges are zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    RegularFile,
    BlockDevice,
    Memory,
}

/// What a queue's engine is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    pub kind: IoEngine,
    /// Requests the queue may have in flight at once (its size).
    pub queue_size: u16,
    /// The host has more cores than the device has queues.
    pub spare_cores: bool,
}

/// A disk as the device needs it: its geometry, and an engine per queue for its operations.
///
/// Every read, write, flush and zeroing of a queue goes through the engine `engine` returns,
/// so a store that wraps another sees them all by wrapping its engine too.
pub trait Storage: Send + Sync {
    type Engine: Engine;
    fn size(&self) -> u64;
    /// Logical block size the device reports (`blk_size`).
    fn logical_block_size(&self) -> u32;
    /// Physical block size, reported through the topology fields.
    fn physical_block_size(&self) -> u32;
    /// Makes completed writes durable, outside any queue (when the device stops).
    fn flush(&self) -> io::Result<()>;
    /// The engine of one queue.
    fn engine(&self, options: &EngineOptions) -> Self::Engine;
}

/// Errors opening a backing store; each names the offending input.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("image {path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
    #[error("image {path} is empty (size 0)")]
    Empty { path: PathBuf },
    #[error("image {path} is {size} bytes, not a multiple of 512")]
    Unaligned { path: PathBuf, size: u64 },
    #[error("cannot query image {path}: {source}")]
    Query { path: PathBuf, source: io::Error },
    #[error("in-memory disk size {size} must be a non-zero multiple of 512")]
    BadMemorySize { size: u64 },
    #[error("cannot create the in-memory disk: {0}")]
    Memory(io::Error),
}

/// A disk backed by a file descriptor: image file, block device or memfd.
#[derive(Debug)]
pub struct FileStorage {
    /// Shared with the queues' engines.
    pub(crate) disk: Arc<FileDisk>,
}

/// The open backing file and the synchronous operations on it, which every engine of a
/// [`FileStorage`] falls back on.
#[derive(Debug)]
pub(crate) struct FileDisk {
    file: File,
    /// Opened with O_DIRECT: unaligned guest buffers go through a bounce buffer.
    direct: bool,
    kind: BackingKind,
    size: u64,
    logical_block_size: u32,
    physical_block_size: u32,
}

impl FileStorage {
    /// Opens an image file or a block device, with O_DIRECT when `direct`.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, OpenError> {
        let direct_flag = if direct { libc::O_DIRECT } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_CLOEXEC | direct_flag)
            .open(path)
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?;
        let query_error = |source| OpenError::Query {
            path: path.to_owned(),
            source,
        };
        let file_type = file.metadata().map_err(query_error)?.file_type();
        let (kind, size, logical, physical) = if file_type.is_file() {
            let size = file.metadata().map_err(query_error)?.len();
            (BackingKind::RegularFile, size, 512, 4096)
        } else if file_type.is_block_device() {
            let size = block_device_u64(&file, BLKGETSIZE64).map_err(query_error)?;
            let logical =
                block_device_u32(&file, libc::BLKSSZGET as libc::c_ulong).map_err(query_error)?;
            let physical =
                block_device_u32(&file, libc::BLKPBSZGET as libc::c_ulong).map_err(query_error)?;
            (BackingKind::BlockDevice, size, logical, physical)
        } else {
            return Err(OpenError::NotFileOrBlockDevice {
                path: path.to_owned(),
            });
        };
        if size == 0 {
            return Err(OpenError::Empty {
                path: path.to_owned(),
            });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(OpenError::Unaligned {
                path: path.to_owned(),
                size,
            });
        }
        Ok(FileStorage::with_disk(FileDisk {
            file,
            direct,
            kind,
            size,
            logical_block_size: logical,
            physical_block_size: physical.max(logical),
        }))
    }

    /// Creates a zero-filled in-memory disk (a memfd, so the same I/O path serves it).
    pub fn memory(size: u64) -> Result<Self, OpenError> {
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(OpenError::BadMemorySize { size });
        }
        // SAFETY: the name is a valid NUL-terminated string; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"hvisor-vhost-disk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(OpenError::Memory(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(OpenError::Memory)?;
        Ok(FileStorage::with_disk(FileDisk {
            file,
            direct: false,
            kind: BackingKind::Memory,
            size,
            logical_block_size: 512,
            physical_block_size: 4096,
        }))
    }

    fn with_disk(disk: FileDisk) -> Self {
        FileStorage {
            disk: Arc::new(disk),
        }
    }

    /// The open backing file, e.g. to inspect an in-memory disk.
    pub fn file(&self) -> &File {
        &self.disk.file
    }

    pub fn kind(&self) -> BackingKind {
        self.disk.kind
    }
}

impl FileDisk {
    /// The descriptor engines issue their operations on.
    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Whether transfers go through the host page cache (no O_DIRECT).
    pub(crate) fn buffered(&self) -> bool {
        !self.direct
    }

    /// Fills every buffer, or fails.
    pub(crate) fn read_at(&self, bufs: &mut IoBuffers<'_>, offset: u64) -> io::Result<()> {
        self.transfer(Direction::Read, bufs, offset)
    }

    /// Writes every buffer, or fails.
    pub(crate) fn write_at(&self, bufs: &mut IoBuffers<'_>, offset: u64) -> io::Result<()> {
        self.transfer(Direction::Write, bufs, offset)
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The `fallocate` mode a zeroing tries first, or `None` on a block device, which zeroes
    /// with an ioctl.
    pub(crate) fn zeroing_mode(&self, may_unmap: bool) -> Option<libc::c_int> {
        match (self.kind, may_unmap) {
            (BackingKind::BlockDevice, _) => None,
            (_, true) => Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            (_, false) => Some(libc::FALLOC_FL_ZERO_RANGE),
        }
    }

    /// Leaves zeroes in a range: a hole where `may_unmap` allows it, else zeroed blocks
    /// (BLKZEROOUT on block devices, which unmaps where the device can), else zero bytes
    /// written where the file system supports neither.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mode = self.zeroing_mode(may_unmap);
        let mut zeroed = match mode {
            None => self.zero_out_block_device(offset, len),
            Some(mode) => self.fallocate(mode, offset, len),
        };
        // A file system without holes may still zero its blocks in place.
        if may_unmap && mode.is_some() && zeroed.as_ref().is_err_and(is_unsupported) {
            zeroed = self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len);
        }
        match zeroed {
            Err(error) if is_unsupported(&error) => {
                warn!("zeroing in place is unsupported here ({error}); writing zero bytes");
                self.write_zero_bytes(offset, len)
            }
            other => other,
        }
    }

    fn transfer(
        &self,
        direction: Direction,
        bufs: &mut IoBuffers<'_>,
        offset: u64,
    ) -> io::Result<()> {
        match transfer_vectored(self.file.as_raw_fd(), direction, bufs.iovecs, offset) {
            Err(error) if self.direct && error.raw_os_error() == Some(libc::EINVAL) => {
                // O_DIRECT refuses guest buffers that are not aligned for it; Linux guests never
                // send those, firmware might. Moving through an aligned copy costs a copy but
                // keeps the request valid.
                self.transfer_bounced(direction, bufs, offset)
            }
            other => other,
        }
    }

    /// Moves the data through an aligned buffer (after a transfer that may have been partial:
    /// it is redone whole, which is harmless for reads and writes of the same bytes).
    fn transfer_bounced(
        &self,
        direction: Direction,
        bufs: &mut IoBuffers<'_>,
        offset: u64,
    ) -> io::Result<()> {
        let mut bounce = BounceBuffer::zeroed(bufs.len());
        let bytes = bounce.as_mut_slice();
        if direction == Direction::Write {
            copy_between(bufs.iovecs(), bytes, Direction::Write);
        }
        let mut single = vec![libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        }];
        transfer_vectored(self.file.as_raw_fd(), direction, &mut single, offset)?;
        if direction == Direction::Read {
            copy_between(bufs.iovecs(), bytes, Direction::Read);
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range too large",
            ));
        };
        loop {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }

    fn zero_out_block_device(&self, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64 from the pointer, which points to `range`, alive for
        // the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The fallback for back ends that cannot deallocate or zero a range in place.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 64 * 1024;
        // Aligned, so that an O_DIRECT image takes it.
        let mut zeroes = BounceBuffer::zeroed(CHUNK.min(len as usize));
        let zeroes = zeroes.as_mut_slice();
        let mut done = 0u64;
        while done < len {
            let now = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..now], offset + done)?;
            done += now as u64;
        }
        Ok(())
    }
}

/// `preadv`/`pwritev` until every buffer is done, resuming after short transfers.
fn transfer_vectored(
    fd: RawFd,
    direction: Direction,
    iovecs: &mut [libc::iovec],
    offset: u64,
) -> io::Result<()> {
    let mut offset = offset;
    let mut pending: &mut [libc::iovec] = iovecs;
    while !pending.is_empty() {
        let count = pending.len().min(IOV_MAX);
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: every iovec was built by `IoBuffers::push` from a live `VolatileSlice` whose
        // borrow outlives the call (or points into a live bounce buffer), and `advance` keeps
        // each entry inside its buffer.
        let done = unsafe {
            match direction {
                Direction::Read => {
                    libc::preadv(fd, pending.as_ptr(), count as libc::c_int, file_offset)
                }
                Direction::Write => {
                    libc::pwritev(fd, pending.as_ptr(), count as libc::c_int, file_offset)
                }
            }
        };
        if done < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("backing store ended at byte {offset}"),
            ));
        }
        offset += done as u64;
        pending = advance(pending, done as usize);
    }
    Ok(())
}

/// Copies between guest buffers and a bounce buffer of the same total length: into the bounce
/// buffer before a write, out of it after a read.
fn copy_between(iovecs: &[libc::iovec], bounce: &mut [u8], direction: Direction) {
    let mut at = 0;
    for iov in iovecs {
        let guest = iov.iov_base.cast::<u8>();
        let part = &mut bounce[at..at + iov.iov_len];
        // SAFETY: each iovec names `iov_len` bytes of live guest memory (see `IoBuffers`), which
        // cannot overlap the bounce buffer, a private allocation.
        unsafe {
            match direction {
                Direction::Write => {
                    std::ptr::copy_nonoverlapping(guest, part.as_mut_ptr(), part.len());
                }
                Direction::Read => std::ptr::copy_nonoverlapping(part.as_ptr(), guest, part.len()),
            }
        }
        at += iov.iov_len;
    }
}

/// Whether an operation failed because the file system, device or kernel does not offer it.
pub(crate) fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

fn block_device_u64(file: &File, request: libc::c_ulong) -> io::Result<u64> {
    let mut value = 0u64;
    // SAFETY: the request writes one u64 to the pointer, which points to `value`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &raw mut value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

fn block_device_u32(file: &File, request: libc::c_ulong) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: the request writes one int to the pointer, which points to `value`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &raw mut value) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(value).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative size"))
}

impl Storage for FileStorage {
    type Engine = FileEngine;

    fn size(&self) -> u64 {
        self.disk.size
    }

    fn logical_block_size(&self) -> u32 {
        self.disk.logical_block_size
    }

    fn physical_block_size(&self) -> u32 {
        self.disk.physical_block_size
    }

    fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    fn engine(&self, options: &EngineOptions) -> FileEngine {
        let sync = || FileEngine::Sync(SyncEngine::new(self.disk.clone()));
        match options.kind {
            IoEngine::Sync => sync(),
            IoEngine::IoUring => {
                let buffered = self.disk.buffered();
                match UringEngine::new(self.disk.clone(), buffered, options) {
                    Ok(engine) => FileEngine::IoUring(Box::new(engine)),
                    Err(error) => {
                        warn!("no io_uring ({error}); this queue uses the sync engine");
                        sync()
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn storage_with(content: &[u8]) -> (tempfile::NamedTempFile, FileStorage) {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        image.write_all(content).unwrap();
        let storage = FileStorage::open(image.path(), false, false).unwrap();
        (image, storage)
    }

    #[test]
    fn vectored_read_and_write_span_several_buffers() {
        let content: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (_image, storage) = storage_with(&content);
        let mut first = vec![0u8; 1000];
        let mut second = [0u8; 24];
        let mut iovecs = Vec::new();
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut first[..]));
        bufs.push(&VolatileSlice::from(&mut second[..]));
        assert_eq!(bufs.len(), 1024);
        storage.disk.read_at(&mut bufs, 512).unwrap();
        assert_eq!(first[..], content[512..1512]);
        assert_eq!(second[..], content[1512..1536]);

        let mut replacement = vec![0xabu8; 512];
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut replacement[..]));
        storage.disk.write_at(&mut bufs, 0).unwrap();
        let mut back = vec![0u8; 512];
        storage.file().read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, replacement);
    }

    #[test]
    fn direct_images_take_unaligned_buffers_through_a_bounce_buffer() {
        let content: Vec<u8> = (0..16384u32).map(|i| (i % 253) as u8).collect();
        let mut image = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        image.write_all(&content).unwrap();
        let storage = match FileStorage::open(image.path(), false, true) {
            Ok(storage) => storage,
            // Some file systems (old tmpfs) refuse O_DIRECT altogether; nothing to test there.
            Err(OpenError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                return;
            }
            Err(error) => panic!("{error}"),
        };
        let mut backing = vec![0u8; 4096 + 1];
        let unaligned = &mut backing[1..];
        let mut iovecs = Vec::new();
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut unaligned[..]));
        storage.disk.read_at(&mut bufs, 4096).unwrap();
        assert_eq!(unaligned[..], content[4096..8192]);
        unaligned.fill(0x3c);
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut unaligned[..]));
        storage.disk.write_at(&mut bufs, 8192).unwrap();
        let mut back = vec![0u8; 4096];
        std::fs::File::open(image.path())
            .unwrap()
            .read_exact_at(&mut back, 8192)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x3c));
    }

    #[test]
    fn advance_skips_whole_and_partial_buffers() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 8];
        let mut iovecs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let rest = advance(&mut iovecs, 6);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 6);
        assert_eq!(rest[0].iov_base.cast::<u8>(), b[2..].as_mut_ptr());
        assert!(advance(&mut iovecs, 12).is_empty());
    }

    #[test]
    fn discard_and_write_zeroes_leave_zeroes() {
        let (_image, storage) = storage_with(&[0x5a; 16384]);
        storage.disk.write_zeroes(4096, 4096, true).unwrap();
        storage.disk.write_zeroes(8192, 1024, false).unwrap();
        storage.disk.write_zeroes(12288, 512, true).unwrap();
        let mut back = vec![0u8; 16384];
        storage.file().read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0x5a));
        assert!(back[4096..9216].iter().all(|&b| b == 0));
        assert!(back[9216..12288].iter().all(|&b| b == 0x5a));
        assert!(back[12288..12800].iter().all(|&b| b == 0));
        assert!(back[12800..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn memory_disk_supports_every_operation() {
        let storage = FileStorage::memory(1 << 20).unwrap();
        assert_eq!(storage.kind(), BackingKind::Memory);
        assert_eq!(storage.size(), 1 << 20);
        let mut data = vec![7u8; 4096];
        let mut iovecs = Vec::new();
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut data[..]));
        storage.disk.write_at(&mut bufs, 8192).unwrap();
        storage.disk.write_zeroes(8192, 512, false).unwrap();
        storage.disk.write_zeroes(9216, 512, true).unwrap();
        storage.disk.flush().unwrap();
        let mut back = vec![1u8; 4096];
        let mut bufs = IoBuffers::new(&mut iovecs);
        bufs.push(&VolatileSlice::from(&mut back[..]));
        storage.disk.read_at(&mut bufs, 8192).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..1024].iter().all(|&b| b == 7));
        assert!(back[1024..1536].iter().all(|&b| b == 0));
        assert!(back[1536..].iter().all(|&b| b == 7));
    }

    #[test]
    fn open_rejects_bad_images() {
        let missing =
            FileStorage::open(Path::new("/nonexistent/disk.img"), false, false).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/disk.img"),
            "{missing}"
        );
        let directory = FileStorage::open(Path::new("/tmp"), true, false).unwrap_err();
        assert!(
            matches!(directory, OpenError::NotFileOrBlockDevice { .. }),
            "{directory}"
        );
        let empty_image = tempfile::NamedTempFile::new().unwrap();
        let empty = FileStorage::open(empty_image.path(), false, false).unwrap_err();
        assert!(matches!(empty, OpenError::Empty { .. }), "{empty}");
        let odd = tempfile::NamedTempFile::new().unwrap();
        odd.as_file().set_len(1000).unwrap();
        let unaligned = FileStorage::open(odd.path(), false, false).unwrap_err();
        assert!(
            unaligned.to_string().contains("not a multiple of 512"),
            "{unaligned}"
        );
        assert!(matches!(
            FileStorage::memory(0),
            Err(OpenError::BadMemorySize { size: 0 })
        ));
    }
}
