//! The driver's side of a split virtqueue (virtio 1.2 section 2.7): where its rings lie, how
//! chains are published, when the device wants a notification (EVENT_IDX or
//! `VRING_USED_F_NO_NOTIFY`) and how used elements are reaped.
//!
//! Memory ordering: the device runs on another thread (or process) and reads the rings
//! through its own mapping. The driver publishes a chain with a release store of
//! `avail->idx` after writing the descriptors and the ring entry, and reads `used->idx` with
//! an acquire load before the used element and the buffers the device wrote. Where the two
//! sides each store one index and load the other's (notification suppression), a `SeqCst`
//! fence sits between the store and the load, as virtio drivers' `virtio_mb` does.

use std::collections::HashMap;
use std::sync::atomic::{Ordering, fence};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Buffer, DriverError};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
/// One descriptor: addr (8 bytes), len (4), flags (2), next (2).
pub const DESC_SIZE: u64 = 16;
/// One used element: id (4 bytes), len (4).
const USED_ELEMENT_SIZE: u64 = 8;
/// Rings are page aligned, though virtio only needs 16, 2 and 4 bytes: every ring then has
/// pages of its own, which keeps hex dumps readable.
const RING_ALIGN: u64 = 4096;

/// Where the three rings of a split virtqueue of `size` entries lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

/// Bytes of each ring of a `size`-entry queue: (descriptor table, avail ring with
/// `used_event`, used ring with `avail_event`).
fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let entries = u64::from(size);
    (
        DESC_SIZE * entries,
        6 + 2 * entries,
        6 + USED_ELEMENT_SIZE * entries,
    )
}

impl QueueLayout {
    /// Bytes a queue of `size` entries laid out by [`Self::new`] occupies from its start.
    pub fn footprint(size: u16) -> u64 {
        let (desc, avail, used) = ring_sizes(size);
        desc.next_multiple_of(RING_ALIGN)
            + avail.next_multiple_of(RING_ALIGN)
            + used.next_multiple_of(RING_ALIGN)
    }

    /// The rings of a `size`-entry queue one after the other from `at`, each starting on a
    /// page boundary.
    pub fn new(size: u16, at: GuestAddress) -> Self {
        let (desc_len, avail_len, _) = ring_sizes(size);
        let avail = GuestAddress((at.0 + desc_len).next_multiple_of(RING_ALIGN));
        let used = GuestAddress((avail.0 + avail_len).next_multiple_of(RING_ALIGN));
        QueueLayout {
            size,
            desc: at,
            avail,
            used,
        }
    }

    /// The first address after the rings of a layout made by [`Self::new`].
    pub fn end(&self) -> GuestAddress {
        self.desc.unchecked_add(Self::footprint(self.size))
    }

    /// Zeroes the rings of a layout made by [`Self::new`]: a queue on reused memory must be
    /// clean before the device is given it.
    pub fn clear(&self, memory: &GuestMemoryMmap) -> Result<(), DriverError> {
        let len = usize::try_from(Self::footprint(self.size)).expect("a queue fits in memory");
        memory.write_slice(&vec![0u8; len], self.desc)?;
        Ok(())
    }

    /// Descriptor `index` of the descriptor table.
    pub fn descriptor(&self, index: u16) -> GuestAddress {
        self.desc.unchecked_add(DESC_SIZE * u64::from(index))
    }

    /// `avail->idx`, which the driver writes.
    pub fn avail_idx(&self) -> GuestAddress {
        self.avail.unchecked_add(2)
    }

    /// The avail ring entry that avail index `idx` fills.
    pub fn avail_entry(&self, idx: u16) -> GuestAddress {
        self.avail.unchecked_add(4 + 2 * u64::from(idx % self.size))
    }

    /// `used_event` (EVENT_IDX), which the driver writes, after the avail ring.
    pub fn used_event(&self) -> GuestAddress {
        self.avail.unchecked_add(4 + 2 * u64::from(self.size))
    }

    /// `used->flags`, which the device writes.
    pub fn used_flags(&self) -> GuestAddress {
        self.used
    }

    /// `used->idx`, which the device writes.
    pub fn used_idx(&self) -> GuestAddress {
        self.used.unchecked_add(2)
    }

    /// The used element that used index `idx` fills.
    pub fn used_element(&self, idx: u16) -> GuestAddress {
        self.used
            .unchecked_add(4 + USED_ELEMENT_SIZE * u64::from(idx % self.size))
    }

    /// `avail_event` (EVENT_IDX), which the device writes, after the used ring.
    pub fn avail_event(&self) -> GuestAddress {
        self.used
            .unchecked_add(4 + USED_ELEMENT_SIZE * u64::from(self.size))
    }
}

