//! The driver's side of virtio, for the tools that play a guest: a split virtqueue in guest
//! memory ([`QueueLayout`], [`DriverQueue`]) and the virtio-blk request layout ([`blk`]). The
//! hvisor simulator's guest, the vhost-user test frontend, the integration tests and the
//! examples share it; what differs between them (how the device is told about a queue, how
//! it is kicked, where buffers come from) stays with each of them.

pub mod blk;
mod queue;

pub use queue::{DESC_SIZE, DriverQueue, QueueLayout, write_descriptor};

/// Device status bits a driver sets (virtio 1.2 section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
/// Feature bits of every device type (virtio 1.2 section 6).
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    #[error("queue {queue}: {needed} descriptors needed, {free} free")]
    OutOfDescriptors {
        queue: u32,
        needed: usize,
        free: usize,
    },
    #[error("queue {queue}: the device used head {head}, which was not in flight")]
    UnknownHead { queue: u32, head: u32 },
}

/// A buffer of a chain: guest address, length, and whether the device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: vm_memory::GuestAddress,
    pub len: u32,
    pub device_writable: bool,
}
