//! Virtio devices and their MMIO transport (virtio 1.x, "modern" virtio-mmio, version 2).
//!
//! The split follows Firecracker: each device lives in its own folder with its state in
//! `device.rs` and its queue processing in `event_handler.rs`. The transport ([`MmioTransport`])
//! runs in vCPU threads (register reads and writes arrive as MMIO exits); the queue processing runs
//! in the one VMM event thread, woken by ioeventfds that KVM signals when the guest writes
//! `QueueNotify` (so a notification costs the guest no exit to user space).
//!
//! The guest is hostile: every address it hands us is checked by `vm-memory`/`virtio-queue`, and a
//! malformed request is answered with an error status or dropped with a log line; a queue that
//! cannot be used puts the device in `DEVICE_NEEDS_RESET`. Nothing here panics on guest input.

pub mod block;
pub mod fs;
mod mmio;
pub mod rng;
pub mod vsock;

pub(crate) use mmio::lock as mmio_lock;
pub use mmio::{status, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// A device's interrupt line: the `InterruptStatus` register, shared by the transport (which the
/// guest reads and acknowledges through) and the device (which raises it), plus the eventfd that
/// KVM turns into a guest interrupt (irqfd), so raising it costs one `write(2)` and no VM exit.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in `InterruptStatus` and injects the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The current `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest's `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("queue {0} is not valid (bad size or addresses outside guest memory)")]
    InvalidQueue(usize),
    #[error("device backend failed: {0}")]
    Backend(String),
}

/// The driver's queues as exactly `N` queues that are valid in `mem`: what every device's
/// `activate` checks first.
pub(crate) fn take_queues<const N: usize>(
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
) -> Result<[Queue; N], ActivateError> {
    use virtio_queue::QueueT;
    let got = queues.len();
    let queues: [Queue; N] = queues
        .try_into()
        .map_err(|_| ActivateError::QueueCount { want: N, got })?;
    if let Some(i) = queues.iter().position(|q| !q.is_valid(mem)) {
        return Err(ActivateError::InvalidQueue(i));
    }
    Ok(queues)
}

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

/// What the MMIO transport needs from a device. The device keeps its own queue-notification
/// eventfds (created with it, registered with KVM as ioeventfds by the transport and with the
/// event manager by the device's `MutEventSubscriber::init`), so activation needs no event
/// re-registration across threads.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space at `offset`. Out-of-range reads leave
    /// `data` untouched (zeroes, as the transport hands over a zeroed buffer).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space. Devices with a read-only configuration
    /// ignore this (with a log line).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One eventfd per queue, signalled when the guest notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Takes the driver-configured queues and starts serving them.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: std::sync::Arc<IrqTrigger>,
    ) -> Result<(), ActivateError>;
    /// Drops the queues and returns to the pre-activation state (driver wrote status 0).
    fn reset(&mut self);
    /// Whether the device was activated and not reset since.
    fn is_activated(&self) -> bool;
}
