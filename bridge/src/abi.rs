//! The `virtio_bridge` page shared by hvisor, `hvisor.ko` and this daemon, and the
//! `/dev/hvisor` ioctl numbers (hvisor-tool `include/hvisor.h`).
//!
//! Every field is an atomic of the C field's width, so the page can be viewed as
//! [`VirtioBridge`] while the hypervisor writes it concurrently. The layout is checked against
//! the C offsets at compile time. Under `cfg(loom)` the same struct is built from loom's atomics
//! (with loom's own layout) so the protocol in [`super::ring`] can be model-checked unchanged.

use super::sync::{AtomicU8, AtomicU16, AtomicU32, AtomicU64};

/// Slots in the request ring and in the result ring.
pub const MAX_REQ: u32 = 32;
/// Entries of `cfg_flags` / `cfg_values`, indexed by physical CPU id.
pub const MAX_CPUS: usize = 32;
/// Devices of one daemon, over all zones.
pub const MAX_DEVS: usize = 8;
/// Bytes of the bridge mapping.
pub const BRIDGE_MAP_SIZE: usize = 4096;
/// QueueNotify register offset; hypervisors mark notifies at a window's start as posted writes.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// `HVISOR_INIT_VIRTIO` = `_IO(1, 0)`.
pub const HVISOR_INIT_VIRTIO: u64 = 0x100;
/// `HVISOR_FINISH_REQ` = `_IO(1, 2)`.
pub const HVISOR_FINISH_REQ: u64 = 0x102;
/// `HVISOR_SET_EVENTFD` = `_IOW(1, 7, int)`; the eventfd is passed by value.
pub const HVISOR_SET_EVENTFD: u64 = 0x4004_0107;
/// `HVISOR_DEASSERT_IRQ` = `_IOW(1, 11, struct hvisor_irq_line_args)` (LoongArch builds only).
pub const HVISOR_DEASSERT_IRQ: u64 = 0x4008_010b;

/// One trapped MMIO access (`struct device_req`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct DeviceReqSlot {
    pub src_cpu: AtomicU64,
    pub address: AtomicU64,
    pub size: AtomicU64,
    pub value: AtomicU64,
    pub src_zone: AtomicU32,
    pub is_write: AtomicU8,
    pub need_interrupt: AtomicU8,
    pub padding: AtomicU16,
}

/// "Inject interrupt `irq_id` into zone `target_zone`" (`struct device_res`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct DeviceResSlot {
    pub target_zone: AtomicU32,
    pub irq_id: AtomicU32,
}

/// `struct virtio_bridge`, at offset 0 of the shared page.
#[repr(C)]
#[derive(Debug, Default)]
pub struct VirtioBridge {
    pub req_front: AtomicU32,
    pub req_rear: AtomicU32,
    pub res_front: AtomicU32,
    pub res_rear: AtomicU32,
    pub req_list: [DeviceReqSlot; MAX_REQ as usize],
    pub res_list: [DeviceResSlot; MAX_REQ as usize],
    pub cfg_flags: [AtomicU64; MAX_CPUS],
    pub cfg_values: [AtomicU64; MAX_CPUS],
    pub mmio_addrs: [AtomicU64; MAX_DEVS],
    pub mmio_avail: AtomicU8,
    pub need_wakeup: AtomicU8,
}

#[cfg(not(loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<DeviceReqSlot>() == 40);
    assert!(align_of::<DeviceReqSlot>() == 8);
    assert!(offset_of!(DeviceReqSlot, src_cpu) == 0);
    assert!(offset_of!(DeviceReqSlot, address) == 8);
    assert!(offset_of!(DeviceReqSlot, size) == 16);
    assert!(offset_of!(DeviceReqSlot, value) == 24);
    assert!(offset_of!(DeviceReqSlot, src_zone) == 32);
    assert!(offset_of!(DeviceReqSlot, is_write) == 36);
    assert!(offset_of!(DeviceReqSlot, need_interrupt) == 37);
    assert!(offset_of!(DeviceReqSlot, padding) == 38);
    assert!(size_of::<DeviceResSlot>() == 8);
    assert!(offset_of!(DeviceResSlot, target_zone) == 0);
    assert!(offset_of!(DeviceResSlot, irq_id) == 4);
    assert!(size_of::<VirtioBridge>() == 2136);
    assert!(align_of::<VirtioBridge>() == 8);
    assert!(offset_of!(VirtioBridge, req_front) == 0);
    assert!(offset_of!(VirtioBridge, req_rear) == 4);
    assert!(offset_of!(VirtioBridge, res_front) == 8);
    assert!(offset_of!(VirtioBridge, res_rear) == 12);
    assert!(offset_of!(VirtioBridge, req_list) == 16);
    assert!(offset_of!(VirtioBridge, res_list) == 1296);
    assert!(offset_of!(VirtioBridge, cfg_flags) == 1552);
    assert!(offset_of!(VirtioBridge, cfg_values) == 1808);
    assert!(offset_of!(VirtioBridge, mmio_addrs) == 2064);
    assert!(offset_of!(VirtioBridge, mmio_avail) == 2128);
    assert!(offset_of!(VirtioBridge, need_wakeup) == 2129);
    assert!(size_of::<VirtioBridge>() <= BRIDGE_MAP_SIZE);
};

/// A request copied out of its slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceReq {
    pub src_cpu: u64,
    pub address: u64,
    pub size: u64,
    pub value: u64,
    pub src_zone: u32,
    pub is_write: bool,
    /// Posted (asynchronous) access: the vCPU is not waiting for an answer.
    pub need_interrupt: bool,
}

/// An interrupt to inject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRes {
    pub target_zone: u32,
    pub irq_id: u32,
}

/// Index after `index` in either ring.
pub const fn ring_next(index: u32) -> u32 {
    (index + 1) & (MAX_REQ - 1)
}
