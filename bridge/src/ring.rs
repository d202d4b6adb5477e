//! Both sides of the bridge protocol (docs/hvisor-abi.md, sections 3 to 5): the daemon's consumer of the
//! request ring and producer of the result ring, and the hypervisor's matching halves (used by
//! the simulator and the model-checking tests).
//!
//! The wake-up handshake is a Dekker pattern: the hypervisor stores `req_rear` then loads
//! `need_wakeup`; the daemon stores `need_wakeup` then loads `req_rear`. A full `SeqCst` fence
//! between the store and the load on *both* sides guarantees that at least one side sees the
//! other's store, so either the daemon does not sleep or the hypervisor sends the wake-up.

use super::abi::{DeviceReq, DeviceRes, MAX_CPUS, MAX_REQ, VirtioBridge, ring_next};
use super::sync::{Ordering, fence};

/// Slot of a ring index, whatever value the other side stored.
fn slot(index: u32) -> usize {
    (index & (MAX_REQ - 1)) as usize
}

/// The daemon's end of the request ring. Only one consumer may exist per bridge.
pub struct RequestConsumer<'a> {
    bridge: &'a VirtioBridge,
    /// Our copy of `req_front`: only we write it.
    front: u32,
}

impl<'a> RequestConsumer<'a> {
    pub fn new(bridge: &'a VirtioBridge) -> Self {
        RequestConsumer {
            bridge,
            front: bridge.req_front.load(Ordering::Relaxed) & (MAX_REQ - 1),
        }
    }

    /// "I am awake": the hypervisor need not send wake-ups while we drain. Relaxed, because a
    /// stale 1 seen by the hypervisor only costs a spurious wake-up.
    pub fn announce_awake(&self) {
        self.bridge.need_wakeup.store(0, Ordering::Relaxed);
    }

    /// Whether a request is waiting, without taking it (for busy-polling).
    pub fn has_pending(&self) -> bool {
        self.bridge.req_rear.load(Ordering::Relaxed) & (MAX_REQ - 1) != self.front
    }

    /// Takes the oldest request, if any.
    pub fn pop(&mut self) -> Option<DeviceReq> {
        let rear = self.bridge.req_rear.load(Ordering::Relaxed) & (MAX_REQ - 1);
        if rear == self.front {
            return None;
        }
        // Acquire: pairs with the hypervisor's release fence between filling the slot and
        // storing `req_rear`, so the slot contents read below are the ones it published.
        #[cfg(not(hvisor_mutant = "no_acquire_per_item"))]
        fence(Ordering::Acquire);
        let entry = &self.bridge.req_list[slot(self.front)];
        let request = DeviceReq {
            src_cpu: entry.src_cpu.load(Ordering::Relaxed),
            address: entry.address.load(Ordering::Relaxed),
            size: entry.size.load(Ordering::Relaxed),
            value: entry.value.load(Ordering::Relaxed),
            src_zone: entry.src_zone.load(Ordering::Relaxed),
            is_write: entry.is_write.load(Ordering::Relaxed) != 0,
            need_interrupt: entry.need_interrupt.load(Ordering::Relaxed) != 0,
        };
        self.front = ring_next(self.front);
        // Release: our reads of the slot happen before the hypervisor, seeing the new front,
        // may overwrite it.
        self.bridge.req_front.store(self.front, Ordering::Release);
        Some(request)
    }

    /// The last step before sleeping. Returns true when the caller may sleep: the hypervisor
    /// is then guaranteed to send a wake-up for any request it publishes from now on.
    pub fn prepare_to_sleep(&self) -> bool {
        self.bridge.need_wakeup.store(1, Ordering::Relaxed);
        // SeqCst fence: the `need_wakeup` store above is ordered before the `req_rear` load
        // below (store->load, which even x86 reorders without it). Pairs with the
        // hypervisor's fence between its `req_rear` store and `need_wakeup` load.
        #[cfg(not(hvisor_mutant = "no_consumer_fence"))]
        fence(Ordering::SeqCst);
        if self.has_pending() {
            // A request slipped in: stay awake.
            self.announce_awake();
            false
        } else {
            true
        }
    }
}

/// Answers a synchronous request of the vCPU on physical `cpu` with `value`.
///
/// Returns false (and does nothing) for a CPU id outside the page.
pub fn answer(bridge: &VirtioBridge, cpu: u64, value: u64) -> bool {
    let Some(index) = usize::try_from(cpu).ok().filter(|&index| index < MAX_CPUS) else {
        return false;
    };
    bridge.cfg_values[index].store(value, Ordering::Relaxed);
    // Only the daemon writes `cfg_flags`, so load + store is an increment. Release: the value
    // above is visible to a vCPU that sees the new flag (it loads the flag, fences Acquire,
    // then loads the value).
    let flag = bridge.cfg_flags[index].load(Ordering::Relaxed);
    bridge.cfg_flags[index].store(flag.wrapping_add(1), Ordering::Release);
    true
}

