//! Wire formats of the virtio network device (virtio 1.2, section 5.1), little endian, and
//! what the negotiated features mean for the TAP.

use vm_memory::{ByteValued, Le16, Le32};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK, VIRTIO_NET_S_LINK_UP,
};

/// Ethernet header: destination, source, EtherType.
pub const ETH_HEADER_LEN: usize = 14;

/// Largest frame handled, virtio-net header included: a 64 KiB GSO packet plus its Ethernet
/// and VLAN headers and the 12-byte header (the bound cloud-hypervisor and QEMU use too).
pub const MAX_FRAME_LEN: usize = 65562;

/// The virtio-net header with `num_buffers` (`struct virtio_net_hdr_mrg_rxbuf`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: Le16,
    pub gso_size: Le16,
    pub csum_start: Le16,
    pub csum_offset: Le16,
    pub num_buffers: Le16,
}

// SAFETY: plain integers, `repr(C)`, no padding (checked below).
unsafe impl ByteValued for VirtioNetHeader {}

/// Header length with `num_buffers`: VERSION_1 or MRG_RXBUF drivers use it.
pub const HEADER_LEN: usize = std::mem::size_of::<VirtioNetHeader>();
/// Header length of legacy drivers without MRG_RXBUF.
pub const LEGACY_HEADER_LEN: usize = 10;
/// Where `num_buffers` sits in the header.
pub const NUM_BUFFERS_OFFSET: usize = std::mem::offset_of!(VirtioNetHeader, num_buffers);

/// Device configuration (`struct virtio_net_config`), every field filled.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetConfig {
    pub mac: [u8; 6],
    pub status: Le16,
    pub max_virtqueue_pairs: Le16,
    pub mtu: Le16,
    pub speed: Le32,
    pub duplex: u8,
    pub rss_max_key_size: u8,
    pub rss_max_indirection_table_length: Le16,
    pub supported_hash_types: Le32,
}

// SAFETY: plain integers and bytes, `repr(C)`, no implicit padding (checked below), so every
// byte pattern is a valid value and no byte is left uninitialised.
unsafe impl ByteValued for VirtioNetConfig {}

/// `speed` and `duplex` values meaning "unknown" (virtio 1.2, 5.1.4).
pub const SPEED_UNKNOWN: u32 = u32::MAX;
pub const DUPLEX_UNKNOWN: u8 = 0xff;

/// The control-queue command header (`struct virtio_net_ctrl_hdr`).
pub const CTRL_HEADER_LEN: usize = 2;

const _: () = {
    assert!(HEADER_LEN == 12);
    assert!(NUM_BUFFERS_OFFSET == 10);
    assert!(std::mem::size_of::<VirtioNetConfig>() == 24);
    assert!(std::mem::offset_of!(VirtioNetConfig, status) == 6);
    assert!(std::mem::offset_of!(VirtioNetConfig, max_virtqueue_pairs) == 8);
    assert!(std::mem::offset_of!(VirtioNetConfig, mtu) == 10);
    assert!(std::mem::offset_of!(VirtioNetConfig, speed) == 12);
    assert!(std::mem::offset_of!(VirtioNetConfig, supported_hash_types) == 20);
};

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The header length the driver uses, which the TAP must prepend and expect as well.
pub fn header_len(features: u64) -> usize {
    if has(features, VIRTIO_F_VERSION_1) || has(features, VIRTIO_NET_F_MRG_RXBUF) {
        HEADER_LEN
    } else {
        LEGACY_HEADER_LEN
    }
}

/// TUNSETOFFLOAD flags for what the driver accepts on receive: the TAP may then hand us
/// packets with partial checksums or GSO, which go to the guest as they are.
pub fn tap_offloads(features: u64) -> u32 {
    let mut offloads = 0;
    if has(features, VIRTIO_NET_F_GUEST_CSUM) {
        offloads |= libc::TUN_F_CSUM;
        if has(features, VIRTIO_NET_F_GUEST_TSO4) {
            offloads |= libc::TUN_F_TSO4;
        }
        if has(features, VIRTIO_NET_F_GUEST_TSO6) {
            offloads |= libc::TUN_F_TSO6;
        }
        if has(features, VIRTIO_NET_F_GUEST_ECN) {
            offloads |= libc::TUN_F_TSO_ECN;
        }
        if has(features, VIRTIO_NET_F_GUEST_UFO) {
            offloads |= libc::TUN_F_UFO;
        }
    }
    offloads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_version_and_mergeable_buffers() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(1 << VIRTIO_F_VERSION_1), 12);
        assert_eq!(header_len(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
    }

    #[test]
    fn offloads_need_guest_checksum() {
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        let all = [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
        ]
        .iter()
        .fold(0u64, |features, bit| features | 1 << bit);
        assert_eq!(
            tap_offloads(all),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
    }
}
