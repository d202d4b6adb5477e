//! The virtio-blk device as a `VhostUserBackend`: one worker thread per queue, no lock shared
//! between queues on the data path.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use hvisor_vhost_device::config_space::read_config;
use hvisor_vhost_device::exit::new_exit_event;
use hvisor_vhost_device::queue::{QueueState, serve_queue};
use hvisor_vhost_device::{VIRTIO_ID_BLOCK, VirtioDevice};

use crate::config::{Backing, BlkConfig};
use crate::device::BlockDevice;
use crate::queue::{RequestScratch, process_chain};
use crate::storage::{FileStorage, OpenError, Storage};
use crate::virtio_blk::{
    CONFIG_WRITEBACK_OFFSET, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};

/// Errors building the backend.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error(transparent)]
    Open(#[from] OpenError),
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A virtio-blk device over any [`Storage`].
pub struct BlkBackend<S = FileStorage> {
    device: BlockDevice<S>,
    num_queues: u16,
    queue_size: u16,
    event_idx: AtomicBool,
    memory: RwLock<Option<Memory>>,
    /// Per-queue scratch. Each lock is taken only by its queue's worker, and by `stop_vring`
    /// to wait until that worker has finished its batch.
    workers: Vec<Mutex<RequestScratch>>,
}

impl BlkBackend<FileStorage> {
    /// Opens the backing store described by a validated config.
    pub fn new(config: &BlkConfig) -> Result<Self, BlkError> {
        let storage = match &config.backing {
            Backing::Image(path) => FileStorage::open(path, config.readonly)?,
            Backing::Memory { size } => FileStorage::memory(*size)?,
        };
        Self::with_storage(storage, config)
    }
}

impl<S: Storage> BlkBackend<S> {
    pub fn with_storage(storage: S, config: &BlkConfig) -> Result<Self, BlkError> {
        Ok(BlkBackend {
            device: BlockDevice::new(storage, config.readonly, &config.serial),
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            event_idx: AtomicBool::new(false),
            memory: RwLock::new(None),
            workers: (0..config.num_queues).map(|_| Mutex::default()).collect(),
        })
    }

    pub fn device(&self) -> &BlockDevice<S> {
        &self.device
    }

    /// Data segments per request: the queue minus the header and status descriptors.
    fn seg_max(&self) -> u32 {
        u32::from(self.queue_size) - 2
    }

    fn config_bytes(&self) -> Vec<u8> {
        self.device
            .config_space(self.num_queues, self.seg_max())
            .as_slice()
            .to_vec()
    }

    fn guest_memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        let memory = self
            .memory
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        memory.as_ref().map(GuestMemoryAtomic::memory)
    }

    /// Serves every available request of one queue; `serve_queue` re-checks after
    /// notifications are re-enabled, so a request that raced with the re-enable is not left
    /// behind, and stops once the queue is stopped.
    fn process_queue(&self, vring: &VringRwLock, queue_index: usize) -> io::Result<()> {
        let Some(mem) = self.guest_memory() else {
            warn!("queue {queue_index} kicked before guest memory was set; ignored");
            return Ok(());
        };
        let mut scratch = self.workers[queue_index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        serve_queue(vring, event_idx, || {
            let mut completed = 0usize;
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let used_len = process_chain(&self.device, &mem, chain, &mut scratch);
                if let Err(error) = vring.add_used(head, used_len) {
                    warn!("queue {queue_index}: cannot return descriptor {head}: {error}");
                    break;
                }
                completed += 1;
            }
            Ok((completed, QueueState::Drained))
        })
    }
}

impl<S: Storage> VirtioDevice for BlkBackend<S> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
}

impl<S: Storage> VhostUserBackend for BlkBackend<S> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.device.readonly() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        self.device.set_writeback(true);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.config_bytes(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match (offset as usize, buf) {
            (CONFIG_WRITEBACK_OFFSET, &[writeback]) => {
                self.device.set_writeback(writeback != 0);
                Ok(())
            }
            _ => {
                warn!(
                    "config write of {} bytes at offset {offset} refused: only the writeback \
                     byte at offset {CONFIG_WRITEBACK_OFFSET} is writable",
                    buf.len()
                );
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            }
        }
    }

    fn update_memory(&self, memory: Memory) -> io::Result<()> {
        *self
            .memory
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|queue| 1u64 << queue).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready, so once the worker's current batch is done it
        // takes no more requests: waiting for its lock waits for the in-flight ones.
        if let Some(worker) = self.workers.get(queue_index as usize) {
            drop(
                worker
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here stop the worker thread for good, so guest mistakes are
        // logged in `process_queue` and never propagated.
        if evset != EventSet::IN {
            warn!("queue thread {thread_id}: unexpected event set {evset:?}; ignored");
            return Ok(());
        }
        match (device_event, vrings) {
            (0, [vring]) if thread_id < self.workers.len() => self.process_queue(vring, thread_id),
            _ => {
                warn!("queue thread {thread_id}: unknown event {device_event}; ignored");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