/// Appends an interrupt to the result ring. The caller serializes result producers.
///
/// Returns false when the ring is full.
pub fn push_result(bridge: &VirtioBridge, result: DeviceRes) -> bool {
    let rear = bridge.res_rear.load(Ordering::Relaxed) & (MAX_REQ - 1);
    // Acquire: pairs with the hypervisor's release fence before its `res_front` store, so it
    // has finished reading a slot we are about to reuse.
    let front = bridge.res_front.load(Ordering::Acquire) & (MAX_REQ - 1);
    if ring_next(rear) == front {
        return false;
    }
    let entry = &bridge.res_list[slot(rear)];
    entry
        .target_zone
        .store(result.target_zone, Ordering::Relaxed);
    entry.irq_id.store(result.irq_id, Ordering::Relaxed);
    // Release: the entry is visible before the hypervisor sees the new rear.
    bridge.res_rear.store(ring_next(rear), Ordering::Release);
    true
}

/// The hypervisor's side of the protocol, as hvisor's `virtio_trampoline.rs` does it. Callers
/// serialize request producers (hvisor's `req_lock`) and result consumers (its `res_lock`).
///
/// Request producers keep `req_rear` in the state their lock protects, rather than re-reading
/// it from the page as hvisor does: only producers write it, under that lock, so the value is
/// the same. (It also keeps loom 0.7.3 able to see a consumer that reads a slot without its
/// acquire fence: loom misses that race when the writer loaded the index it then publishes.)
pub struct HypervisorSide<'a> {
    bridge: &'a VirtioBridge,
}

impl<'a> HypervisorSide<'a> {
    pub fn new(bridge: &'a VirtioBridge) -> Self {
        HypervisorSide { bridge }
    }

    /// The completion counter of `cpu`, read before publishing a synchronous request.
    pub fn cfg_flag(&self, cpu: usize) -> u64 {
        let flag = self.bridge.cfg_flags[cpu].load(Ordering::Relaxed);
        // Acquire: pairs with the daemon's release store of the flag, so `cfg_value` reads
        // the answer that came with it.
        fence(Ordering::Acquire);
        flag
    }

    pub fn cfg_value(&self, cpu: usize) -> u64 {
        self.bridge.cfg_values[cpu].load(Ordering::Relaxed)
    }

    /// The producers' copy of `req_rear`, to keep under their lock; read once at start-up.
    pub fn request_rear(&self) -> u32 {
        self.bridge.req_rear.load(Ordering::Relaxed) & (MAX_REQ - 1)
    }

    /// Publishes a request; false when the ring is full. `rear` is the producers' copy of
    /// `req_rear` (see [`HypervisorSide::request_rear`]), advanced on success.
    pub fn try_push(&self, rear: &mut u32, request: &DeviceReq) -> bool {
        let current = *rear & (MAX_REQ - 1);
        let front = self.bridge.req_front.load(Ordering::Relaxed) & (MAX_REQ - 1);
        // Acquire: pairs with the daemon's release store of `req_front`; it has finished
        // reading the slot we may now reuse.
        fence(Ordering::Acquire);
        if ring_next(current) == front {
            return false;
        }
        let entry = &self.bridge.req_list[slot(current)];
        entry.src_cpu.store(request.src_cpu, Ordering::Relaxed);
        entry.address.store(request.address, Ordering::Relaxed);
        entry.size.store(request.size, Ordering::Relaxed);
        entry.value.store(request.value, Ordering::Relaxed);
        entry.src_zone.store(request.src_zone, Ordering::Relaxed);
        entry
            .is_write
            .store(u8::from(request.is_write), Ordering::Relaxed);
        entry
            .need_interrupt
            .store(u8::from(request.need_interrupt), Ordering::Relaxed);
        // Release: the slot is complete before the daemon can see the new rear.
        fence(Ordering::Release);
        *rear = ring_next(current);
        self.bridge.req_rear.store(*rear, Ordering::Relaxed);
        true
    }

    /// Whether the daemon asked to be woken; checked once after every published request.
    pub fn needs_wakeup(&self) -> bool {
        // SeqCst fence: orders the `req_rear` store of `try_push` before this load; the other
        // half of the Dekker handshake in `RequestConsumer::prepare_to_sleep`.
        #[cfg(not(hvisor_mutant = "no_producer_fence"))]
        fence(Ordering::SeqCst);
        self.bridge.need_wakeup.load(Ordering::Relaxed) == 1
    }

