//! The driver's side of virtio, for the tools that play a guest: a split virtqueue in guest
//! memory and the virtio-blk request layout. The hvisor simulator's guest, the integration
//! tests and the benches share it.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("queue is full")]
    QueueFull,
}

/// The driver's side of a split virtqueue in guest memory.
pub struct DriverQueue {
    pub index: u32,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: Vec<u16>,
    next_avail: u16,
    last_used: u16,
    /// Descriptor count of each chain in flight, by head.
    chain_lengths: Vec<u16>,
}

/// A buffer of a chain: guest address, length, and whether the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    pub device_writable: bool,
}

impl DriverQueue {
    /// Bytes a queue of `size` entries occupies from its start (rings page aligned).
    pub fn footprint(size: u16) -> u64 {
        let size = u64::from(size);
        let align = |value: u64| value.next_multiple_of(4096);
        align(16 * size) + align(6 + 2 * size) + align(6 + 8 * size)
    }

    /// A queue of `size` entries laid out from `at` (rings page aligned), all free.
    pub fn new(index: u32, size: u16, at: GuestAddress) -> Self {
        let entries = u64::from(size);
        let desc = at;
        let avail = GuestAddress((at.0 + 16 * entries).next_multiple_of(4096));
        let used = GuestAddress((avail.0 + 6 + 2 * entries).next_multiple_of(4096));
        DriverQueue {
            index,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            next_avail: 0,
            last_used: 0,
            chain_lengths: vec![0; usize::from(size)],
        }
    }

    /// Zeroes the rings; call before the device is given the queue on reused memory.
    pub fn clear(memory: &GuestMemoryMmap, size: u16, at: GuestAddress) -> Result<(), DriverError> {
        memory.write_slice(&vec![0u8; Self::footprint(size) as usize], at)?;
        Ok(())
    }

    /// Publishes a chain; returns its head.
    pub fn add(
        &mut self,
        memory: &GuestMemoryMmap,
        buffers: &[Buffer],
    ) -> Result<u16, DriverError> {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return Err(DriverError::QueueFull);
        }
        let indices: Vec<u16> = (0..buffers.len()).filter_map(|_| self.free.pop()).collect();
        for (position, (buffer, &index)) in buffers.iter().zip(&indices).enumerate() {
            let next = indices.get(position + 1).copied();
            let mut flags = if buffer.device_writable {
                DESC_F_WRITE
            } else {
                0
            };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            let at = self.desc.unchecked_add(16 * u64::from(index));
            memory.write_obj(buffer.addr.0.to_le(), at)?;
            memory.write_obj(buffer.len.to_le(), at.unchecked_add(8))?;
            memory.write_obj(flags.to_le(), at.unchecked_add(12))?;
            memory.write_obj(next.unwrap_or(0).to_le(), at.unchecked_add(14))?;
        }
        let head = indices[0];
        self.chain_lengths[usize::from(head)] = buffers.len() as u16;
        let slot = u64::from(self.next_avail % self.size);
        memory.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and ring entry are written before the index that
        // publishes them (the device reads the index, then fences).
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        memory.write_obj(self.next_avail.to_le(), self.avail.unchecked_add(2))?;
        Ok(head)
    }

    /// Takes the next completed chain: (head, used length).
    pub fn pop_used(
        &mut self,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<(u16, u32)>, DriverError> {
        let used_idx = u16::from_le(memory.read_obj(self.used.unchecked_add(2))?);
        if used_idx == self.last_used {
            return Ok(None);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let element = self.used.unchecked_add(4 + 8 * slot);
        let head = u32::from_le(memory.read_obj(element)?) as u16;
        let len = u32::from_le(memory.read_obj(element.unchecked_add(4))?);
        self.last_used = self.last_used.wrapping_add(1);
        // used_event (EVENT_IDX): interrupt me again for the next completion.
        let used_event = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        memory.write_obj(self.last_used.to_le(), used_event)?;
        let count = usize::from(self.chain_lengths[usize::from(head) % usize::from(self.size)]);
        let mut index = head;
        for _ in 0..count {
            self.free.push(index);
            let flags =
                u16::from_le(memory.read_obj(self.desc.unchecked_add(16 * u64::from(index) + 12))?);
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            index =
                u16::from_le(memory.read_obj(self.desc.unchecked_add(16 * u64::from(index) + 14))?);
        }
        Ok(Some((head, len)))
    }
}

/// virtio-blk requests (virtio 1.2 section 5.2.6) as a driver lays them out.
pub mod blk {
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use super::{Buffer, DriverError};

    pub const DEVICE_ID: u32 = 2;
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const S_OK: u8 = 0;
    /// What the status byte holds until the device writes it.
    pub const STATUS_UNWRITTEN: u8 = 0xff;
    pub const F_FLUSH: u64 = 1 << 9;
    pub const HEADER_LEN: u32 = 16;

    /// The guest memory of one request at a time: header, status byte and a data buffer of
    /// `data_len` bytes, laid out from `at` (a page for header and status, then the data).
    #[derive(Clone, Copy, Debug)]
    pub struct RequestBuffers {
        pub header: GuestAddress,
        pub status: GuestAddress,
        pub data: GuestAddress,
        pub data_len: u32,
    }

    impl RequestBuffers {
        pub fn at(at: GuestAddress, data_len: u32) -> Self {
            RequestBuffers {
                header: at,
                status: at.unchecked_add(u64::from(HEADER_LEN)),
                data: at.unchecked_add(4096),
                data_len,
            }
        }

        /// Writes the header of a `request_type` request at `sector` and marks the status
        /// unwritten; returns the chain: header, the data buffer if `data` gives its length
        /// and direction (`true`: the device writes it), status.
        ///
        /// # Panics
        /// If the data is longer than the data buffer: a bug of the caller.
        pub fn chain(
            &self,
            memory: &GuestMemoryMmap,
            request_type: u32,
            sector: u64,
            data: Option<(u32, bool)>,
        ) -> Result<Vec<Buffer>, DriverError> {
            let mut header = [0u8; HEADER_LEN as usize];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            memory.write_slice(&header, self.header)?;
            memory.write_obj(STATUS_UNWRITTEN, self.status)?;
            let mut chain = vec![Buffer {
                addr: self.header,
                len: HEADER_LEN,
                device_writable: false,
            }];
            if let Some((len, device_writable)) = data {
                assert!(len <= self.data_len, "payload larger than the data buffer");
                chain.push(Buffer {
                    addr: self.data,
                    len,
                    device_writable,
                });
            }
            chain.push(Buffer {
                addr: self.status,
                len: 1,
                device_writable: true,
            });
            Ok(chain)
        }

        pub fn status(&self, memory: &GuestMemoryMmap) -> Result<u8, DriverError> {
            Ok(memory.read_obj(self.status)?)
        }
    }
}
