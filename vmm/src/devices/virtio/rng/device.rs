//! State of the virtio-rng device and its request processing.

use std::ops::ControlFlow;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::devices::virtio::{device_type, DeviceCore, VirtioDevice, VIRTIO_F_VERSION_1};

const QUEUE_SIZES: &[u16] = &[256];
/// Bytes handed out per request at most, so one guest request cannot make the event thread
/// spend long in `getrandom`.
const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

pub struct Rng {
    pub(super) core: DeviceCore,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            core: DeviceCore::new(
                "virtio-rng",
                device_type::RNG,
                VIRTIO_F_VERSION_1,
                QUEUE_SIZES,
            )?,
        })
    }

    /// Serves every available request on the queue and interrupts the guest if it asked for it.
    pub(super) fn process_queue(&mut self) {
        self.core
            .serve_queue(0, |mem, chain| ControlFlow::Continue(fill(mem, chain)));
    }
}

/// Fills a request's device-writable buffers; returns the bytes written.
fn fill(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
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
    written
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
    // virtio-rng has no configuration space: the defaults read zeroes and ignore writes.
    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn activated(&mut self) -> Result<(), crate::devices::virtio::ActivateError> {
        // Requests may have been queued before DRIVER_OK.
        self.process_queue();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
    use std::sync::Arc;
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
        rng.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
            .unwrap();
        assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0, "no interrupt");
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
        let (_rng, vq) = active_rng(&mem, &descs);
        let used = vq.used();
        assert_eq!(used.idx().load(), 1);
        assert_eq!(used.ring().ref_at(0).unwrap().load().len(), 512);
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert!(
            buf.iter().filter(|&&b| b != 0).count() > 400,
            "buffer was not filled"
        );
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
