//! From descriptor chains to block requests.
//!
//! A chain is read as two byte streams, device-readable then device-writable, without relying
//! on how the driver split them into descriptors (virtio 1.2, 2.7.4): the request header is the
//! first 16 readable bytes, the status is the last writable byte, and data is what lies between.
//! Every malformed chain is answered with IOERR when a status byte can be written, and is
//! returned with a used length of 0 (and a log line) when it cannot.

use hvisor_vhost_core::chain::{self, Segment, stream_parts};
use log::warn;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use crate::device::{BlockDevice, MAX_DISCARD_SEGMENTS, RangeOperation, SERIAL_LEN, Status};
use crate::storage::{IoBuffers, Storage};
use crate::virtio_blk::{
    DISCARD_SEGMENT_SIZE, DiscardWriteZeroesSegment, REQUEST_HEADER_SIZE, RequestHeader,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Why a chain cannot be answered with a status byte.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("the descriptor chain is empty")]
    Empty,
    #[error(
        "the chain ends on a descriptor flagged NEXT after {0} descriptors \
         (a loop, a next index beyond the table, or an unreadable descriptor)"
    )]
    Truncated(usize),
    #[error("descriptor {0} is device-readable but follows a device-writable descriptor")]
    ReadableAfterWritable(usize),
    #[error("no device-writable byte is left for the status")]
    NoStatusByte,
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
}

/// Why a well-framed request gets IOERR.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the header needs 16 device-readable bytes, the chain has {0}")]
    ShortHeader(u64),
    #[error("a {kind} request carries {len} data bytes on the {side} side")]
    DataOnWrongSide {
        kind: &'static str,
        len: u64,
        side: &'static str,
    },
    #[error("a header, range or ID buffer is outside guest memory: {0}")]
    GuestMemory(GuestMemoryError),
    #[error("buffer {addr:#x}+{len} is outside guest memory: {source}")]
    OutsideMemory {
        addr: u64,
        len: usize,
        source: GuestMemoryError,
    },
    #[error("range list of {0} bytes is not 1 to {MAX_DISCARD_SEGMENTS} segments of 16 bytes")]
    BadRangeList(u64),
    #[error("data of {0} bytes exceeds 4 GiB")]
    TooLong(usize),
}

/// Where a request's answer goes once its data has moved: what an engine that completes
/// requests later must keep.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub head: u16,
    pub status_addr: GuestAddress,
}

/// Moves the data of reads, writes and flushes: at once on the worker thread, or later.
pub trait DataPath<S: Storage> {
    /// Starts a read of `bufs.len()` bytes at `sector`. `Some(status)` when it is over already,
    /// `None` when the engine answers `reply` later.
    fn read(
        &mut self,
        device: &BlockDevice<S>,
        sector: u64,
        bufs: IoBuffers<'_>,
        reply: Reply,
    ) -> Option<Status>;
    /// Starts a write, as `read`.
    fn write(
        &mut self,
        device: &BlockDevice<S>,
        sector: u64,
        bufs: IoBuffers<'_>,
        reply: Reply,
    ) -> Option<Status>;
    /// Starts a flush, which must not complete before the writes started earlier.
    fn flush(&mut self, device: &BlockDevice<S>, reply: Reply) -> Option<Status>;
}

/// Serves every request on the worker thread with `preadv`/`pwritev`/`fdatasync`.
pub struct Inline;

impl<S: Storage> DataPath<S> for Inline {
    fn read(
        &mut self,
        device: &BlockDevice<S>,
        sector: u64,
        mut bufs: IoBuffers<'_>,
        _: Reply,
    ) -> Option<Status> {
        Some(device.read(sector, &mut bufs))
    }

    fn write(
        &mut self,
        device: &BlockDevice<S>,
        sector: u64,
        mut bufs: IoBuffers<'_>,
        _: Reply,
    ) -> Option<Status> {
        Some(device.write(sector, &mut bufs))
    }

    fn flush(&mut self, device: &BlockDevice<S>, _: Reply) -> Option<Status> {
        Some(device.flush())
    }
}

