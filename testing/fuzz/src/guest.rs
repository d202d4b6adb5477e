//! A small guest memory whose contents come from the fuzz input, split rings at fixed places
//! in it, and the checks every device harness makes on what the device did to that memory.
//!
//! The rings are the driver's, so the fuzzer writes them as it likes (descriptors, avail
//! entries and index, even the used ring's old contents); only the used index starts at 0,
//! as a driver initialises it. The checks are computed from the descriptor tables
//! independently of virtio-queue: they over-approximate what a correct device may touch, so a
//! violation is a real bug and never a harness artefact.

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Guest RAM from address 0; small, so snapshots and comparisons are cheap.
pub const MEMORY_SIZE: usize = 0x4000;
/// Entries of every ring.
pub const QUEUE_SIZE: u16 = 8;
/// Each queue's rings take this much memory, from `queue * RING_STRIDE` on.
pub const RING_STRIDE: u64 = 0x200;
const AVAIL_OFFSET: u64 = 0x80;
const USED_OFFSET: u64 = 0x100;
const DESC_SIZE: u64 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Where queue `queue`'s descriptor table, avail ring and used ring are.
pub fn ring_addresses(queue: u16) -> (u64, u64, u64) {
    let base = u64::from(queue) * RING_STRIDE;
    (base, base + AVAIL_OFFSET, base + USED_OFFSET)
}

/// Bytes of the used ring: flags, idx, ring, avail_event.
fn used_ring_len() -> u64 {
    4 + 8 * u64::from(QUEUE_SIZE) + 2
}

/// Guest memory that harness runs reuse, the image the current run started from, and its
/// queues.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    before: Vec<u8>,
    after: Vec<u8>,
    queues: u16,
}

