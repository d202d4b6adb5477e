//! Descriptor chains read as byte streams, without relying on how the driver split them into
//! descriptors: one stream for one-way queues (entropy requests, console receive and transmit),
//! a device-readable then a device-writable one for requests that carry an answer (block
//! requests, network control commands), one per side for network frames.

use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap,
};

/// One non-empty descriptor buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Which side of the chain a queue carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The driver sends data (e.g. a console transmitq).
    DeviceReadable,
    /// The device fills buffers (e.g. an entropy request, a console receiveq).
    DeviceWritable,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::DeviceReadable => "device-readable",
            Direction::DeviceWritable => "device-writable",
        })
    }
}

/// Why a chain is returned unused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error(
        "the chain ends on a descriptor flagged NEXT after {0} descriptors \
         (a loop, a next index beyond the table, or an unreadable descriptor)"
    )]
    Truncated(usize),
    #[error("descriptor {index} is not {expected}, as every buffer of this queue must be")]
    WrongDirection { index: usize, expected: Direction },
    #[error("descriptor {0} is device-readable but follows a device-writable one")]
    ReadableAfterWritable(usize),
    #[error("buffer {addr:#x}+{len} of descriptor {index} is outside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
}

/// Calls `take(index, buffer, device_writable)` for every descriptor of `chain` and returns how
/// many there were; fails at the first error of `take`, or when the chain was cut short.
fn walk<M>(
    chain: DescriptorChain<M>,
    mut take: impl FnMut(usize, Segment, bool) -> Result<(), ChainError>,
) -> Result<usize, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut count = 0;
    let mut ends_with_next = false;
    for descriptor in chain {
        let segment = Segment {
            addr: descriptor.addr(),
            len: descriptor.len(),
        };
        take(count, segment, descriptor.is_write_only())?;
        ends_with_next = descriptor.has_next();
        count += 1;
    }
    // The iterator stops silently on a bad link; a chain whose last descriptor still says NEXT
    // was cut short (an empty chain is only possible that way too).
    if count == 0 || ends_with_next {
        return Err(ChainError::Truncated(count));
    }
    Ok(count)
}

/// Fails unless the buffer of descriptor `index` lies wholly in guest memory.
fn check_in_memory(
    mem: &GuestMemoryMmap,
    index: usize,
    segment: Segment,
) -> Result<(), ChainError> {
    if GuestMemoryBackend::check_range(mem, segment.addr, segment.len as usize) {
        Ok(())
    } else {
        Err(ChainError::OutsideMemory {
            index,
            addr: segment.addr.raw_value(),
            len: segment.len,
        })
    }
}

/// Collects the buffers of `chain` into `segments` (cleared first) and returns their total
/// length. Every descriptor must be on the `expected` side and lie wholly in guest memory, so
/// nothing is transferred for a chain that would fail halfway.
pub fn collect_segments<M>(
    chain: DescriptorChain<M>,
    expected: Direction,
    mem: &GuestMemoryMmap,
    segments: &mut Vec<Segment>,
) -> Result<u64, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    segments.clear();
    walk(chain, |index, segment, writable| {
        if writable != (expected == Direction::DeviceWritable) {
            return Err(ChainError::WrongDirection { index, expected });
        }
        check_in_memory(mem, index, segment)?;
        if segment.len > 0 {
            segments.push(segment);
        }
        Ok(())
    })?;
    Ok(total_len(segments))
}

