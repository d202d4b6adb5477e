//! virtio-blk requests (virtio 1.2 section 5.2.6) as a driver lays them out.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Buffer, DriverError};

pub const DEVICE_ID: u32 = 2;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const S_OK: u8 = 0;
/// What the status byte holds until the device writes it.
pub const STATUS_UNWRITTEN: u8 = 0xff;
pub const F_FLUSH: u64 = 1 << 9;
pub const HEADER_LEN: u32 = 16;

/// The header of a `request_type` request at `sector` (`struct virtio_blk_outhdr`).
pub fn header(request_type: u32, sector: u64) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    header
}

/// The data of a request.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'d> {
    None,
    /// Written to the device.
    Out(&'d [u8]),
    /// Read from the device, this many bytes.
    In(u32),
}

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

    /// Writes the header of a `request_type` request at `sector`, the payload going out if
    /// there is one, and marks the status unwritten; returns the chain: header, the data
    /// buffer unless the payload is [`Payload::None`], status.
    ///
    /// # Panics
    /// If the payload is longer than the data buffer: a bug of the caller.
    pub fn chain(
        &self,
        memory: &GuestMemoryMmap,
        request_type: u32,
        sector: u64,
        payload: Payload,
    ) -> Result<Vec<Buffer>, DriverError> {
        let data = match payload {
            Payload::None => None,
            Payload::Out(bytes) => Some((bytes.len(), false)),
            Payload::In(len) => Some((len as usize, true)),
        };
        memory.write_slice(&header(request_type, sector), self.header)?;
        memory.write_obj(STATUS_UNWRITTEN, self.status)?;
        let mut chain = vec![Buffer {
            addr: self.header,
            len: HEADER_LEN,
            device_writable: false,
        }];
        if let Some((len, device_writable)) = data {
            assert!(
                len <= self.data_len as usize,
                "payload larger than the data buffer"
            );
            if let Payload::Out(bytes) = payload {
                memory.write_slice(bytes, self.data)?;
            }
            chain.push(Buffer {
                addr: self.data,
                len: len as u32,
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

    /// The first `len` bytes of the data buffer: what a read request brought in.
    pub fn data(&self, memory: &GuestMemoryMmap, len: u32) -> Result<Vec<u8>, DriverError> {
        let mut data = vec![0u8; len as usize];
        memory.read_slice(&mut data, self.data)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_header_data_status() {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000_0000), 0x4_0000)]).unwrap();
        let buffers = RequestBuffers::at(GuestAddress(0x1000_0000), 0x1000);
        let chain = buffers
            .chain(
                &memory,
                T_OUT,
                0x0102_0304_0506_0708,
                Payload::Out(&[7; 512]),
            )
            .unwrap();
        let lens: Vec<(u32, bool)> = chain.iter().map(|b| (b.len, b.device_writable)).collect();
        assert_eq!(lens, [(16, false), (512, false), (1, true)]);
        let mut written = [0u8; 16];
        memory.read_slice(&mut written, buffers.header).unwrap();
        assert_eq!(written, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(buffers.data(&memory, 512).unwrap(), [7; 512]);
        assert_eq!(buffers.status(&memory).unwrap(), STATUS_UNWRITTEN);

        let chain = buffers.chain(&memory, T_IN, 8, Payload::In(64)).unwrap();
        assert_eq!((chain[1].len, chain[1].device_writable), (64, true));
        let chain = buffers.chain(&memory, T_FLUSH, 0, Payload::None).unwrap();
        assert_eq!(chain.len(), 2);
    }
}
