//! From descriptor chains to block requests, through the queue's engine, to their answers.
//!
//! A chain is read as two byte streams, device-readable then device-writable, without relying
//! on how the driver split them into descriptors (virtio 1.2, 2.7.4): the request header is the
//! first 16 readable bytes, the status is the last writable byte, and data is what lies between.
//! Every malformed chain is answered with IOERR when a status byte can be written, and is
//! returned with a used length of 0 (and a log line) when it cannot.
//!
//! A valid request becomes one engine operation (a discard or write-zeroes one per segment,
//! plus a flush in writethrough mode) and is answered once all of them have ended.

use std::io;

use hvisor_vhost_core::chain::{self, ChainError, Segment, split_chain, stream_parts, total_len};
use log::warn;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use crate::device::{
    BlockDevice, MAX_DISCARD_SEGMENTS, RangeOperation, SERIAL_LEN, Status, zeroing,
};
use crate::engine::{Completion, Engine, Outcome};
use crate::storage::{IoBuffers, Storage};
use crate::virtio_blk::{
    DISCARD_SEGMENT_SIZE, DiscardWriteZeroesSegment, REQUEST_HEADER_SIZE, RequestHeader,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Why a chain cannot be answered with a status byte.
#[derive(Debug, thiserror::Error)]
enum FramingError {
    #[error(transparent)]
    Chain(#[from] ChainError),
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
    fn split<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), FramingError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        self.readable.clear();
        self.writable.clear();
        // Buffers are checked as they are used: one outside guest memory fails the request
        // with IOERR, which needs the status byte found first.
        split_chain(chain, None, &mut self.readable, &mut self.writable)?;
        Ok(())
    }

    /// Removes the last writable byte from the writable stream and returns its address.
    fn take_status_byte(&mut self, mem: &GuestMemoryMmap) -> Result<GuestAddress, FramingError> {
        let last = self.writable.last_mut().ok_or(FramingError::NoStatusByte)?;
        let addr = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .ok_or(FramingError::StatusOutsideMemory(u64::MAX))?;
        last.len -= 1;
        if last.len == 0 {
            self.writable.pop();
        }
        if !mem.check_range(addr, 1) {
            return Err(FramingError::StatusOutsideMemory(addr.0));
        }
        Ok(addr)
    }
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

/// What a request in the engine asked for, as log lines name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write-zeroes",
        }
    }
}

/// A request whose engine operations have not all ended.
#[derive(Clone, Copy, Debug)]
struct Pending {
    reply: Reply,
    kind: Kind,
    sector: u64,
    /// Bytes to transfer or zero.
    len: u64,
    /// Operations started and not ended yet.
    ops_left: u32,
    /// IOERR once an operation failed.
    status: Status,
    /// Writethrough: a flush follows once the data is down.
    flush_after: bool,
}

/// The requests of one queue that its engine is working on, by tag.
struct PendingTable {
    entries: Vec<Pending>,
    /// Indexes of `entries` that hold no request.
    free: Vec<usize>,
}

impl PendingTable {
    /// Room for `capacity` requests before the table grows.
    fn new(capacity: u16) -> Self {
        let idle = Pending {
            reply: Reply {
                head: 0,
                status_addr: GuestAddress(0),
            },
            kind: Kind::Flush,
            sector: 0,
            len: 0,
            ops_left: 0,
            status: Status::Ok,
            flush_after: false,
        };
        PendingTable {
            entries: vec![idle; usize::from(capacity)],
            free: (0..usize::from(capacity)).rev().collect(),
        }
    }

    /// Records a new request; its operations are counted as they start.
    fn open(&mut self, request: Pending) -> usize {
        match self.free.pop() {
            Some(index) => {
                self.entries[index] = request;
                index
            }
            // More requests than queue entries: only a driver that reuses heads it has not got
            // back gets here.
            None => {
                self.entries.push(request);
                self.entries.len() - 1
            }
        }
    }