/// Appends the non-empty buffers of `chain` to `readable` (the device-readable ones, which
/// come first) and `writable` (the device-writable ones after them).
///
/// With `check_memory`, every buffer must lie wholly in it. Without, the caller checks each
/// buffer as it uses it, e.g. to answer a request whose data lies outside guest memory with an
/// error status rather than drop it.
pub fn split_chain<M>(
    chain: DescriptorChain<M>,
    check_memory: Option<&GuestMemoryMmap>,
    readable: &mut Vec<Segment>,
    writable: &mut Vec<Segment>,
) -> Result<(), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let writable_before = writable.len();
    walk(chain, |index, segment, device_writable| {
        if !device_writable && writable.len() > writable_before {
            return Err(ChainError::ReadableAfterWritable(index));
        }
        if let Some(mem) = check_memory {
            check_in_memory(mem, index, segment)?;
        }
        if segment.len > 0 {
            if device_writable {
                writable.push(segment);
            } else {
                readable.push(segment);
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Bytes in all `segments`.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|segment| u64::from(segment.len)).sum()
}

/// The pieces of `segments` that cover stream bytes `skip..skip + len`, as (guest address,
/// offset in the requested range, length).
pub fn stream_parts(
    segments: &[Segment],
    skip: u64,
    len: u64,
) -> impl Iterator<Item = (GuestAddress, usize, usize)> + '_ {
    let end = skip.saturating_add(len);
    let mut stream_offset = 0u64;
    segments.iter().filter_map(move |segment| {
        let segment_start = stream_offset;
        let segment_end = segment_start + u64::from(segment.len);
        stream_offset = segment_end;
        let from = segment_start.max(skip);
        let to = segment_end.min(end);
        (from < to).then(|| {
            (
                segment.addr.unchecked_add(from - segment_start),
                (from - skip) as usize,
                (to - from) as usize,
            )
        })
    })
}

/// Copies stream bytes `skip..skip + out.len()` into `out`.
pub fn read_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> Result<(), GuestMemoryError> {
    for (addr, at, len) in stream_parts(segments, skip, out.len() as u64) {
        mem.read_slice(&mut out[at..at + len], addr)?;
    }
    Ok(())
}

/// Copies `data` to the start of the stream.
pub fn write_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    data: &[u8],
) -> Result<(), GuestMemoryError> {
    for (addr, at, len) in stream_parts(segments, 0, data.len() as u64) {
        mem.write_slice(&data[at..at + len], addr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const SIZE: u16 = 8;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x100;
    const USED: u64 = 0x200;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    /// Guest memory with a ready queue whose avail ring offers one chain at descriptor `head`;
    /// `descriptors` are written to the table from index 0 (addr, len, flags, next). Small and
    /// free of eventfds and threads, so Miri runs it (scripts/miri).
    fn offered(descriptors: &[(u64, u32, u16, u16)], head: u16) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        for (index, &(addr, len, flags, next)) in descriptors.iter().enumerate() {
            write_descriptor(&mem, DESC + 16 * index as u64, (addr, len, flags, next));
        }
        mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        (mem, queue)
    }

    fn write_descriptor(
        mem: &GuestMemoryMmap,
        at: u64,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) {
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn collect(
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        expected: Direction,
    ) -> (Result<u64, ChainError>, Vec<Segment>) {
        let chain = queue.iter(mem).unwrap().next().expect("one chain offered");
        let mut segments = Vec::new();
        let result = collect_segments(chain, expected, mem, &mut segments);
        (result, segments)
    }

    #[test]
    fn a_chain_reads_and_writes_as_one_stream() {
        let (mem, mut queue) = offered(
            &[
                (0x1000, 3, WRITE | NEXT, 1),
                (0x1100, 0, WRITE | NEXT, 2),
                (0x1200, 5, WRITE, 0),
            ],
            0,
        );
        let (total, segments) = collect(&mem, &mut queue, Direction::DeviceWritable);
        assert_eq!(total, Ok(8));
        assert_eq!(segments.len(), 2, "the empty buffer is left out");
        write_stream(&mem, &segments, b"abcdefgh").unwrap();
        let mut out = [0u8; 6];
        read_stream(&mem, &segments, 1, &mut out).unwrap();
        assert_eq!(&out, b"bcdefg");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x1003)).unwrap(),
            0,
            "nothing past a buffer"
        );
    }

    #[test]
    fn indirect_tables_are_followed() {
        let (mem, mut queue) = offered(&[(0x800, 32, INDIRECT, 0)], 0);
        write_descriptor(&mem, 0x800, (0x1000, 4, NEXT, 1));
        write_descriptor(&mem, 0x810, (0x1100, 6, 0, 0));
        let (total, segments) = collect(&mem, &mut queue, Direction::DeviceReadable);
        assert_eq!(total, Ok(10));
        assert_eq!(
            segments[1],
            Segment {
                addr: GuestAddress(0x1100),
                len: 6
            }
        );
    }

    #[test]
    fn malformed_chains_are_refused_with_their_reason() {
        let (mem, mut queue) = offered(&[(0x1000, 4, NEXT, 1), (0x1100, 4, WRITE, 0)], 0);
        assert_eq!(
            collect(&mem, &mut queue, Direction::DeviceReadable).0,
            Err(ChainError::WrongDirection {
                index: 1,
                expected: Direction::DeviceReadable
            })
        );
        let (mem, mut queue) = offered(&[(0x1ff0, 0x20, 0, 0)], 0);
        assert_eq!(
            collect(&mem, &mut queue, Direction::DeviceReadable).0,
            Err(ChainError::OutsideMemory {
                index: 0,
                addr: 0x1ff0,
                len: 0x20
            })
        );
        // A loop: the iterator stops after the table's worth of links, still on NEXT.
        let (mem, mut queue) = offered(&[(0x1000, 4, NEXT, 1), (0x1100, 4, NEXT, 0)], 0);
        assert_eq!(
            collect(&mem, &mut queue, Direction::DeviceReadable).0,
            Err(ChainError::Truncated(usize::from(SIZE)))
        );
        // A next index beyond the table.
        let (mem, mut queue) = offered(&[(0x1000, 4, NEXT, 9)], 0);
        assert_eq!(
            collect(&mem, &mut queue, Direction::DeviceReadable).0,
            Err(ChainError::Truncated(1))
        );
    }

    #[test]
    fn stream_parts_cover_exactly_the_requested_range() {
        let segments = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 4,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 4,
            },
        ];
        let parts: Vec<_> = stream_parts(&segments, 2, 4).collect();
        assert_eq!(
            parts,
            vec![(GuestAddress(0x1002), 0, 2), (GuestAddress(0x2000), 2, 2)]
        );
        assert_eq!(stream_parts(&segments, 8, 10).count(), 0);
        assert_eq!(stream_parts(&segments, 0, u64::MAX).count(), 2);
    }
}
