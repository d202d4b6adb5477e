//! Wire formats of the virtio console device (virtio 1.2, section 5.3), little endian.

use vm_memory::{ByteValued, Le16, Le32};

/// `cols` and `rows` are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;

pub const RECEIVEQ: u16 = 0;
pub const TRANSMITQ: u16 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioConsoleConfig {
    pub cols: Le16,
    pub rows: Le16,
    pub max_nr_ports: Le32,
    pub emerg_wr: Le32,
}

// SAFETY: plain integers only, `repr(C)` with no implicit padding (checked below), so every byte
// pattern is a valid value.
unsafe impl ByteValued for VirtioConsoleConfig {}

const _: () = assert!(std::mem::size_of::<VirtioConsoleConfig>() == 12);
