//! Virtio devices and their MMIO transport (virtio 1.x, "modern" virtio-mmio, version 2).
//!
//! The split follows Firecracker: what every device shares (features, queues, interrupt,
//! activation, the queue-serving loop) is one [`DeviceCore`] (`device.rs` here); each device
//! lives in its own folder with its state in `device.rs` and its event handling in
//! `event_handler.rs`. The transport ([`MmioTransport`]) runs in vCPU threads (register reads and
//! writes arrive as MMIO exits); the queue processing runs in the one VMM event thread, woken by
//! ioeventfds that KVM signals when the guest writes `QueueNotify` (so a notification costs the
//! guest no exit to user space).
//!
//! The guest is hostile: every address it hands us is checked by `vm-memory`/`virtio-queue`, and a
//! malformed request is answered with an error status or dropped with a log line; a queue that
//! cannot be used puts the device in `DEVICE_NEEDS_RESET`. Nothing here panics on guest input.

pub mod block;
mod device;
pub mod fs;
mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

pub use device::{
    ActivateError, ActiveQueues, DeviceCore, IrqTrigger, Subscriber, VirtioDevice, VirtioEvents,
};
pub(crate) use mmio::lock as mmio_lock;
pub use mmio::{status, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};

/// Device ids from the virtio specification (5 Device Types).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// Feature bit every modern device offers: the device complies with virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// `InterruptStatus` bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// `InterruptStatus` bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Copies the part of a device's configuration space `config` that `[offset, offset + len)`
/// covers into `data`; bytes past the end stay as the transport zeroed them.
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|o| config.get(o..))
        .unwrap_or_default();
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}
