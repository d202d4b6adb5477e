//! What every device backend here has in common with the others.

use std::sync::RwLock;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

/// Feature bits every device offers: modern virtio, EVENT_IDX and indirect descriptors, plus
/// vhost-user's PROTOCOL_FEATURES (without it a vhost-user frontend negotiates no protocol
/// features; the hvisor transport does not offer it to its guests).
pub const COMMON_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The vhost-user protocol features every device offers.
pub fn common_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The guest memory a transport hands a backend through `update_memory`.
#[derive(Default)]
pub struct GuestMemorySlot(RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>);

impl GuestMemorySlot {
    pub fn replace(&self, memory: GuestMemoryAtomic<GuestMemoryMmap>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(memory);
    }

    /// A snapshot of the current memory, or `None` before the transport set any.
    pub fn current(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        let memory = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        memory.as_ref().map(GuestMemoryAtomic::memory)
    }
}
