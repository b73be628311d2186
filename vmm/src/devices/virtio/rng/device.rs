//! State of the virtio-rng device and its request processing.

use std::sync::Arc;

use tracing::error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::{
    device_type, take_queues, ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING,
};

const QUEUE_SIZES: &[u16] = &[256];
/// Bytes handed out per request at most, so one guest request cannot make the event thread
/// spend long in `getrandom`.
const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// What an activated device holds.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<IrqTrigger>,
}

pub struct Rng {
    pub(super) queue_evts: [EventFd; 1],
    acked_features: u64,
    active: Option<Active>,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue_evts: [EventFd::new(EFD_NONBLOCK)?],
            acked_features: 0,
            active: None,
        })
    }

    /// Serves every available request on the queue and interrupts the guest if it asked for it.
    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    // The request queue carries only device-writable buffers (5.4.6.1).
                    guest_warn!("virtio-rng: read-only descriptor in a request; skipped");
                    continue;
                }
                let len = desc.len().min(MAX_BYTES_PER_REQUEST - written);
                if len == 0 {
                    break;
                }
                match mem.read_volatile_from(desc.addr(), &mut HostRandom, len as usize) {
                    Ok(n) => written += n as u32,
                    Err(e) => {
                        guest_warn!("virtio-rng: bad buffer {:#x}+{len}: {e}", desc.addr().0);
                        break;
                    }
                }
            }
            if let Err(e) = active.queue.add_used(mem, head, written) {
                guest_warn!("virtio-rng: cannot return descriptor {head}: {e}");
                break;
            }
            used_any = true;
        }
        if used_any && active.queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = active.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                error!("virtio-rng: cannot interrupt the guest: {e}");
            }
        }
    }
}

/// The host's `getrandom(2)` as a `ReadVolatile` source, so bytes go straight into guest memory
/// with no intermediate buffer.
struct HostRandom;

impl ReadVolatile for HostRandom {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        // SAFETY: the pointer and length describe a live, checked slice of guest memory (mapped
        // for the VM's lifetime); getrandom writes at most `buf.len()` bytes there.
        let n = unsafe { libc::getrandom(guard.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        buf.bitmap().mark_dirty(0, n as usize);
        Ok(n as usize)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {
        // virtio-rng has no configuration space.
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("virtio-rng: config write at {offset:#x} ignored (no config space)");
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        let [queue] = take_queues::<1>(&mem, queues)?;
        self.active = Some(Active { mem, queue, irq });
        // Requests may have been queued before DRIVER_OK.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn active_rng<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (Rng, MockSplitQueue<'a, GuestMemoryMmap>) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        rng.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
            .unwrap();
        (rng, vq)
    }

    #[test]
    fn fills_writable_buffers_and_reports_length() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10000,
            512,
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        let (rng, vq) = active_rng(&mem, &descs);
        let used = vq.used();
        assert_eq!(used.idx().load(), 1);
        assert_eq!(used.ring().ref_at(0).unwrap().load().len(), 512);
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert!(
            buf.iter().filter(|&&b| b != 0).count() > 400,
            "buffer was not filled"
        );
        assert!(rng.active.as_ref().unwrap().irq.status() & VIRTIO_MMIO_INT_VRING != 0);
    }

    #[test]
    fn buffer_outside_guest_memory_does_not_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x1f000,
            0x8000, // runs past the end of guest memory
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        let (_rng, vq) = active_rng(&mem, &descs);
        assert_eq!(vq.used().idx().load(), 1, "the request is still completed");
    }

    #[test]
    fn read_only_descriptor_gets_nothing() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        let descs = [RawDescriptor::from(SplitDescriptor::new(0x10000, 64, 0, 0))];
        let (_rng, vq) = active_rng(&mem, &descs);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert_eq!(buf, [0u8; 64]);
    }
}
