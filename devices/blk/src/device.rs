//! Block request semantics, independent of virtqueues and transports.
//!
//! [`BlockDevice`] is the disk as the guest sees it. Everything a guest can get wrong about
//! sectors, lengths, flags and permissions is checked here, before an engine sees the request;
//! everything it can get wrong about descriptor chains is checked in [`crate::request`].

use std::sync::atomic::{AtomicBool, Ordering};

use log::warn;
use vm_memory::{Le16, Le32, Le64};

use crate::storage::Storage;
use crate::virtio_blk::{
    DiscardWriteZeroesSegment, SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VirtioBlkConfig,
};

/// Largest range of one discard or write-zeroes segment, in sectors (just under 2 GiB, so a
/// byte count always fits in 32 bits).
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> SECTOR_SHIFT) & !7;
/// Segments per discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest single data buffer the driver may use (`size_max`).
pub const MAX_SEGMENT_SIZE: u32 = 1 << 20;

pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Completion status of a request (`VIRTIO_BLK_S_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    pub fn as_byte(self) -> u8 {
        let value = match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoError => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        };
        value as u8
    }
}

/// Which range operation a segment list asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeOperation {
    Discard,
    WriteZeroes,
}

/// A disk as the guest sees it: storage plus the read-only flag, serial and cache mode.
pub struct BlockDevice<S> {
    storage: S,
    readonly: bool,
    serial: [u8; SERIAL_LEN],
    /// Writeback cache (the default) or writethrough, which the driver may switch through the
    /// config space (CONFIG_WCE). Writethrough makes every write durable before it completes.
    writeback: AtomicBool,
}

impl<S: Storage> BlockDevice<S> {
    /// `serial` longer than [`SERIAL_LEN`] bytes is cut; configs validate it beforehand.
    pub fn new(storage: S, readonly: bool, serial: &str) -> Self {
        let mut id = [0u8; SERIAL_LEN];
        let len = serial.len().min(SERIAL_LEN);
        id[..len].copy_from_slice(&serial.as_bytes()[..len]);
        BlockDevice {
            storage,
            readonly,
            serial: id,
            writeback: AtomicBool::new(true),
        }
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.storage.size() >> SECTOR_SHIFT
    }

    /// The identifier returned by GET_ID: the serial, NUL padded to 20 bytes.
    pub fn id(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn set_writeback(&self, writeback: bool) {
        self.writeback.store(writeback, Ordering::Relaxed);
    }

    /// The full config space for `num_queues` queues and at most `seg_max` data segments.
    pub fn config_space(&self, num_queues: u16, seg_max: u32) -> VirtioBlkConfig {
        let logical = self.storage.logical_block_size();
        let physical = self.storage.physical_block_size();
        let physical_block_exp = (physical / logical).max(1).trailing_zeros() as u8;
        let min_io_size = u16::try_from(physical / logical).unwrap_or(1);
        VirtioBlkConfig {
            capacity: Le64::from(self.capacity_sectors()),
            size_max: Le32::from(MAX_SEGMENT_SIZE),
            seg_max: Le32::from(seg_max),
            blk_size: Le32::from(logical),
            physical_block_exp,
            min_io_size: Le16::from(min_io_size),
            writeback: u8::from(self.writeback()),
            num_queues: Le16::from(num_queues),
            max_discard_sectors: Le32::from(MAX_DISCARD_SECTORS),
            max_discard_seg: Le32::from(MAX_DISCARD_SEGMENTS),
            discard_sector_alignment: Le32::from((physical >> SECTOR_SHIFT).max(1)),
            max_write_zeroes_sectors: Le32::from(MAX_DISCARD_SECTORS),
            max_write_zeroes_seg: Le32::from(MAX_DISCARD_SEGMENTS),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Byte offset of `sector` if `len` bytes from there lie inside the disk.
    fn checked_range(&self, what: &str, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE);
        let end = offset.and_then(|offset| offset.checked_add(len));
        match (offset, end) {
            (Some(offset), Some(end)) if end <= self.storage.size() => Some(offset),
            _ => {
                warn!(
                    "{what}: sector {sector} + {len} bytes is beyond the disk ({} sectors)",
                    self.capacity_sectors()
                );
                None
            }
        }
    }

    fn data_range(&self, what: &str, sector: u64, len: usize) -> Option<u64> {
        if len as u64 % SECTOR_SIZE != 0 {
            warn!("{what}: sector {sector}: data length {len} is not a multiple of 512");
            return None;
        }
        self.checked_range(what, sector, len as u64)
    }

    fn refuse_if_readonly(&self, what: &str) -> Option<Status> {
        if self.readonly {
            warn!("{what} refused: the disk is read-only");
            Some(Status::IoError)
        } else {
            None
        }
    }

    /// The byte offset of a read of `len` bytes at `sector`, or the status that refuses it.
    pub fn read_offset(&self, sector: u64, len: usize) -> Result<u64, Status> {
        self.data_range("read", sector, len).ok_or(Status::IoError)
    }

    /// The byte offset of a write of `len` bytes at `sector`, or the status that refuses it.
    pub fn write_offset(&self, sector: u64, len: usize) -> Result<u64, Status> {
        if let Some(status) = self.refuse_if_readonly("write") {
            return Err(status);
        }
        self.data_range("write", sector, len).ok_or(Status::IoError)
    }

    /// Checks a discard or write-zeroes segment list whole, before anything is changed.
    pub fn check_ranges(
        &self,
        operation: RangeOperation,
        segments: &[DiscardWriteZeroesSegment],
    ) -> Result<(), Status> {
        let what = match operation {
            RangeOperation::Discard => "discard",
            RangeOperation::WriteZeroes => "write-zeroes",
        };
        if let Some(status) = self.refuse_if_readonly(what) {
            return Err(status);
        }
        // Flag checks come first: an unsupported flag anywhere makes the whole request
        // unsupported, as the spec requires.
        let allowed_flags = match operation {
            RangeOperation::Discard => 0,
            RangeOperation::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        };
        if let Some(segment) = segments
            .iter()
            .find(|segment| segment.flags.to_native() & !allowed_flags != 0)
        {
            warn!("{what}: unsupported flags {:#x}", segment.flags.to_native());
            return Err(Status::Unsupported);
        }
        for segment in segments {
            let sector = segment.sector.to_native();
            let sectors = segment.num_sectors.to_native();
            if sectors > MAX_DISCARD_SECTORS {
                warn!("{what}: {sectors} sectors exceed the limit of {MAX_DISCARD_SECTORS}");
                return Err(Status::IoError);
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            if self.checked_range(what, sector, len).is_none() {
                return Err(Status::IoError);
            }
        }
        Ok(())
    }
}

/// The byte offset, length and unmap permission of a segment [`BlockDevice::check_ranges`]
/// accepted. A discard is a zeroing that may unmap: this device's discards leave zeroes.
pub fn zeroing(operation: RangeOperation, segment: &DiscardWriteZeroesSegment) -> (u64, u64, bool) {
    let offset = segment.sector.to_native() << SECTOR_SHIFT;
    let len = u64::from(segment.num_sectors.to_native()) << SECTOR_SHIFT;
    let may_unmap = match operation {
        RangeOperation::Discard => true,
        RangeOperation::WriteZeroes => {
            segment.flags.to_native() & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
        }
    };
    (offset, len, may_unmap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorage;

    const DISK_SIZE: u64 = 64 * 1024;

    fn device(readonly: bool) -> BlockDevice<FileStorage> {
        BlockDevice::new(FileStorage::memory(DISK_SIZE).unwrap(), readonly, "disk-1")
    }

    fn segment(sector: u64, num_sectors: u32, flags: u32) -> DiscardWriteZeroesSegment {
        DiscardWriteZeroesSegment {
            sector: Le64::from(sector),
            num_sectors: Le32::from(num_sectors),
            flags: Le32::from(flags),
        }
    }

    #[test]
    fn ranges_beyond_the_disk_or_overflowing_fail() {
        let device = device(false);
        let last = device.capacity_sectors() - 1;
        assert_eq!(device.read_offset(last, 512), Ok(last * 512));
        assert_eq!(device.read_offset(last, 1024), Err(Status::IoError));
        assert_eq!(device.read_offset(u64::MAX, 512), Err(Status::IoError));
        assert_eq!(
            device.read_offset(u64::MAX >> 9, 1024),
            Err(Status::IoError)
        );
        assert_eq!(device.write_offset(last + 1, 512), Err(Status::IoError));
        assert_eq!(device.write_offset(3, 1024), Ok(3 * 512));
        assert_eq!(
            device.read_offset(0, 100),
            Err(Status::IoError),
            "not sector sized"
        );
    }

    #[test]
    fn readonly_refuses_every_change() {
        let device = device(true);
        assert_eq!(device.read_offset(0, 512), Ok(0));
        assert_eq!(device.write_offset(0, 512), Err(Status::IoError));
        for operation in [RangeOperation::Discard, RangeOperation::WriteZeroes] {
            assert_eq!(
                device.check_ranges(operation, &[segment(0, 1, 0)]),
                Err(Status::IoError)
            );
        }
    }

    #[test]
    fn discard_and_write_zeroes_check_flags_and_ranges() {
        let device = device(false);
        assert_eq!(
            device.check_ranges(RangeOperation::Discard, &[segment(0, 1, 1)]),
            Err(Status::Unsupported),
            "discard must not carry the unmap flag"
        );
        assert_eq!(
            device.check_ranges(RangeOperation::WriteZeroes, &[segment(0, 1, 2)]),
            Err(Status::Unsupported)
        );
        assert_eq!(
            device.check_ranges(
                RangeOperation::WriteZeroes,
                &[segment(u64::MAX, 1, 0), segment(0, 1, 2)]
            ),
            Err(Status::Unsupported),
            "flags are checked before any range"
        );
        assert_eq!(
            device.check_ranges(RangeOperation::Discard, &[segment(u64::MAX, 1, 0)]),
            Err(Status::IoError)
        );
        assert_eq!(
            device.check_ranges(
                RangeOperation::Discard,
                &[segment(0, MAX_DISCARD_SECTORS + 1, 0)]
            ),
            Err(Status::IoError)
        );
        assert_eq!(
            device.check_ranges(
                RangeOperation::Discard,
                &[segment(0, 1, 0), segment(DISK_SIZE / 512, 1, 0)]
            ),
            Err(Status::IoError),
            "a bad segment after a good one fails the whole list"
        );
        let unmap = segment(8, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            device.check_ranges(RangeOperation::WriteZeroes, &[segment(0, 2, 0), unmap]),
            Ok(())
        );
        assert_eq!(
            zeroing(RangeOperation::WriteZeroes, &segment(0, 2, 0)),
            (0, 1024, false)
        );
        assert_eq!(
            zeroing(RangeOperation::WriteZeroes, &unmap),
            (4096, 2048, true)
        );
        assert_eq!(
            zeroing(RangeOperation::Discard, &segment(12, 1, 0)),
            (6144, 512, true)
        );
    }

    #[test]
    fn writethrough_is_reported_in_the_config_space() {
        let device = device(false);
        assert_eq!(device.config_space(1, 126).writeback, 1);
        device.set_writeback(false);
        assert!(!device.writeback());
        assert_eq!(device.config_space(1, 126).writeback, 0);
    }

    #[test]
    fn config_space_describes_the_disk() {
        let device = BlockDevice::new(FileStorage::memory(1 << 20).unwrap(), false, "x");
        let config = device.config_space(4, 254);
        assert_eq!(config.capacity.to_native(), 2048);
        assert_eq!(config.num_queues.to_native(), 4);
        assert_eq!(config.seg_max.to_native(), 254);
        assert_eq!(config.blk_size.to_native(), 512);
        assert_eq!(config.physical_block_exp, 3);
        assert_eq!(config.min_io_size.to_native(), 8);
        assert_eq!(config.writeback, 1);
        assert_eq!(config.write_zeroes_may_unmap, 1);
        assert_eq!(config.max_discard_seg.to_native(), MAX_DISCARD_SEGMENTS);
        assert_eq!(&device.id()[..2], b"x\0");
    }
}