    /// Whether `index` holds a request with operations running (a free entry has none).
    fn is_running(&self, index: usize) -> bool {
        self.entries
            .get(index)
            .is_some_and(|request| request.ops_left > 0)
    }

    /// Counts the end of one operation of request `index`.
    fn operation_ended(&mut self, index: usize, result: io::Result<()>) {
        let request = &mut self.entries[index];
        request.ops_left -= 1;
        if let Err(error) = result {
            let what = request.kind.name();
            match request.kind {
                Kind::Flush => warn!("flush: {error}"),
                _ => warn!(
                    "{what} at sector {}, {} bytes: {error}",
                    request.sector, request.len
                ),
            }
            request.status = Status::IoError;
        }
    }

    /// Counts how `engine` took one operation of request `index`.
    fn started(&mut self, index: usize, outcome: Outcome) {
        self.entries[index].ops_left += 1;
        if let Outcome::Executed(result) = outcome {
            self.operation_ended(index, result);
        }
    }

    /// The answer to request `index` once every operation of it has ended (the table forgets
    /// it then); `None` while some run on. In writethrough mode a flush follows the data.
    fn settle(&mut self, index: usize, engine: &mut impl Engine) -> Option<(Reply, Status, u32)> {
        loop {
            let request = &mut self.entries[index];
            if request.ops_left > 0 {
                return None;
            }
            if request.flush_after && request.status == Status::Ok {
                request.flush_after = false;
                // Names the flush in a log line if it fails; neither a write nor a zeroing
                // returns data, so nothing else depends on the kind from here.
                request.kind = Kind::Flush;
                let outcome = engine.flush(index as u64);
                self.started(index, outcome);
                continue;
            }
            let written = match (request.kind, request.status) {
                (Kind::Read, Status::Ok) => request.len as u32,
                _ => 0,
            };
            let answer = (request.reply, request.status, written);
            self.free.push(index);
            return Some(answer);
        }
    }
}

/// One queue's requests: the buffers chains are parsed into, the storage's engine, and the
/// requests the engine has not finished.
pub struct QueueRequests<E> {
    engine: E,
    scratch: RequestScratch,
    pending: PendingTable,
}

impl<E: Engine> QueueRequests<E> {
    /// `queue_size`: how many requests the queue can have in flight.
    pub fn new(engine: E, queue_size: u16) -> Self {
        QueueRequests {
            engine,
            scratch: RequestScratch::default(),
            pending: PendingTable::new(queue_size),
        }
    }

    pub fn engine(&mut self) -> &mut E {
        &mut self.engine
    }

