//! Descriptor chains to validated buffer lists.
//!
//! Every buffer is checked against guest memory over its whole length before the device
//! touches it, and each queue's direction is enforced: TX chains are device-readable only, RX
//! chains device-writable only, control chains readable then writable.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// One non-empty descriptor buffer, inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    #[error(
        "the chain ends on a descriptor flagged NEXT after {0} descriptors \
         (a loop, a next index beyond the table, or an unreadable descriptor)"
    )]
    Truncated(usize),
    #[error("descriptor {0} is device-readable but follows a device-writable one")]
    ReadableAfterWritable(usize),
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// A chain's device-readable and device-writable buffers, in chain order.
pub(crate) fn split_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    readable: &mut Vec<Segment>,
    writable: &mut Vec<Segment>,
) -> Result<(), ChainError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut count = 0;
    let mut ends_with_next = false;
    for descriptor in chain {
        let segment = Segment {
            addr: descriptor.addr(),
            len: descriptor.len(),
        };
        if !descriptor.is_write_only() && !writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable(count));
        }
        if segment.len > 0 {
            if !mem.check_range(segment.addr, segment.len as usize) {
                return Err(ChainError::OutsideMemory {
                    addr: segment.addr.0,
                    len: segment.len,
                });
            }
            if descriptor.is_write_only() {
                writable.push(segment);
            } else {
                readable.push(segment);
            }
        }
        ends_with_next = descriptor.has_next();
        count += 1;
    }
    if ends_with_next {
        return Err(ChainError::Truncated(count));
    }
    Ok(())
}

pub(crate) fn total_len(segments: &[Segment]) -> usize {
    segments.iter().map(|segment| segment.len as usize).sum()
}

/// Copies the start of the byte stream `segments` describe into `out`; returns the bytes
/// copied (fewer when the stream is shorter).
pub(crate) fn read_stream(mem: &GuestMemoryMmap, segments: &[Segment], out: &mut [u8]) -> usize {
    let mut done = 0;
    for segment in segments {
        if done == out.len() {
            break;
        }
        let take = (segment.len as usize).min(out.len() - done);
        if mem
            .read_slice(&mut out[done..done + take], segment.addr)
            .is_err()
        {
            break;
        }
        done += take;
    }
    done
}

/// Copies `data` to the start of the byte stream `segments` describe; returns the bytes
/// copied.
pub(crate) fn write_stream(mem: &GuestMemoryMmap, segments: &[Segment], data: &[u8]) -> usize {
    let mut done = 0;
    for segment in segments {
        if done == data.len() {
            break;
        }
        let take = (segment.len as usize).min(data.len() - done);
        if mem
            .write_slice(&data[done..done + take], segment.addr)
            .is_err()
        {
            break;
        }
        done += take;
    }
    done
}
