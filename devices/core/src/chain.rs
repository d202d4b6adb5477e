//! Descriptor chains of one-way queues (entropy requests, console receive and transmit) read as
//! a single byte stream, without relying on how the driver split it into descriptors.

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
    #[error("buffer {addr:#x}+{len} of descriptor {index} is outside guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
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
    let mut count = 0;
    let mut total = 0u64;
    let mut ends_with_next = false;
    for descriptor in chain {
        let writable = descriptor.is_write_only();
        if writable != (expected == Direction::DeviceWritable) {
            return Err(ChainError::WrongDirection {
                index: count,
                expected,
            });
        }
        let segment = Segment {
            addr: descriptor.addr(),
            len: descriptor.len(),
        };
        if !GuestMemoryBackend::check_range(mem, segment.addr, segment.len as usize) {
            return Err(ChainError::OutsideMemory {
                index: count,
                addr: segment.addr.raw_value(),
                len: segment.len,
            });
        }
        if segment.len > 0 {
            segments.push(segment);
            total += u64::from(segment.len);
        }
        ends_with_next = descriptor.has_next();
        count += 1;
    }
    // The iterator stops silently on a bad link; a chain whose last descriptor still says NEXT
    // was cut short (an empty chain is only possible that way too).
    if count == 0 || ends_with_next {
        return Err(ChainError::Truncated(count));
    }
    Ok(total)
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
