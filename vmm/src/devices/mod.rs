//! Emulated devices: the legacy PC devices the guest kernel expects and the virtio devices.

// First: its rate-limited logging macros are used by every device.
#[macro_use]
pub mod rate_limit;

pub mod bus;
pub mod io_limiter;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub(crate) use virtio::mmio_lock as lock;
