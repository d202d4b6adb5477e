//! Wire formats of the virtio block device (virtio 1.2, section 5.2), little endian.

use vm_memory::{ByteValued, Le16, Le32, Le64};

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Request sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Device configuration layout up to the first secure-erase field.
///
/// Secure-erase and zoned features are not offered, so drivers read nothing past
/// `max_secure_erase_sectors`, which is kept (as zero) only to give the struct its natural
/// size without implicit padding.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    pub capacity: Le64,
    pub size_max: Le32,
    pub seg_max: Le32,
    pub geometry_cylinders: Le16,
    pub geometry_heads: u8,
    pub geometry_sectors: u8,
    pub blk_size: Le32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: Le16,
    pub opt_io_size: Le32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: Le16,
    pub max_discard_sectors: Le32,
    pub max_discard_seg: Le32,
    pub discard_sector_alignment: Le32,
    pub max_write_zeroes_sectors: Le32,
    pub max_write_zeroes_seg: Le32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
    pub max_secure_erase_sectors: Le32,
}

// SAFETY: plain integers only, `repr(C)` with no implicit padding (checked below), so every byte
// pattern is a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Offset of the `writeback` byte, the only field a driver may write (CONFIG_WCE).
pub const CONFIG_WRITEBACK_OFFSET: usize = std::mem::offset_of!(VirtioBlkConfig, writeback);

const _: () = {
    assert!(std::mem::size_of::<VirtioBlkConfig>() == 64);
    assert!(std::mem::offset_of!(VirtioBlkConfig, blk_size) == 20);
    assert!(CONFIG_WRITEBACK_OFFSET == 32);
    assert!(std::mem::offset_of!(VirtioBlkConfig, num_queues) == 34);
    assert!(std::mem::offset_of!(VirtioBlkConfig, max_discard_sectors) == 36);
    assert!(std::mem::offset_of!(VirtioBlkConfig, write_zeroes_may_unmap) == 56);
};

/// The request header every chain starts with (`struct virtio_blk_outhdr`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct RequestHeader {
    pub request_type: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}

// SAFETY: plain integers, `repr(C)`, no padding.
unsafe impl ByteValued for RequestHeader {}

pub const REQUEST_HEADER_SIZE: usize = std::mem::size_of::<RequestHeader>();

/// One range of a DISCARD or WRITE_ZEROES request
/// (`struct virtio_blk_discard_write_zeroes`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct DiscardWriteZeroesSegment {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}

// SAFETY: plain integers, `repr(C)`, no padding.
unsafe impl ByteValued for DiscardWriteZeroesSegment {}

pub const DISCARD_SEGMENT_SIZE: usize = std::mem::size_of::<DiscardWriteZeroesSegment>();

const _: () = {
    assert!(REQUEST_HEADER_SIZE == 16);
    assert!(DISCARD_SEGMENT_SIZE == 16);
};