/// Buffers reused by one queue worker, so that serving a request does not allocate.
#[derive(Default)]
pub struct RequestScratch {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    iovecs: Vec<libc::iovec>,
    ranges: Vec<DiscardWriteZeroesSegment>,
}

// SAFETY: the raw pointers in `iovecs` are only dereferenced while an `IoBuffers` borrow ties
// them to live guest memory, inside one call on one thread; between requests they are stale
// values that `IoBuffers::new` clears before any use.
unsafe impl Send for RequestScratch {}

impl RequestScratch {
    /// Splits a chain into its readable and writable buffers, checking the framing.
    fn split<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        self.readable.clear();
        self.writable.clear();
        let mut count = 0;
        let mut ends_with_next = false;
        for descriptor in chain {
            let segment = Segment {
                addr: descriptor.addr(),
                len: descriptor.len(),
            };
            if descriptor.is_write_only() {
                if segment.len > 0 {
                    self.writable.push(segment);
                }
            } else if !self.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable(count));
            } else if segment.len > 0 {
                self.readable.push(segment);
            }
            ends_with_next = descriptor.has_next();
            count += 1;
        }
        match (count, ends_with_next) {
            (0, _) => Err(ChainError::Empty),
            (_, true) => Err(ChainError::Truncated(count)),
            _ => Ok(()),
        }
    }

    /// Removes the last writable byte from the writable stream and returns its address.
    fn take_status_byte(&mut self, mem: &GuestMemoryMmap) -> Result<GuestAddress, ChainError> {
        let last = self.writable.last_mut().ok_or(ChainError::NoStatusByte)?;
        let addr = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .ok_or(ChainError::StatusOutsideMemory(u64::MAX))?;
        last.len -= 1;
        if last.len == 0 {
            self.writable.pop();
        }
        if !mem.check_range(addr, 1) {
            return Err(ChainError::StatusOutsideMemory(addr.0));
        }
        Ok(addr)
    }
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|segment| u64::from(segment.len)).sum()
}

fn outside_memory(addr: GuestAddress, len: usize) -> impl FnOnce(GuestMemoryError) -> RequestError {
    move |source| RequestError::OutsideMemory {
        addr: addr.0,
        len,
        source,
    }
}

/// Copies stream bytes `skip..skip + out.len()` into `out`.
fn read_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    chain::read_stream(mem, segments, skip, out).map_err(RequestError::GuestMemory)
}

/// Copies `data` to the start of the stream.
fn write_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    data: &[u8],
) -> Result<(), RequestError> {
    chain::write_stream(mem, segments, data).map_err(RequestError::GuestMemory)
}

/// Adds stream bytes from `skip` to the end as guest buffers to `bufs`.
fn gather<'m>(
    mem: &'m GuestMemoryMmap,
    segments: &[Segment],
    skip: u64,
    bufs: &mut IoBuffers<'m>,
) -> Result<(), RequestError> {
    for (addr, _, len) in stream_parts(segments, skip, u64::MAX) {
        for slice in mem.get_slices(addr, len) {
            bufs.push(&slice.map_err(outside_memory(addr, len))?);
        }
    }
    Ok(())
}

fn require_empty(kind: &'static str, side: &'static str, len: u64) -> Result<(), RequestError> {
    if len == 0 {
        Ok(())
    } else {
        Err(RequestError::DataOnWrongSide { kind, len, side })
    }
}

fn written_len(len: usize) -> Result<u32, RequestError> {
    u32::try_from(len).map_err(|_| RequestError::TooLong(len))
}

