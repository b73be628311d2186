//! Helpers for device tests: the guest driver's side of a split queue in real guest memory.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The size of every test queue.
pub const QSIZE: u16 = 256;

/// The device's view of `vq` with its used ring at `used`. The used rings are placed by hand:
/// virtio-queue 0.18's mock computes the end of the avail ring as `start + len` (elements, not
/// bytes), so its used ring overlaps avail slots `len/2..` and a test using more than half of a
/// 256-entry ring corrupts its own avail ring.
pub fn queue_with_used_ring(vq: &MockSplitQueue<'_, GuestMemoryMmap>, used: u64) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q
}

/// Adds a descriptor chain `(addr, len, device-writable)` to a mock queue's avail ring.
pub fn add_chain(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    next: &mut u16,
    descs: &[(u64, u32, bool)],
) -> u16 {
    let head = *next;
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        let idx = (head + i as u16) % QSIZE;
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let desc = SplitDescriptor::new(addr, len, flags, (idx + 1) % QSIZE);
        vq.desc_table()
            .store(idx, RawDescriptor::from(desc))
            .unwrap();
    }
    *next = (head + descs.len() as u16) % QSIZE;
    let avail = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at((avail % QSIZE) as usize)
        .unwrap()
        .store(head);
    vq.avail().idx().store(avail.wrapping_add(1));
    head
}

/// The used ring's index: how many chains the device returned (mod 2^16).
pub fn used_idx(mem: &GuestMemoryMmap, used_ring: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(used_ring + 2)).unwrap()
}

/// Used ring element `i` of the used ring at `used_ring`: (descriptor id, length).
pub fn used_elem(mem: &GuestMemoryMmap, used_ring: u64, i: u16) -> (u32, u32) {
    let at = used_ring + 4 + 8 * u64::from(i % QSIZE);
    let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap();
    let len = mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap();
    (id, len)
}