/// The virtio "should I notify?" test for EVENT_IDX (`vring_need_event`): true if `event`
/// lies in the window of indices published since `old`, up to `new`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver's side of a split virtqueue in guest memory: the free descriptors, the chains
/// in flight and the driver's indices.
pub struct DriverQueue {
    /// The queue's index on its device, for errors and notifications.
    pub index: u32,
    pub layout: QueueLayout,
    /// Free descriptor-table entries; taken from the back, so heads go out 0, 1, 2, ...
    free: Vec<u16>,
    /// Shadow of `avail->idx`: the avail index the next chain fills.
    next_avail: u16,
    /// `avail->idx` at the last notification decision (EVENT_IDX's "old").
    notified_avail: u16,
    /// The next used index the driver reads.
    last_used: u16,
    /// Descriptor-table entries of each chain the device owns, by head.
    in_flight: HashMap<u16, Vec<u16>>,
}

impl DriverQueue {
    /// A queue with rings at `layout`, all descriptors free, nothing published.
    pub fn new(index: u32, layout: QueueLayout) -> Self {
        DriverQueue {
            index,
            layout,
            free: (0..layout.size).rev().collect(),
            next_avail: 0,
            notified_avail: 0,
            last_used: 0,
            in_flight: HashMap::new(),
        }
    }

    /// Chains published and not yet seen in the used ring.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The avail index the driver has published up to.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Publishes `buffers` as one chain of descriptors, in order; returns its head.
    pub fn add(
        &mut self,
        memory: &GuestMemoryMmap,
        buffers: &[Buffer],
    ) -> Result<u16, DriverError> {
        let descriptors = self.reserve(buffers.len())?;
        for (position, (buffer, &index)) in buffers.iter().zip(&descriptors).enumerate() {
            let next = descriptors.get(position + 1).copied();
            write_descriptor(memory, self.layout.descriptor(index), buffer, next)?;
        }
        self.publish(memory, descriptors)
    }

    /// Publishes `buffers` as an indirect table at `table` (room for one descriptor a
    /// buffer, which the caller owns until the chain is used), pointed at by one descriptor
    /// of the ring; returns its head.
    pub fn add_indirect(
        &mut self,
        memory: &GuestMemoryMmap,
        table: GuestAddress,
        buffers: &[Buffer],
    ) -> Result<u16, DriverError> {
        if buffers.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        let descriptors = self.reserve(1)?;
        for (position, buffer) in buffers.iter().enumerate() {
            // An indirect table is indexed from its own start.
            let next = (position + 1 < buffers.len()).then(|| position as u16 + 1);
            let at = table.unchecked_add(DESC_SIZE * position as u64);
            write_descriptor(memory, at, buffer, next)?;
        }
        let table_len = DESC_SIZE * buffers.len() as u64;
        let head = Buffer {
            addr: table,
            len: u32::try_from(table_len).expect("an indirect table fits a descriptor"),
            device_writable: false,
        };
        let at = self.layout.descriptor(descriptors[0]);
        write_raw_descriptor(memory, at, &head, DESC_F_INDIRECT, 0)?;
        self.publish(memory, descriptors)
    }

    /// The `count` descriptors the next chain takes, in chain order; still free until
    /// [`Self::publish`], so that a chain that could not be written takes none.
    fn reserve(&self, count: usize) -> Result<Vec<u16>, DriverError> {
        if count == 0 {
            return Err(DriverError::EmptyChain);
        }
        if count > self.free.len() {
            return Err(DriverError::OutOfDescriptors {
                queue: self.index,
                needed: count,
                free: self.free.len(),
            });
        }
        Ok(self.free[self.free.len() - count..]
            .iter()
            .rev()
            .copied()
            .collect())
    }

    /// Puts the chain of `descriptors` (from [`Self::reserve`], written) in the avail ring.
    fn publish(
        &mut self,
        memory: &GuestMemoryMmap,
        descriptors: Vec<u16>,
    ) -> Result<u16, DriverError> {
        let head = descriptors[0];
        memory.write_obj(head.to_le(), self.layout.avail_entry(self.next_avail))?;
        let next_avail = self.next_avail.wrapping_add(1);
        // Release: the device sees the descriptors and the ring entry once it sees the index.
        memory.store(
            next_avail.to_le(),
            self.layout.avail_idx(),
            Ordering::Release,
        )?;
        self.next_avail = next_avail;
        self.free.truncate(self.free.len() - descriptors.len());
        self.in_flight.insert(head, descriptors);
        Ok(head)
    }