/// Runs one framed request; returns its status and the data bytes written to the guest, or
/// `None` when `data_path` answers it later.
fn run_request<S: Storage>(
    device: &BlockDevice<S>,
    mem: &GuestMemoryMmap,
    scratch: &mut RequestScratch,
    data_path: &mut impl DataPath<S>,
    reply: Reply,
) -> Result<Option<(Status, u32)>, RequestError> {
    let RequestScratch {
        readable,
        writable,
        iovecs,
        ranges,
    } = scratch;
    let readable_len = total_len(readable);
    let writable_len = total_len(writable);
    if readable_len < REQUEST_HEADER_SIZE as u64 {
        return Err(RequestError::ShortHeader(readable_len));
    }
    let mut header = RequestHeader::default();
    read_stream(mem, readable, 0, header.as_mut_slice())?;
    let payload_len = readable_len - REQUEST_HEADER_SIZE as u64;
    let sector = header.sector.to_native();
    match header.request_type.to_native() {
        VIRTIO_BLK_T_IN => {
            require_empty("read", "device-readable", payload_len)?;
            let mut bufs = IoBuffers::new(iovecs);
            gather(mem, writable, 0, &mut bufs)?;
            let len = written_len(bufs.len())?;
            Ok(data_path
                .read(device, sector, bufs, reply)
                .map(|status| (status, if status == Status::Ok { len } else { 0 })))
        }
        VIRTIO_BLK_T_OUT => {
            require_empty("write", "device-writable", writable_len)?;
            let mut bufs = IoBuffers::new(iovecs);
            gather(mem, readable, REQUEST_HEADER_SIZE as u64, &mut bufs)?;
            Ok(data_path
                .write(device, sector, bufs, reply)
                .map(|status| (status, 0)))
        }
        VIRTIO_BLK_T_FLUSH => Ok(data_path.flush(device, reply).map(|status| (status, 0))),
        VIRTIO_BLK_T_GET_ID => {
            require_empty("get-id", "device-readable", payload_len)?;
            let len = (writable_len as usize).min(SERIAL_LEN);
            write_stream(mem, writable, &device.id()[..len])?;
            Ok(Some((Status::Ok, written_len(len)?)))
        }
        request_type @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            let (kind, operation) = if request_type == VIRTIO_BLK_T_DISCARD {
                ("discard", RangeOperation::Discard)
            } else {
                ("write-zeroes", RangeOperation::WriteZeroes)
            };
            require_empty(kind, "device-writable", writable_len)?;
            let count = payload_len / DISCARD_SEGMENT_SIZE as u64;
            if payload_len % DISCARD_SEGMENT_SIZE as u64 != 0
                || count == 0
                || count > u64::from(MAX_DISCARD_SEGMENTS)
            {
                return Err(RequestError::BadRangeList(payload_len));
            }
            ranges.clear();
            for index in 0..count {
                let mut range = DiscardWriteZeroesSegment::default();
                let at = REQUEST_HEADER_SIZE as u64 + index * DISCARD_SEGMENT_SIZE as u64;
                read_stream(mem, readable, at, range.as_mut_slice())?;
                ranges.push(range);
            }
            Ok(Some((device.apply_ranges(operation, ranges), 0)))
        }
        other => {
            warn!("unsupported request type {other}");
            Ok(Some((Status::Unsupported, 0)))
        }
    }
}

/// Serves one descriptor chain and returns the used length to report for it, or `None` when
/// `data_path` took the request and answers it later (through [`complete`]).
pub fn process_chain<S, M>(
    device: &BlockDevice<S>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    scratch: &mut RequestScratch,
    data_path: &mut impl DataPath<S>,
) -> Option<u32>
where
    S: Storage,
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let status_addr = match scratch
        .split(chain)
        .and_then(|()| scratch.take_status_byte(mem))
    {
        Ok(addr) => addr,
        Err(error) => {
            warn!("request at descriptor {head} dropped without status: {error}");
            return Some(0);
        }
    };
    let reply = Reply { head, status_addr };
    let outcome = run_request(device, mem, scratch, data_path, reply).unwrap_or_else(|error| {
        warn!("request at descriptor {head} failed: {error}");
        Some((Status::IoError, 0))
    });
    outcome.map(|(status, written)| complete(mem, reply, status, written))
}

/// Writes the status of a finished request; returns the used length to report for it.
pub fn complete(mem: &GuestMemoryMmap, reply: Reply, status: Status, written: u32) -> u32 {
    if let Err(error) = mem.write_obj(status.as_byte(), reply.status_addr) {
        warn!(
            "request at descriptor {}: cannot write status: {error}",
            reply.head
        );
        return 0;
    }
    written + 1
}
