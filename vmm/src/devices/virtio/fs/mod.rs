//! virtio-fs (virtio 1.x, 5.11) as a vhost-user frontend: the FUSE requests the guest puts on
//! the queues are served by a separate daemon (virtiofsd, one per VM), not by the VMM.
//!
//! The VMM's part is small and never touches the shared files: it owns the device's identity
//! (device id 26, the configuration space with the tag and the number of request queues) and
//! the virtio-mmio transport, and on activation hands the daemon what it needs to serve the
//! queues itself: the guest memory table (memfd-backed, so the daemon can map it), each queue's
//! size and ring addresses, the queue's ioeventfd as the kick and an eventfd as the call. The
//! daemon then reads and writes guest memory directly; the guest's notifications reach it
//! without passing through the VMM.
//!
//! The daemon's "call" is relayed through the VMM's event thread ([`Fs`]'s event handler) rather
//! than handed to KVM as an irqfd: the virtio-mmio driver reads `InterruptStatus` on every
//! interrupt and ignores one whose used-ring bit is not set, and only the VMM can set it.

mod device;
mod event_handler;
mod frontend;

pub use device::{Fs, FsError, NUM_REQUEST_QUEUES, TAG_MAX_LEN};
