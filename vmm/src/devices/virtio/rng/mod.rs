//! virtio-rng (virtio 1.x, 5.4): one request queue whose device-writable buffers are filled from
//! the host's `getrandom(2)`.

mod device;
mod event_handler;

pub use device::Rng;