    /// Engine operations in flight: while there are, guest memory must stay mapped.
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Serves one descriptor chain and returns the used length to report for it, or `None`
    /// when the engine works on and [`QueueRequests::next_finished`] answers it later.
    pub fn start<S, M>(
        &mut self,
        device: &BlockDevice<S>,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
    ) -> Option<u32>
    where
        S: Storage,
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let head = chain.head_index();
        let status_addr = match self
            .scratch
            .split(chain)
            .and_then(|()| self.scratch.take_status_byte(mem))
        {
            Ok(addr) => addr,
            Err(error) => {
                warn!("request at descriptor {head} dropped without status: {error}");
                return Some(0);
            }
        };
        let reply = Reply { head, status_addr };
        let answer = self.run(device, mem, reply).unwrap_or_else(|error| {
            warn!("request at descriptor {head} failed: {error}");
            Some((Status::IoError, 0))
        });
        answer.map(|(status, written)| complete(mem, reply, status, written))
    }

    /// The next request whose operations have all ended, as (head, used length), its status
    /// written; `None` when no more has.
    pub fn next_finished(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        while let Some(Completion { tag, result }) = self.engine.next_completed() {
            let index = tag as usize;
            if !self.pending.is_running(index) {
                warn!("completion of unknown request {tag}; ignored");
                continue;
            }
            self.pending.operation_ended(index, result);
            if let Some((reply, status, written)) = self.pending.settle(index, &mut self.engine) {
                return Some((reply.head, complete(mem, reply, status, written)));
            }
        }
        None
    }

    /// Runs one framed request; returns its status and the data bytes written to the guest,
    /// or `None` when the engine answers it later.
    fn run<S: Storage>(
        &mut self,
        device: &BlockDevice<S>,
        mem: &GuestMemoryMmap,
        reply: Reply,
    ) -> Result<Option<(Status, u32)>, RequestError> {
        let QueueRequests {
            engine,
            scratch,
            pending,
        } = self;
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
        let mut request = Pending {
            reply,
            kind: Kind::Flush,
            sector,
            len: 0,
            ops_left: 0,
            status: Status::Ok,
            flush_after: false,
        };
        let index = match header.request_type.to_native() {
            VIRTIO_BLK_T_IN => {
                require_empty("read", "device-readable", payload_len)?;
                let mut bufs = IoBuffers::new(iovecs);
                gather(mem, writable, 0, &mut bufs)?;
                // The used length, data plus status byte, must fit in 32 bits.
                written_len(bufs.len())?;
                let offset = match device.read_offset(sector, bufs.len()) {
                    Ok(offset) => offset,
                    Err(status) => return Ok(Some((status, 0))),
                };
                request.kind = Kind::Read;
                request.len = bufs.len() as u64;
                let index = pending.open(request);
                pending.started(index, engine.read(offset, bufs, index as u64));
                index
            }
            VIRTIO_BLK_T_OUT => {
                require_empty("write", "device-writable", writable_len)?;
                let mut bufs = IoBuffers::new(iovecs);
                gather(mem, readable, REQUEST_HEADER_SIZE as u64, &mut bufs)?;
                let offset = match device.write_offset(sector, bufs.len()) {
                    Ok(offset) => offset,
                    Err(status) => return Ok(Some((status, 0))),
                };
                request.kind = Kind::Write;
                request.len = bufs.len() as u64;
                request.flush_after = !device.writeback();
                let index = pending.open(request);
                pending.started(index, engine.write(offset, bufs, index as u64));
                index
            }
            // A read-only disk has nothing to make durable.
            VIRTIO_BLK_T_FLUSH if device.readonly() => return Ok(Some((Status::Ok, 0))),
            VIRTIO_BLK_T_FLUSH => {
                let index = pending.open(request);
                pending.started(index, engine.flush(index as u64));
                index
            }
            VIRTIO_BLK_T_GET_ID => {
                require_empty("get-id", "device-readable", payload_len)?;
                let len = (writable_len as usize).min(SERIAL_LEN);
                write_stream(mem, writable, &device.id()[..len])?;
                return Ok(Some((Status::Ok, written_len(len)?)));
            }
            request_type @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
                let (kind, operation) = if request_type == VIRTIO_BLK_T_DISCARD {
                    (Kind::Discard, RangeOperation::Discard)
                } else {
                    (Kind::WriteZeroes, RangeOperation::WriteZeroes)
                };
                require_empty(kind.name(), "device-writable", writable_len)?;
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
                if let Err(status) = device.check_ranges(operation, ranges) {
                    return Ok(Some((status, 0)));
                }
                request.kind = kind;
                request.sector = ranges[0].sector.to_native();
                request.len = ranges
                    .iter()
                    .map(|segment| zeroing(operation, segment).1)
                    .sum();
                request.flush_after = !device.writeback();
                let index = pending.open(request);
                for segment in ranges.iter() {
                    let (offset, len, may_unmap) = zeroing(operation, segment);
                    let outcome = engine.write_zeroes(offset, len, may_unmap, index as u64);
                    pending.started(index, outcome);
                    // Like a failed write, a failed segment fails the request: the rest are
                    // not started.
                    if pending.entries[index].status != Status::Ok {
                        break;
                    }
                }
                index
            }
            other => {
                warn!("unsupported request type {other}");
                return Ok(Some((Status::Unsupported, 0)));
            }
        };
        Ok(pending
            .settle(index, engine)
            .map(|(_, status, written)| (status, written)))
    }
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
