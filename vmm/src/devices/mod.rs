//! Emulated devices: the legacy PC devices the guest kernel expects and the virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub(crate) use virtio::mmio_lock as lock;