    /// Takes the oldest interrupt from the result ring, if any.
    pub fn pop_result(&self) -> Option<DeviceRes> {
        let front = self.bridge.res_front.load(Ordering::Relaxed) & (MAX_REQ - 1);
        let rear = self.bridge.res_rear.load(Ordering::Relaxed) & (MAX_REQ - 1);
        // Acquire: pairs with the daemon's release store of `res_rear`.
        fence(Ordering::Acquire);
        if front == rear {
            return None;
        }
        let entry = &self.bridge.res_list[slot(front)];
        let result = DeviceRes {
            target_zone: entry.target_zone.load(Ordering::Relaxed),
            irq_id: entry.irq_id.load(Ordering::Relaxed),
        };
        // Release: our reads of the entry happen before the daemon may reuse it.
        fence(Ordering::Release);
        self.bridge
            .res_front
            .store(ring_next(front), Ordering::Relaxed);
        Some(result)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn request(n: u64) -> DeviceReq {
        DeviceReq {
            src_cpu: n % 4,
            address: 0xa000_0000 + n,
            size: 4,
            value: n * 3,
            src_zone: 1,
            is_write: n % 2 == 0,
            need_interrupt: n % 3 == 0,
        }
    }

    #[test]
    fn requests_arrive_in_order_and_the_ring_holds_31() {
        let bridge = VirtioBridge::default();
        let hypervisor = HypervisorSide::new(&bridge);
        let mut rear = hypervisor.request_rear();
        let mut consumer = RequestConsumer::new(&bridge);
        for n in 0..31 {
            assert!(hypervisor.try_push(&mut rear, &request(n)), "slot {n}");
        }
        assert!(
            !hypervisor.try_push(&mut rear, &request(99)),
            "the 32nd request must not fit"
        );
        for n in 0..31 {
            assert_eq!(consumer.pop(), Some(request(n)));
        }
        assert_eq!(consumer.pop(), None);
        // Indices wrap around.
        for n in 100..140 {
            assert!(hypervisor.try_push(&mut rear, &request(n)));
            assert_eq!(consumer.pop(), Some(request(n)));
        }
    }

    #[test]
    fn sleeping_is_refused_while_a_request_is_pending() {
        let bridge = VirtioBridge::default();
        let hypervisor = HypervisorSide::new(&bridge);
        let mut consumer = RequestConsumer::new(&bridge);
        assert!(consumer.prepare_to_sleep());
        assert!(hypervisor.needs_wakeup());
        consumer.announce_awake();
        assert!(!hypervisor.needs_wakeup());
        let mut rear = hypervisor.request_rear();
        hypervisor.try_push(&mut rear, &request(1));
        assert!(!consumer.prepare_to_sleep());
        assert_eq!(bridge.need_wakeup.load(Ordering::Relaxed), 0);
        assert!(consumer.pop().is_some());
        assert!(consumer.prepare_to_sleep());
    }

    #[test]
    fn answers_bump_the_flag_of_their_cpu_only() {
        let bridge = VirtioBridge::default();
        let hypervisor = HypervisorSide::new(&bridge);
        assert!(answer(&bridge, 3, 0x7472_6976));
        assert_eq!(hypervisor.cfg_flag(3), 1);
        assert_eq!(hypervisor.cfg_value(3), 0x7472_6976);
        assert_eq!(hypervisor.cfg_flag(2), 0);
        assert!(!answer(&bridge, MAX_CPUS as u64, 1));
        assert!(!answer(&bridge, u64::MAX, 1));
    }

    #[test]
    fn results_fill_up_and_drain() {
        let bridge = VirtioBridge::default();
        let hypervisor = HypervisorSide::new(&bridge);
        for irq in 0..31 {
            assert!(push_result(
                &bridge,
                DeviceRes {
                    target_zone: 1,
                    irq_id: irq
                }
            ));
        }
        assert!(!push_result(
            &bridge,
            DeviceRes {
                target_zone: 1,
                irq_id: 99
            }
        ));
        for irq in 0..31 {
            assert_eq!(
                hypervisor.pop_result(),
                Some(DeviceRes {
                    target_zone: 1,
                    irq_id: irq
                })
            );
        }
        assert_eq!(hypervisor.pop_result(), None);
    }

    #[test]
    fn garbage_indices_from_the_other_side_stay_inside_the_rings() {
        let bridge = VirtioBridge::default();
        bridge.req_rear.store(1000, Ordering::Relaxed);
        let mut consumer = RequestConsumer::new(&bridge);
        // 1000 & 31 = 8 slots of (zeroed) requests are readable, then the ring is empty.
        for _ in 0..8 {
            assert!(consumer.pop().is_some());
        }
        assert_eq!(consumer.pop(), None);
        bridge.res_front.store(u32::MAX, Ordering::Relaxed);
        assert!(push_result(&bridge, DeviceRes::default()));
    }
}