impl Guest {
    /// Zeroed memory with `queues` rings; each run starts with [`Guest::load`].
    pub fn new(queues: u16) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)])
            .expect("anonymous guest memory");
        Guest {
            atomic: GuestMemoryAtomic::new(mem.clone()),
            mem,
            before: vec![0; MEMORY_SIZE],
            after: vec![0; MEMORY_SIZE],
            queues,
        }
    }

    /// Starts a run: all of memory is rewritten, to `image` from address 0 and zeroes beyond
    /// it, whatever an earlier run left there; every used index is 0, as a driver
    /// initialises it.
    pub fn load(&mut self, image: &[u8]) {
        let image = &image[..image.len().min(MEMORY_SIZE)];
        self.before[..image.len()].copy_from_slice(image);
        self.before[image.len()..].fill(0);
        for queue in 0..self.queues {
            let (_, _, used) = ring_addresses(queue);
            let idx = (used + 2) as usize;
            self.before[idx..idx + 2].fill(0);
        }
        self.mem
            .write_slice(&self.before, GuestAddress(0))
            .expect("in memory");
    }

    /// Memory as the device left it, read by the last [`Guest::check`].
    pub fn image_after(&self) -> &[u8] {
        &self.after
    }

    /// Checks what the device did to guest memory since [`Guest::load`]:
    ///
    /// - it wrote nothing outside the used rings and the device-writable buffers of the
    ///   descriptor tables (direct, or in an indirect table one of them names);
    /// - each queue's used index counts at most the entries the driver made available, and
    ///   each used element names a head inside the table and a length no larger than the
    ///   writable bytes of that chain.
    ///
    /// Both are judged against the tables as they were before and after the run (a writable
    /// buffer may overlap a table), taking the more permissive.
    pub fn check(&mut self) {
        self.mem
            .read_slice(&mut self.after, GuestAddress(0))
            .expect("in memory");
        let (before, after) = (&self.before[..], &self.after[..]);
        let buffers: Vec<Range<u64>> = (0..self.queues)
            .flat_map(|queue| [before, after].map(|memory| writable_buffers(memory, queue)))
            .flatten()
            .collect();
        // A driver that lets the device write its own descriptor tables or avail ring has
        // them changed while the device works through them: what the device may write then
        // depends on states in between, which neither image shows. A run in which the device
        // changed them is judged only by not crashing, hanging or leaking.
        let rewrites_driver_rings = (0..self.queues)
            .flat_map(|queue| [before, after].map(|memory| driver_rings(memory, queue)))
            .flatten()
            .any(|ring| {
                let end = (ring.end.min(MEMORY_SIZE as u64)) as usize;
                let start = (ring.start as usize).min(end);
                before[start..end] != after[start..end]
            });
        if rewrites_driver_rings {
            return;
        }
        if before != after {
            let mut allowed = buffers.clone();
            allowed.extend((0..self.queues).map(|queue| {
                let (_, _, used) = ring_addresses(queue);
                used..used + used_ring_len()
            }));
            // Only the gaps between the allowed ranges need comparing: one slice comparison
            // each, and a byte search in a gap that differs.
            allowed.sort_unstable_by_key(|range| range.start);
            let mut gaps = Vec::new();
            let mut from = 0u64;
            for range in &allowed {
                if range.start > from {
                    gaps.push(from..range.start);
                }
                from = from.max(range.end);
            }
            gaps.push(from..MEMORY_SIZE as u64);
            for gap in gaps {
                let gap = gap.start.min(MEMORY_SIZE as u64) as usize
                    ..gap.end.min(MEMORY_SIZE as u64) as usize;
                let (old, new) = (&before[gap.clone()], &after[gap.clone()]);
                if old != new {
                    let at = gap.start + old.iter().zip(new).position(|(o, n)| o != n).unwrap_or(0);
                    panic!(
                        "the device wrote guest byte {at:#x} ({:#04x} -> {:#04x}), outside every \
                         used ring and device-writable buffer",
                        before[at], after[at]
                    );
                }
            }
        }
        for queue in 0..self.queues {
            let (_, _, used) = ring_addresses(queue);
            let ring = used..used + used_ring_len();
            // A driver whose own writable buffer covers a used ring gets what it asked for:
            // that ring then holds data as well as used elements, and cannot be judged.
            let overwritten = buffers
                .iter()
                .any(|buffer| buffer.start < ring.end && ring.start < buffer.end);
            if !overwritten {
                self.check_used_ring(queue);
            }
        }
    }

    fn check_used_ring(&self, queue: u16) {
        let after = &self.after[..];
        let (_, avail, used) = ring_addresses(queue);
        let used_idx = read_u16(after, used + 2);
        let published = read_u16(&self.before, avail + 2).max(read_u16(after, avail + 2));
        assert!(
            used_idx <= published.min(QUEUE_SIZE),
            "queue {queue}: used index {used_idx} but the driver published {published} entries \
             on a {QUEUE_SIZE}-entry ring"
        );
        for position in 0..used_idx {
            let element = used + 4 + 8 * u64::from(position % QUEUE_SIZE);
            let head = read_u32(after, element);
            let len = read_u32(after, element + 4);
            assert!(
                head < u32::from(QUEUE_SIZE),
                "queue {queue}: used element {position} names head {head}, beyond the table"
            );
            let writable = [&self.before[..], after]
                .iter()
                .map(|memory| chain_writable_bytes(memory, queue, head as u16))
                .max()
                .unwrap_or(0);
            assert!(
                u64::from(len) <= writable,
                "queue {queue}: used element {position} (head {head}) reports {len} bytes \
                 written, but the chain has only {writable} device-writable bytes"
            );
        }
    }
}

fn read_u16(memory: &[u8], at: u64) -> u16 {
    let at = at as usize;
    u16::from_le_bytes([memory[at], memory[at + 1]])
}

fn read_u32(memory: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(memory[at..at + 4].try_into().expect("4 bytes"))
}

/// A split descriptor read from `memory`, if it lies inside it.
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn descriptor(memory: &[u8], at: u64) -> Option<Descriptor> {
    let start = usize::try_from(at).ok()?;
    let raw = memory.get(start..start.checked_add(DESC_SIZE as usize)?)?;
    Some(Descriptor {
        addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
        len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
        flags: u16::from_le_bytes([raw[12], raw[13]]),
        next: u16::from_le_bytes([raw[14], raw[15]]),
    })
}