    /// Whether the device wants to hear of the chains published since the last decision:
    /// with EVENT_IDX (`event_idx`), whether `avail_event` lies among them; without, whether
    /// `VRING_USED_F_NO_NOTIFY` is clear.
    pub fn needs_notification(
        &mut self,
        memory: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<bool, DriverError> {
        let (old, new) = (self.notified_avail, self.next_avail);
        self.notified_avail = new;
        // The index store must be visible before the device's suppression state is read, or
        // both sides can decide that the other will act.
        fence(Ordering::SeqCst);
        Ok(if event_idx {
            let avail_event: u16 = memory.load(self.layout.avail_event(), Ordering::Acquire)?;
            need_event(u16::from_le(avail_event), new, old)
        } else {
            let flags: u16 = memory.load(self.layout.used_flags(), Ordering::Acquire)?;
            u16::from_le(flags) & USED_F_NO_NOTIFY == 0
        })
    }

    /// The used index the device has published, reaped by the driver or not.
    pub fn device_used_idx(&self, memory: &GuestMemoryMmap) -> Result<u16, DriverError> {
        // Acquire: the used elements and the buffers the device wrote are read after this.
        let used_idx: u16 = memory.load(self.layout.used_idx(), Ordering::Acquire)?;
        Ok(u16::from_le(used_idx))
    }

    /// Whether the device has published a used element the driver has not reaped.
    pub fn used_pending(&self, memory: &GuestMemoryMmap) -> Result<bool, DriverError> {
        Ok(self.device_used_idx(memory)? != self.last_used)
    }

    /// Reaps the next used element, if the device published one: (head, used length). Its
    /// descriptors are free again. A head that was not in flight is an error, once: the
    /// element is consumed all the same.
    pub fn take_used(
        &mut self,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<(u16, u32)>, DriverError> {
        if !self.used_pending(memory)? {
            return Ok(None);
        }
        let element = self.layout.used_element(self.last_used);
        let head = u32::from_le(memory.read_obj(element)?);
        let len = u32::from_le(memory.read_obj(element.unchecked_add(4))?);
        self.last_used = self.last_used.wrapping_add(1);
        let (head, descriptors) = u16::try_from(head)
            .ok()
            .and_then(|short| self.in_flight.remove_entry(&short))
            .ok_or(DriverError::UnknownHead {
                queue: self.index,
                head,
            })?;
        self.free.extend(descriptors);
        Ok(Some((head, len)))
    }

    /// With EVENT_IDX: asks for an interrupt as soon as the device uses the next element
    /// (`used_event`). The fence orders the request before the caller's next look at the
    /// used ring, so an element used before the device saw the request is found there.
    pub fn request_interrupt(&self, memory: &GuestMemoryMmap) -> Result<(), DriverError> {
        memory.store(
            self.last_used.to_le(),
            self.layout.used_event(),
            Ordering::Release,
        )?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// [`Self::take_used`], then [`Self::request_interrupt`] for the next element after one
    /// was reaped: a driver that wants an interrupt for every completion.
    pub fn pop_used(
        &mut self,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<(u16, u32)>, DriverError> {
        let used = self.take_used(memory)?;
        if used.is_some() {
            self.request_interrupt(memory)?;
        }
        Ok(used)
    }
}

/// Writes `buffer` as the descriptor at `at`, linked to `next` if the chain goes on (also for
/// tests that lay out a ring by hand).
pub fn write_descriptor(
    memory: &GuestMemoryMmap,
    at: GuestAddress,
    buffer: &Buffer,
    next: Option<u16>,
) -> Result<(), DriverError> {
    let mut flags = if buffer.device_writable {
        DESC_F_WRITE
    } else {
        0
    };
    if next.is_some() {
        flags |= DESC_F_NEXT;
    }
    write_raw_descriptor(memory, at, buffer, flags, next.unwrap_or(0))
}

fn write_raw_descriptor(
    memory: &GuestMemoryMmap,
    at: GuestAddress,
    buffer: &Buffer,
    flags: u16,
    next: u16,
) -> Result<(), DriverError> {
    let mut descriptor = [0u8; DESC_SIZE as usize];
    descriptor[..8].copy_from_slice(&buffer.addr.0.to_le_bytes());
    descriptor[8..12].copy_from_slice(&buffer.len.to_le_bytes());
    descriptor[12..14].copy_from_slice(&flags.to_le_bytes());
    descriptor[14..].copy_from_slice(&next.to_le_bytes());
    memory.write_slice(&descriptor, at)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x4000_0000;

    /// Guest memory from [`BASE`] and queue `index` of 4 entries at its start.
    fn four_entries(index: u32) -> (GuestMemoryMmap, DriverQueue) {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), 1 << 20)]).expect("test memory");
        let queue = DriverQueue::new(index, QueueLayout::new(4, GuestAddress(BASE)));
        (memory, queue)
    }