/// The descriptors of the indirect table `table` names (as many as fit in memory).
fn indirect_entries(memory: &[u8], table: Descriptor) -> impl Iterator<Item = Descriptor> + '_ {
    (0..u64::from(table.len) / DESC_SIZE)
        .map_while(move |i| descriptor(memory, table.addr.checked_add(i * DESC_SIZE)?))
}

fn buffer(descriptor: Descriptor) -> Range<u64> {
    descriptor.addr..descriptor.addr.saturating_add(u64::from(descriptor.len))
}

/// Every device-writable buffer a descriptor of `queue`'s table names, directly or through an
/// indirect table.
fn writable_buffers(memory: &[u8], queue: u16) -> Vec<Range<u64>> {
    let (table, _, _) = ring_addresses(queue);
    let mut buffers = Vec::new();
    for index in 0..u64::from(QUEUE_SIZE) {
        let Some(entry) = descriptor(memory, table + index * DESC_SIZE) else {
            continue;
        };
        if entry.flags & VRING_DESC_F_INDIRECT != 0 {
            buffers.extend(
                indirect_entries(memory, entry)
                    .filter(|d| d.flags & VRING_DESC_F_WRITE != 0)
                    .map(buffer),
            );
        } else if entry.flags & VRING_DESC_F_WRITE != 0 {
            buffers.push(buffer(entry));
        }
    }
    buffers
}

/// What the driver writes of `queue`'s rings and the device only reads: the descriptor table,
/// the avail ring, and every indirect table the descriptor table names.
fn driver_rings(memory: &[u8], queue: u16) -> Vec<Range<u64>> {
    let (table, avail, _) = ring_addresses(queue);
    let size = u64::from(QUEUE_SIZE);
    let mut rings = vec![table..table + size * DESC_SIZE, avail..avail + 6 + 2 * size];
    rings.extend(
        (0..size)
            .filter_map(|index| descriptor(memory, table + index * DESC_SIZE))
            .filter(|entry| entry.flags & VRING_DESC_F_INDIRECT != 0)
            .map(buffer),
    );
    rings
}

/// An upper bound of the device-writable bytes of the chain at `head`: the direct chain is
/// followed for at most a table's worth of links, and an indirect descriptor on it counts every
/// writable entry of its table.
fn chain_writable_bytes(memory: &[u8], queue: u16, head: u16) -> u64 {
    let (table, _, _) = ring_addresses(queue);
    let mut index = head;
    let mut total = 0u64;
    for _ in 0..QUEUE_SIZE {
        if index >= QUEUE_SIZE {
            break;
        }
        let Some(entry) = descriptor(memory, table + u64::from(index) * DESC_SIZE) else {
            break;
        };
        if entry.flags & VRING_DESC_F_INDIRECT != 0 {
            total += indirect_entries(memory, entry)
                .filter(|d| d.flags & VRING_DESC_F_WRITE != 0)
                .map(|d| u64::from(d.len))
                .sum::<u64>();
        } else if entry.flags & VRING_DESC_F_WRITE != 0 {
            total += u64::from(entry.len);
        }
        if entry.flags & VRING_DESC_F_NEXT == 0 {
            break;
        }
        index = entry.next;
    }
    total
}

/// Builds memory images with well-formed rings, for seed inputs.
#[derive(Clone)]
pub struct ImageBuilder {
    image: Vec<u8>,
    next_desc: [u16; 4],
    avail_idx: [u16; 4],
}

/// One buffer of a seed chain.
#[derive(Clone, Copy)]
pub struct SeedBuffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder {
            image: vec![0; MEMORY_SIZE],
            next_desc: [0; 4],
            avail_idx: [0; 4],
        }
    }
}