    fn buffer(addr: u64, len: u32, device_writable: bool) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
            device_writable,
        }
    }

    /// The descriptor at `at`: (addr, len, flags, next).
    fn descriptor(memory: &GuestMemoryMmap, at: GuestAddress) -> (u64, u32, u16, u16) {
        let read = |offset: u64, len: usize| {
            let mut bytes = [0u8; 8];
            memory
                .read_slice(&mut bytes[..len], at.unchecked_add(offset))
                .expect("descriptor in memory");
            u64::from_le_bytes(bytes)
        };
        (
            read(0, 8),
            read(8, 4) as u32,
            read(12, 2) as u16,
            read(14, 2) as u16,
        )
    }

    fn read_u16(memory: &GuestMemoryMmap, at: GuestAddress) -> u16 {
        u16::from_le(memory.read_obj(at).expect("ring in memory"))
    }

    /// Plays the device: puts (head, len) in the used ring at used index `idx`.
    fn device_uses(memory: &GuestMemoryMmap, layout: &QueueLayout, idx: u16, head: u32, len: u32) {
        let element = layout.used_element(idx);
        memory.write_obj(head.to_le(), element).unwrap();
        memory
            .write_obj(len.to_le(), element.unchecked_add(4))
            .unwrap();
        memory
            .write_obj(idx.wrapping_add(1).to_le(), layout.used_idx())
            .unwrap();
    }

    #[test]
    fn rings_are_laid_out_page_aligned_as_virtio_sizes_them() {
        let layout = QueueLayout::new(256, GuestAddress(BASE));
        assert_eq!(layout.desc, GuestAddress(BASE));
        assert_eq!(layout.avail, GuestAddress(BASE + 0x1000));
        assert_eq!(layout.used, GuestAddress(BASE + 0x2000));
        assert_eq!(layout.end(), GuestAddress(BASE + 0x3000));
        assert_eq!(layout.used_event(), GuestAddress(BASE + 0x1000 + 4 + 512));
        assert_eq!(layout.avail_event(), GuestAddress(BASE + 0x2000 + 4 + 2048));
        // 1024 entries: the descriptor table takes four pages, the used ring three.
        assert_eq!(QueueLayout::footprint(1024), 0x4000 + 0x1000 + 0x3000);
        let small = QueueLayout::new(8, GuestAddress(BASE + 0x100));
        assert_eq!(small.avail, GuestAddress(BASE + 0x1000));
        assert_eq!(small.avail_entry(9), GuestAddress(BASE + 0x1000 + 4 + 2));
    }

    #[test]
    fn a_chain_is_linked_published_and_its_descriptors_come_back_when_used() {
        let (memory, mut queue) = four_entries(3);
        let layout = queue.layout;
        let chain = [
            buffer(BASE + 0x8000, 16, false),
            buffer(BASE + 0x9000, 1, true),
        ];
        let head = queue.add(&memory, &chain).unwrap();
        assert_eq!(head, 0);
        assert_eq!(
            descriptor(&memory, layout.descriptor(0)),
            (BASE + 0x8000, 16, DESC_F_NEXT, 1)
        );
        assert_eq!(
            descriptor(&memory, layout.descriptor(1)),
            (BASE + 0x9000, 1, DESC_F_WRITE, 0)
        );
        assert_eq!(read_u16(&memory, layout.avail_entry(0)), 0);
        assert_eq!(read_u16(&memory, layout.avail_idx()), 1);
        assert_eq!((queue.in_flight(), queue.avail_idx()), (1, 1));

        let second = queue.add(&memory, &chain[..1]).unwrap();
        assert_eq!(second, 2);
        let err = queue.add(&memory, &chain).unwrap_err();
        assert!(
            matches!(
                err,
                DriverError::OutOfDescriptors {
                    queue: 3,
                    needed: 2,
                    free: 1
                }
            ),
            "{err}"
        );
        assert!(matches!(
            queue.add(&memory, &[]),
            Err(DriverError::EmptyChain)
        ));
        assert_eq!(
            read_u16(&memory, layout.avail_idx()),
            2,
            "nothing more published"
        );

        assert_eq!(queue.take_used(&memory).unwrap(), None);
        device_uses(&memory, &layout, 0, 0, 1);
        assert_eq!(queue.take_used(&memory).unwrap(), Some((0, 1)));
        assert_eq!(queue.in_flight(), 1);
        // The two freed descriptors make room for the chain refused above.
        assert_eq!(queue.add(&memory, &chain).unwrap(), 1);
    }

    #[test]
    fn an_indirect_chain_takes_one_descriptor_pointing_at_its_table() {
        let (memory, mut queue) = four_entries(0);
        let layout = queue.layout;
        let table = GuestAddress(BASE + 0x8000);
        let chain = [
            buffer(BASE + 0x9000, 16, false),
            buffer(BASE + 0xa000, 512, true),
            buffer(BASE + 0xb000, 1, true),
        ];
        let head = queue.add_indirect(&memory, table, &chain).unwrap();
        assert_eq!(
            descriptor(&memory, layout.descriptor(head)),
            (table.0, 48, DESC_F_INDIRECT, 0)
        );
        assert_eq!(
            descriptor(&memory, table),
            (BASE + 0x9000, 16, DESC_F_NEXT, 1)
        );
        assert_eq!(
            descriptor(&memory, table.unchecked_add(16)),
            (BASE + 0xa000, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        );
        assert_eq!(
            descriptor(&memory, table.unchecked_add(32)),
            (BASE + 0xb000, 1, DESC_F_WRITE, 0)
        );
        assert!(matches!(
            queue.add_indirect(&memory, table, &[]),
            Err(DriverError::EmptyChain)
        ));
        for _ in 0..3 {
            queue.add_indirect(&memory, table, &chain).unwrap();
        }
        assert!(matches!(
            queue.add_indirect(&memory, table, &chain),
            Err(DriverError::OutOfDescriptors { needed: 1, .. })
        ));
    }

    #[test]
    fn a_head_not_in_flight_is_an_error_and_consumed() {
        let (memory, mut queue) = four_entries(1);
        let layout = queue.layout;
        let head = queue
            .add(&memory, &[buffer(BASE + 0x8000, 1, true)])
            .unwrap();
        device_uses(&memory, &layout, 0, 3, 1);
        assert!(matches!(
            queue.take_used(&memory),
            Err(DriverError::UnknownHead { queue: 1, head: 3 })
        ));
        device_uses(&memory, &layout, 1, 0x1_0000, 1);
        assert!(matches!(
            queue.take_used(&memory),
            Err(DriverError::UnknownHead {
                queue: 1,
                head: 0x1_0000
            })
        ));
        device_uses(&memory, &layout, 2, u32::from(head), 1);
        assert_eq!(queue.take_used(&memory).unwrap(), Some((head, 1)));
        assert_eq!(queue.in_flight(), 0);
    }

    #[test]
    fn pop_used_asks_for_the_next_interrupt_and_take_used_does_not() {
        let (memory, mut queue) = four_entries(0);
        let layout = queue.layout;
        let chain = [buffer(BASE + 0x8000, 1, true)];
        for idx in 0..2 {
            queue.add(&memory, &chain).unwrap();
            device_uses(&memory, &layout, idx, u32::from(idx), 1);
        }
        assert_eq!(queue.take_used(&memory).unwrap(), Some((0, 1)));
        assert_eq!(read_u16(&memory, layout.used_event()), 0);
        assert_eq!(queue.pop_used(&memory).unwrap(), Some((1, 1)));
        assert_eq!(read_u16(&memory, layout.used_event()), 2);
        assert_eq!(queue.pop_used(&memory).unwrap(), None);
    }

    #[test]
    fn notifications_follow_avail_event_or_no_notify() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0), "the device asked for index 2");
        assert!(need_event(5, 8, 4));
        assert!(!need_event(8, 8, 4));
        assert!(need_event(0xffff, 2, 0xfffe), "across the wrap");

        let (memory, mut queue) = four_entries(0);
        let layout = queue.layout;
        let chain = [buffer(BASE + 0x8000, 1, true)];
        queue.add(&memory, &chain).unwrap();
        assert!(queue.needs_notification(&memory, true).unwrap());
        assert!(
            !queue.needs_notification(&memory, true).unwrap(),
            "nothing new since"
        );
        memory
            .write_obj(5u16.to_le(), layout.avail_event())
            .unwrap();
        queue.add(&memory, &chain).unwrap();
        assert!(!queue.needs_notification(&memory, true).unwrap());

        queue.add(&memory, &chain).unwrap();
        assert!(queue.needs_notification(&memory, false).unwrap());
        memory
            .write_obj(USED_F_NO_NOTIFY.to_le(), layout.used_flags())
            .unwrap();
        assert!(!queue.needs_notification(&memory, false).unwrap());
    }
}