impl ImageBuilder {
    /// Publishes a chain of `buffers` on `queue`.
    pub fn chain(mut self, queue: u16, buffers: &[SeedBuffer]) -> Self {
        let (table, avail, _) = ring_addresses(queue);
        let q = usize::from(queue);
        let first = self.next_desc[q];
        for (i, b) in buffers.iter().enumerate() {
            let index = first + i as u16;
            let more = i + 1 < buffers.len();
            let flags = (u16::from(more) * VRING_DESC_F_NEXT)
                | (u16::from(b.writable) * VRING_DESC_F_WRITE);
            let at = (table + u64::from(index) * DESC_SIZE) as usize;
            self.image[at..at + 8].copy_from_slice(&b.addr.to_le_bytes());
            self.image[at + 8..at + 12].copy_from_slice(&b.len.to_le_bytes());
            self.image[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
            self.image[at + 14..at + 16].copy_from_slice(&(index + 1).to_le_bytes());
        }
        self.next_desc[q] = first + buffers.len() as u16;
        let slot = (avail + 4 + 2 * u64::from(self.avail_idx[q] % QUEUE_SIZE)) as usize;
        self.image[slot..slot + 2].copy_from_slice(&first.to_le_bytes());
        self.avail_idx[q] += 1;
        let idx = (avail + 2) as usize;
        self.image[idx..idx + 2].copy_from_slice(&self.avail_idx[q].to_le_bytes());
        self
    }

    /// Writes `data` at `addr`.
    pub fn data(mut self, addr: u64, data: &[u8]) -> Self {
        let at = addr as usize;
        self.image[at..at + data.len()].copy_from_slice(data);
        self
    }

    /// The image, without the trailing zeroes.
    pub fn build(self) -> Vec<u8> {
        let mut image = self.image;
        let used = image
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |last| last + 1);
        image.truncate(used);
        image
    }
}

pub fn readable(addr: u64, len: u32) -> SeedBuffer {
    SeedBuffer {
        addr,
        len,
        writable: false,
    }
}

pub fn writable(addr: u64, len: u32) -> SeedBuffer {
    SeedBuffer {
        addr,
        len,
        writable: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One queue with a chain of a readable buffer at 0x1000 and a writable one at 0x2000.
    fn loaded() -> Guest {
        let image = ImageBuilder::default()
            .chain(0, &[readable(0x1000, 0x10), writable(0x2000, 0x100)])
            .build();
        let mut guest = Guest::new(1);
        guest.load(&image);
        guest
    }

    #[test]
    fn writes_into_writable_buffers_and_used_ring_pass() {
        let mut guest = loaded();
        let (_, _, used) = ring_addresses(0);
        guest
            .mem
            .write_slice(&[7; 0x100], GuestAddress(0x2000))
            .unwrap();
        guest.mem.write_obj(1u16, GuestAddress(used + 2)).unwrap();
        guest.mem.write_obj(0u32, GuestAddress(used + 4)).unwrap();
        guest
            .mem
            .write_obj(0x100u32, GuestAddress(used + 8))
            .unwrap();
        guest.check();
    }

    #[test]
    #[should_panic(expected = "wrote guest byte 0x1004")]
    fn a_write_into_a_readable_buffer_is_caught() {
        let mut guest = loaded();
        guest.mem.write_obj(1u8, GuestAddress(0x1004)).unwrap();
        guest.check();
    }

    #[test]
    #[should_panic(expected = "wrote guest byte 0x3fff")]
    fn a_write_at_the_end_of_memory_is_caught() {
        let mut guest = loaded();
        guest.mem.write_obj(1u8, GuestAddress(0x3fff)).unwrap();
        guest.check();
    }

    #[test]
    #[should_panic(expected = "reports 257 bytes written")]
    fn a_used_length_beyond_the_chain_is_caught() {
        let mut guest = loaded();
        let (_, _, used) = ring_addresses(0);
        guest.mem.write_obj(1u16, GuestAddress(used + 2)).unwrap();
        guest
            .mem
            .write_obj(0x101u32, GuestAddress(used + 8))
            .unwrap();
        guest.check();
    }

    #[test]
    fn load_erases_what_an_earlier_run_left() {
        let mut guest = loaded();
        guest.mem.write_obj(0xffu8, GuestAddress(0x3000)).unwrap();
        guest.load(&[1, 2, 3]);
        let mut byte = [0u8; 1];
        guest
            .mem
            .read_slice(&mut byte, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(byte, [0]);
        guest.check();
    }
}
